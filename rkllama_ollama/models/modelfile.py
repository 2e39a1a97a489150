"""Modelfiles: the seed's ``KEY=value`` format and Ollama's instruction format, read and written.

Seed format (RKLLama, dotenv style), one assignment per line::

    FROM="Qwen2.5-3B-Instruct-rk3588-w8a8-opt-0-hybrid-ratio-0.5.rkllm"
    HUGGINGFACE_PATH="Qwen/Qwen2.5-3B-Instruct"
    SYSTEM="You are a helpful assistant."
    TEMPERATURE=0.8

Values are bare (to the end of the line, a `` #`` starts a comment), single-quoted (literal) or
double-quoted (escapes ``\\\\ \\" \\n \\r \\t``; may span lines). ``export KEY=value`` is accepted.
Known option keys map to Ollama option names (``MAX_NEW_TOKENS`` -> ``num_predict``, ``NUM_CTX`` /
``CONTEXT_LENGTH`` -> ``num_ctx``, ``TOP_K`` -> ``top_k``, ...); other keys land in `Modelfile.extra`
unchanged, and RKLLama's own (``ENABLE_THINKING``, ``MIROSTAT*``, ``SYSTEM_PROMPT`` / ``PROMPT_PREFIX`` /
``PROMPT_POSTFIX``, ``TOKENIZER``) are read from there by `Modelfile`'s accessors. Repeated ``STOP``,
``ADAPTER`` and ``MESSAGE="role: text"`` lines accumulate (the seed
itself keeps only the last one, and ignores these keys).

Ollama format: ``FROM x``, ``PARAMETER key value`` (``stop`` repeatable), ``SYSTEM``, ``TEMPLATE``,
``ADAPTER``, ``LICENSE``, ``MESSAGE role text``; instructions are case-insensitive; values are bare,
``"quoted"`` or ``\"\"\"multi-line\"\"\"``; inside quotes ``\\"`` and ``\\\\`` are escapes and any other
backslash is literal; lines starting with ``#`` are comments. Unknown PARAMETER keys land in `extra`.

Each line is read in whichever format it is written in, so a file may mix both.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Ollama's current options and their types: the one table, also used to
# validate request `options` (rkllama_ollama/options.py). Removed keys (numa, low_vram, mirostat, ...)
# are deliberately absent: clients still send them and they must be ignored, not type-checked.
INT_OPTIONS = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
    }
)
FLOAT_OPTIONS = frozenset(
    {
        "top_p",
        "min_p",
        "typical_p",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)
BOOL_OPTIONS = frozenset({"use_mmap"})
LIST_OPTIONS = frozenset({"stop"})
KNOWN_OPTIONS = INT_OPTIONS | FLOAT_OPTIONS | BOOL_OPTIONS | LIST_OPTIONS

# seed key -> Ollama option, where the names differ
SEED_ALIASES = {"MAX_NEW_TOKENS": "num_predict", "CONTEXT_LENGTH": "num_ctx"}
# Ollama option -> the seed key we write for it
SEED_NAMES = {"num_predict": "MAX_NEW_TOKENS", "num_ctx": "NUM_CTX"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# Keys of RKLLama's Modelfiles that are not Ollama options. They stay in `Modelfile.extra` as written
# (so a store written by RKLLama is written back unchanged) and are read through the accessors below:
# RKLLMParam settings of the runtime, the thinking default, the runtime's chat-template pieces (what
# `rkllm_set_chat_template` takes) and the legacy absolute tokenizer path.
RKLLM_PARAMETER_KEYS = (
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "n_keep",
    "embed_flash",
    "enabled_cpus_mask",
    "base_domain_id",
)
THINKING_KEY = "ENABLE_THINKING"
RUNTIME_TEMPLATE_KEYS = ("SYSTEM_PROMPT", "PROMPT_PREFIX", "PROMPT_POSTFIX")
TOKENIZER_KEY = "TOKENIZER"
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")

_SEED_LINE_RE = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=")
_OLLAMA_LINE_RE = re.compile(r"[ \t]*([A-Za-z]+)(?=[ \t\r\n]|\Z)")
_SEED_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t\r\f\v"
_BARE_SAFE_RE = re.compile(r"[^\s\"\\#=]([^\n\r\"\\]*[^\s\"\\])?")


class ModelfileError(ValueError):
    """A Modelfile could not be parsed. The message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Modelfile line {line}: {message}")
        self.line = line


