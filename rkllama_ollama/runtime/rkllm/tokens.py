"""Prompt tokenisation for RKLLM models, and the chat-template facts of a tokenizer folder.

With a Hugging Face `tokenizer.json` the session feeds token ids (RKLLM_INPUT_TOKEN) tokenized with the
`tokenizers` library; a folder without one (SentencePiece `tokenizer.model`, `vocab.json` + `merges.txt`,
...) is loaded with transformers when the optional `[hf]` extra is installed. Otherwise the prompt is fed
as text (the runtime tokenizes it) and accounted as one token per UTF-8 byte (what the simulator does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rkllama_ollama.runtime.base import InvalidInput

log = logging.getLogger(__name__)

# Tokenizer files that transformers can load when there is no tokenizer.json.
TRANSFORMERS_ONLY_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")


class PromptTokenizer(Protocol):
    feeds_tokens: bool  # True: feed ids as token input; False: feed text as prompt input

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...


def _check_ids(ids: list[int], vocab_size: int) -> None:
    outside = next((i for i in ids if not 0 <= i < vocab_size), None)
    if outside is not None:
        raise InvalidInput(f"token id {outside} is outside this model's vocabulary of {vocab_size} tokens")


class ByteTokenizer:
    """One token per UTF-8 byte."""

    feeds_tokens = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        _check_ids(ids, 256)
        return bytes(ids).decode("utf-8", "replace")

    def token_id(self, token: str) -> int | None:
        return None


class HfTokenizer:
    """A Hugging Face fast tokenizer (`tokenizers` library) read from tokenizer.json."""

    feeds_tokens = True

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer  # imported here: only runners of tokenized models need it

        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))

    def encode(self, text: str) -> list[int]:
        # The rendered prompt already carries BOS/special tokens where the template puts them.
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        _check_ids(ids, self._tokenizer.get_vocab_size(with_added_tokens=True))
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token) if token else None


class TransformersTokenizer:
    """A tokenizer that only transformers can load (no tokenizer.json: SentencePiece `tokenizer.model`,
    `vocab.json` + `merges.txt`, ...). Needs the optional `[hf]` extra; imported in the runner only.
    Remote code is never run: a tokenizer class that lives in the model repository is refused."""

    feeds_tokens = True

    def __init__(self, tokenizer_dir: Path) -> None:
        from transformers import AutoTokenizer  # optional: rkllama-ollama[hf]

        self._tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer_dir), local_files_only=True, trust_remote_code=False
        )

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        _check_ids(ids, len(self._tokenizer))
        return str(self._tokenizer.decode(ids, skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        if not token:
            return None
        found = self._tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int) or (
            found == self._tokenizer.unk_token_id and token != self._tokenizer.unk_token
        ):
            return None
        return found


def _transformers_tokenizer(tokenizer_dir: Path) -> PromptTokenizer:
    """The transformers tokenizer of `tokenizer_dir`, or the byte fallback (prompts fed as text) with
    one warning that says why."""
    try:
        return TransformersTokenizer(tokenizer_dir)
    except ImportError:
        log.warning(
            "tokenizer in %s has no tokenizer.json and transformers is not installed "
            "(pip install 'rkllama-ollama[hf]'): feeding prompts as text",
            tokenizer_dir,
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unloadable tokenizers
        log.warning(
            "tokenizer in %s could not be loaded with transformers (%s: %s): feeding prompts as text",
            tokenizer_dir,
            type(exc).__name__,
            exc,
        )
    return ByteTokenizer()


# The server's template for a model that relies on the chat template built into its .rkllm (runtime
# 1.2.0+, no tokenizer files): the runtime wraps each prompt in its own system prompt, prefix and postfix,
# one turn per run, so the conversation is folded into the text of that one user turn: system messages
# first, earlier turns as "Role: text" paragraphs, the last message as is.
RUNTIME_TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }}{{ '\n\n' }}"
    "{% elif loop.last %}{{ message.content }}"
    "{% else %}{{ message.role | capitalize }}: {{ message.content }}{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TemplateFacts:
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = False


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def read_template_facts(tokenizer_dir: Path) -> TemplateFacts:
    """chat_template / bos / eos from tokenizer_config.json, or chat_template.jinja."""
    config: dict[str, Any] = {}
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", config_path, exc)
    template = _pick_template(config.get("chat_template"))
    jinja_path = tokenizer_dir / "chat_template.jinja"
    if template is None and jinja_path.is_file():
        template = jinja_path.read_text(encoding="utf-8")
    json_path = tokenizer_dir / "chat_template.json"  # {"chat_template": ...}, what processors save
    if template is None and json_path.is_file():
        try:
            template = _pick_template(json.loads(json_path.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", json_path, exc)
    return TemplateFacts(
        chat_template=template,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        add_bos_token=False,  # the session never adds BOS: the rendered prompt carries it
    )


def resolve_tokenizer_dir(tokenizer_dir: str | None, model_path: str) -> Path | None:
    """The tokenizer folder: the given one, else `<model folder>/tokenizer` when it exists."""
    if tokenizer_dir:
        return Path(tokenizer_dir)
    fallback = Path(model_path).parent / "tokenizer"
    return fallback if fallback.is_dir() else None


def load_tokenizer(tokenizer_dir: Path | None) -> tuple[PromptTokenizer, TemplateFacts]:
    if tokenizer_dir is None:
        return ByteTokenizer(), TemplateFacts()
    facts = read_template_facts(tokenizer_dir)
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        return HfTokenizer(tokenizer_json), facts
    if any(path.is_file() for pattern in TRANSFORMERS_ONLY_FILES for path in tokenizer_dir.glob(pattern)):
        return _transformers_tokenizer(tokenizer_dir), facts
    log.info("no tokenizer.json in %s: feeding prompts as text", tokenizer_dir)
    return ByteTokenizer(), facts