@dataclass
class Modelfile:
    from_: str = ""
    system: str | None = None
    template: str | None = None
    license: str | None = None
    huggingface_path: str | None = None
    # A vision model's image encoder / projector file: the seed's VISION_ENCODER= or Ollama's second FROM.
    projector: str | None = None
    adapters: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # [{"role": ..., "content": ...}]
    parameters: dict[str, Any] = field(default_factory=dict)  # Ollama option names, typed per option
    extra: dict[str, str] = field(default_factory=dict)  # unknown keys, as written

    @classmethod
    def parse(cls, text: str) -> Modelfile:
        return parse_modelfile(text)

    def extra_value(self, key: str) -> str | None:
        """The value of an `extra` key, matched case-insensitively (RKLLama writes upper case)."""
        wanted = key.lower()
        found = [value for name, value in self.extra.items() if name.lower() == wanted]
        return found[-1] if found else None

    def rkllm_parameters(self) -> dict[str, str]:
        """RKLLama's runtime keys (MIROSTAT, MIROSTAT_TAU, MIROSTAT_ETA, N_KEEP, ...) as lower-case names
        and raw values, for the RKLLM engine's load parameters."""
        out: dict[str, str] = {}
        for key in RKLLM_PARAMETER_KEYS:
            value = self.extra_value(key)
            if value is not None and value.strip():
                out[key] = value.strip()
        return out

    def enable_thinking(self) -> bool | None:
        """ENABLE_THINKING: the model's default for Ollama's `think` (None: not set or not a boolean)."""
        value = self.extra_value(THINKING_KEY)
        if value is None:
            return None
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        log.warning("ignoring Modelfile %s=%r: not a boolean", THINKING_KEY, value)
        return None

    def runtime_template(self) -> tuple[str, str, str] | None:
        """(SYSTEM_PROMPT, PROMPT_PREFIX, PROMPT_POSTFIX) when all three are set, like RKLLama requires."""
        values = [self.extra_value(key) for key in RUNTIME_TEMPLATE_KEYS]
        if any(value is None for value in values):
            return None
        system, prefix, postfix = (value or "" for value in values)
        return system, prefix, postfix

    def tokenizer_path(self) -> str | None:
        """TOKENIZER: RKLLama's legacy absolute path of a tokenizer folder."""
        value = self.extra_value(TOKENIZER_KEY)
        return value.strip() if value and value.strip() else None

    def to_seed_text(self) -> str:
        """The seed's ``KEY="value"`` format: what the store writes (RKLLama reads it too)."""
        lines: list[str] = []
        if self.from_:
            lines.append(f"FROM={_seed_quote(self.from_)}")
        if self.projector is not None:
            lines.append(f"VISION_ENCODER={_seed_quote(self.projector)}")
        if self.huggingface_path is not None:
            lines.append(f"HUGGINGFACE_PATH={_seed_quote(self.huggingface_path)}")
        for key, value in (("SYSTEM", self.system), ("TEMPLATE", self.template), ("LICENSE", self.license)):
            if value is not None:
                lines.append(f"{key}={_seed_quote(value)}")
        for option, value in self.parameters.items():
            key = SEED_NAMES.get(option, option.upper())
            if option in LIST_OPTIONS:
                lines.extend(f"{key}={_seed_quote(item)}" for item in value)
            else:
                lines.append(f"{key}={_seed_scalar(value)}")
        lines.extend(f"ADAPTER={_seed_quote(adapter)}" for adapter in self.adapters)
        lines.extend(f"MESSAGE={_seed_quote(m['role'] + ': ' + m['content'])}" for m in self.messages)
        for key, raw in self.extra.items():
            if _SEED_KEY_RE.fullmatch(key) is None:
                log.warning("modelfile extra key %r cannot be written in the seed format; dropped", key)
                continue
            lines.append(f"{key}={_seed_quote(raw)}")
        return "".join(line + "\n" for line in lines)

    def to_ollama_text(self) -> str:
        """Ollama's instruction format (for ``/api/show``'s ``modelfile``)."""
        lines: list[str] = []
        if self.from_:
            lines.append(f"FROM {_ollama_value(self.from_)}")
            if self.projector is not None:
                lines.append(f"FROM {_ollama_value(self.projector)}")
        for key, value in (("TEMPLATE", self.template), ("SYSTEM", self.system)):
            if value is not None:
                lines.append(f"{key} {_ollama_value(value)}")
        for option, value in self.parameters.items():
            items = value if option in LIST_OPTIONS else [value]
            lines.extend(f"PARAMETER {option} {_ollama_value(_scalar_text(item))}" for item in items)
        for key, raw in self.extra.items():
            if key and not any(c.isspace() for c in key) and not key.startswith(("'", '"')):
                lines.append(f"PARAMETER {key} {_ollama_value(raw)}")
        lines.extend(f"ADAPTER {_ollama_value(adapter)}" for adapter in self.adapters)
        if self.license is not None:
            lines.append(f"LICENSE {_ollama_value(self.license)}")
        lines.extend(f"MESSAGE {m['role']} {_ollama_value(m['content'])}" for m in self.messages)
        if self.huggingface_path is not None:
            lines.append(f"# HUGGINGFACE_PATH {self.huggingface_path}")
        return "".join(line + "\n" for line in lines)


# --- typed option values ---------------------------------------------------------------------------


def convert_option(option: str, raw: str, line: int) -> Any:
    """Convert the text of a known option to its type. Raises ModelfileError."""
    text = raw.strip()
    try:
        if option in INT_OPTIONS:
            try:
                return int(text)
            except ValueError:
                return int(float(text))  # ints accept any number; floats are truncated
        if option in FLOAT_OPTIONS:
            return float(text)
        if option in BOOL_OPTIONS:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
    except (ValueError, OverflowError):
        kind = (
            "an integer" if option in INT_OPTIONS else "a number" if option in FLOAT_OPTIONS else "a boolean"
        )
        raise ModelfileError(line, f"parameter {option!r} must be {kind}, got {text[:40]!r}") from None
    return raw


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- writers ---------------------------------------------------------------------------------------


def _seed_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _seed_scalar(value: Any) -> str:
    if isinstance(value, (bool, int, float)):
        return _scalar_text(value)
    return _seed_quote(str(value))


def _ollama_value(value: str) -> str:
    if _BARE_SAFE_RE.fullmatch(value) and value == value.strip():
        return value
    out: list[str] = []
    last = len(value) - 1
    for i, char in enumerate(value):
        following = value[i + 1] if i < last else ""
        if char == "\\" and following in ("\\", '"', ""):
            out.append("\\\\")
        elif char == '"' and following in ('"', ""):
            out.append('\\"')
        else:
            out.append(char)
    return '"""' + "".join(out) + '"""'


# --- parser ----------------------------------------------------------------------------------------


class _Cursor:
    """Walks the text; keeps the 1-based line number of the position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def line_at(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def rest_of_line(self) -> str:
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end < 0 else end
        chunk = self.text[self.pos : end]
        self.pos = end + 1
        return chunk

    def skip_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _BLANK:
            self.pos += 1


def parse_modelfile(text: str) -> Modelfile:
    """Parse a Modelfile in either format. Raises `ModelfileError` (with a line number) on bad input."""
    if not isinstance(text, str):
        raise ModelfileError(1, "Modelfile must be text")
    result = Modelfile()
    cursor = _Cursor(text)
    while not cursor.done():
        start = cursor.pos
        line_no = cursor.line_at(start)
        cursor.skip_blanks()
        if cursor.done():
            break
        if text[cursor.pos] in "#\n":
            cursor.rest_of_line()
            continue
        seed = _SEED_LINE_RE.match(text, start)
        if seed is not None:
            cursor.pos = seed.end()
            value = _read_seed_value(cursor, line_no)
            _apply_seed(result, seed.group(1), value, line_no)
            continue
        command = _OLLAMA_LINE_RE.match(text, start)
        if command is None:
            raise ModelfileError(
                line_no, "expected an instruction (FROM, PARAMETER, SYSTEM, ...) or KEY=value"
            )
        cursor.pos = command.end()
        _apply_ollama(result, command.group(1).upper(), cursor, line_no)
    return result


def _read_seed_value(cursor: _Cursor, line_no: int) -> str:
    cursor.skip_blanks()
    text = cursor.text
    if cursor.done() or text[cursor.pos] == "\n":
        cursor.rest_of_line()
        return ""
    quote = text[cursor.pos]
    if quote == "'":
        end = text.find("'", cursor.pos + 1)
        if end < 0:
            raise ModelfileError(line_no, "unterminated single-quoted value")
        value = text[cursor.pos + 1 : end]
        cursor.pos = end + 1
        _expect_line_end(cursor, line_no, allow_comment=True)
        return value
    if quote == '"':
        value = _read_escaped(cursor, line_no, closing='"', seed_escapes=True)
        _expect_line_end(cursor, line_no, allow_comment=True)
        return value
    raw = cursor.rest_of_line()
    comment = re.search(r"[ \t]#", raw)
    if comment is not None:
        raw = raw[: comment.start()]
    return raw.strip(_BLANK)


_SEED_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def _read_escaped(cursor: _Cursor, line_no: int, *, closing: str, seed_escapes: bool) -> str:
    """Read a quoted value whose opening quote is at the cursor; stops after `closing`."""
    text = cursor.text
    pos = cursor.pos + len(closing)
    out: list[str] = []
    while True:
        if pos >= len(text):
            raise ModelfileError(line_no, f"unterminated quoted value (missing {closing})")
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            following = text[pos + 1]
            if seed_escapes and following in _SEED_ESCAPES:
                out.append(_SEED_ESCAPES[following])
                pos += 2
                continue
            if not seed_escapes and following in ('"', "\\"):
                out.append(following)
                pos += 2
                continue
        if text.startswith(closing, pos):
            cursor.pos = pos + len(closing)
            return "".join(out)
        if char == "\n" and closing == '"' and not seed_escapes:
            raise ModelfileError(line_no, 'unterminated quoted value (missing ")')
        out.append(char)
        pos += 1


def _expect_line_end(cursor: _Cursor, line_no: int, *, allow_comment: bool) -> None:
    trailing = cursor.rest_of_line()
    stripped = trailing.strip(_BLANK)
    if stripped and not (allow_comment and stripped.startswith("#")):
        raise ModelfileError(line_no, f"unexpected text after the closing quote: {stripped[:40]!r}")


def _read_ollama_value(cursor: _Cursor, line_no: int) -> str:
    cursor.skip_blanks()
    text = cursor.text
    if cursor.done() or text[cursor.pos] == "\n":
        raise ModelfileError(line_no, "missing value")
    if text.startswith('"""', cursor.pos):
        value = _read_escaped(cursor, line_no, closing='"""', seed_escapes=False)
        _expect_line_end(cursor, line_no, allow_comment=False)
        return value
    if text[cursor.pos] == '"':
        value = _read_escaped(cursor, line_no, closing='"', seed_escapes=False)
        _expect_line_end(cursor, line_no, allow_comment=False)
        return value
    return cursor.rest_of_line().strip(_BLANK)


def _read_word(cursor: _Cursor, line_no: int, what: str) -> str:
    cursor.skip_blanks()
    match = re.compile(r"[^\s]+").match(cursor.text, cursor.pos)
    if match is None:
        raise ModelfileError(line_no, f"missing {what}")
    cursor.pos = match.end()
    return match.group(0)


def _apply_ollama(result: Modelfile, command: str, cursor: _Cursor, line_no: int) -> None:
    if command == "PARAMETER":
        key = _read_word(cursor, line_no, "parameter name")
        value = _read_ollama_value(cursor, line_no)
        _set_parameter(result, key.lower() if key.lower() in KNOWN_OPTIONS else key, value, line_no)
    elif command == "MESSAGE":
        role = _read_word(cursor, line_no, "message role").lower()
        if role not in MESSAGE_ROLES:
            raise ModelfileError(line_no, f"message role must be one of {', '.join(MESSAGE_ROLES)}")
        result.messages.append({"role": role, "content": _read_ollama_value(cursor, line_no)})
    elif command in ("FROM", "SYSTEM", "TEMPLATE", "LICENSE", "ADAPTER"):
        _set_field(result, command, _read_ollama_value(cursor, line_no))
    else:
        raise ModelfileError(
            line_no,
            f"unknown instruction {command!r}: must be FROM, PARAMETER, SYSTEM, TEMPLATE, ADAPTER, "
            "LICENSE or MESSAGE (or KEY=value)",
        )


def _set_field(result: Modelfile, key: str, value: str) -> None:
    if key == "FROM":
        if result.from_ and result.projector is None:
            result.projector = value  # Ollama: a second FROM names the projector (vision encoder)
        else:
            result.from_ = value
    elif key == "SYSTEM":
        result.system = value
    elif key == "TEMPLATE":
        result.template = value
    elif key == "LICENSE":
        result.license = value if result.license is None else f"{result.license}\n{value}"
    elif key == "ADAPTER":
        result.adapters.append(value)


def _set_parameter(result: Modelfile, option: str, raw: str, line_no: int) -> None:
    if option in LIST_OPTIONS:
        result.parameters.setdefault(option, []).append(raw)
    elif option in KNOWN_OPTIONS:
        result.parameters[option] = convert_option(option, raw, line_no)
    else:
        result.extra[option] = raw


def _apply_seed(result: Modelfile, key: str, value: str, line_no: int) -> None:
    upper = key.upper()
    if upper in ("FROM", "SYSTEM", "TEMPLATE", "LICENSE", "ADAPTER"):
        _set_field(result, upper, value)
    elif upper == "HUGGINGFACE_PATH":
        result.huggingface_path = value
    elif upper == "VISION_ENCODER":
        result.projector = value
    elif upper == "MESSAGE":
        role, sep, content = value.partition(":")
        if not sep or role.strip().lower() not in MESSAGE_ROLES:
            raise ModelfileError(line_no, 'MESSAGE must look like "role: text"')
        result.messages.append({"role": role.strip().lower(), "content": content.removeprefix(" ")})
    elif upper in SEED_ALIASES:
        _set_parameter(result, SEED_ALIASES[upper], value, line_no)
    elif upper.lower() in KNOWN_OPTIONS:
        _set_parameter(result, upper.lower(), value, line_no)
    else:
        result.extra[key] = value
