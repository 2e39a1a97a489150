"""Build the RKLLM simulator and write simulator model folders for tests."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "native"
BUILD = NATIVE / "build"
SIM_VERSIONS = {"C": "1.1.4", "D": "1.2.0", "E": "1.2.1", "F": "1.3.0"}
FAMILIES = tuple(SIM_VERSIONS)


@cache
def build_simulators() -> dict[str, Path]:
    """`make -C native` once per test process; family letter -> library path."""
    subprocess.run(["make", "-s", "-C", str(NATIVE)], check=True, capture_output=True)
    libs = {family: BUILD / f"librkllmrt-sim-{version}.so" for family, version in SIM_VERSIONS.items()}
    for path in libs.values():
        assert path.is_file(), path
    return libs


def write_model(folder: Path, reply: str = "ok", tokenizer: Path | None = None, **keys: object) -> Path:
    """A RKLLM-SIM model file; `reply` newlines are written as \\n escapes. With `tokenizer` (a folder
    with tokenizer.json) the reply is tokenized with it: the simulator then generates those ids, as a
    real runtime emits ids of its model's vocabulary, and holds the end-of-turn token after them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["RKLLM-SIM", "reply=" + reply.replace("\\", "\\\\").replace("\n", "\\n")]
    if tokenizer is not None:
        keys = {**tokenized_reply_keys(tokenizer, reply), **keys}
    lines += [f"{key}={value}" for key, value in keys.items()]
    path = folder / "sim.rkllm"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def add_sim_model(
    store: Path,
    name: str,
    *,
    file_name: str = "sim.rkllm",
    tokenizer: bool | Path = False,
    modelfile: tuple[str, ...] = (),
    **keys: object,
) -> Path:
    """A store folder in the seed layout: a simulator model `file_name`, a Modelfile (`FROM` plus the
    `modelfile` lines), and with `tokenizer` the byte tokenizer (or a copy of the given tokenizer
    folder). `keys` go to the model (`write_model`)."""
    folder = store / name
    tokenizer_dir: Path | None = None
    if tokenizer:
        tokenizer_dir = folder / "tokenizer"
        if isinstance(tokenizer, Path):
            shutil.copytree(tokenizer, tokenizer_dir, dirs_exist_ok=True)
        else:
            write_byte_tokenizer(tokenizer_dir)
    path = write_model(folder, tokenizer=tokenizer_dir, **keys)
    if file_name != path.name:
        path = path.rename(folder / file_name)
    lines = [f'FROM="{file_name}"', *modelfile]
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2 style)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


EOS_TOKEN = "<|im_end|>"
EOS_ID = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_byte_tokenizer(folder: Path) -> Path:
    """A Hugging Face tokenizer whose ids are the UTF-8 bytes (like the simulator's output tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": EOS_TOKEN, "bos_token": {"content": ""}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for: byte-level BPE symbols mapped back, other tokens as UTF-8."""
    text = tokenizer.id_to_token(token_id)
    inverse = {char: byte for byte, char in _bytes_to_unicode().items()}
    if all(char in inverse for char in text):
        return bytes(inverse[char] for char in text)
    return str(text).encode("utf-8")


def tokenized_reply_keys(tokenizer_dir: Path, reply: str) -> dict[str, str]:
    """reply_ids / reply_pieces / eos_id of the simulator for `reply` under the folder's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token")
    eos_text = eos.get("content", "") if isinstance(eos, dict) else eos or ""
    eos_id = tokenizer.token_to_id(eos_text) if eos_text else None
    ids = tokenizer.encode(reply, add_special_tokens=False).ids
    return {
        "reply_ids": ",".join(str(i) for i in ids),
        "reply_pieces": ",".join(_token_bytes(tokenizer, i).hex() for i in ids),
        "eos_id": str(eos_id if eos_id is not None else -1),
    }


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VOCAB_SIZE = 151_643
_ENGLISH = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part sure here tell me weather question answer story help thanks think know good"
).split()


@cache
def _qwen_size_tokenizer_json(vocab_size: int) -> str:
    """Train (deterministically, a few seconds) a byte-level BPE of `vocab_size` tokens on synthetic text:
    English words plus made-up words, so merges fill a Qwen-size vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(7)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
    words: set[str] = set()
    while len(words) < vocab_size * 4 // 5:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))))
    made_up = sorted(words)

    def corpus() -> Any:
        for start in range(0, len(made_up), 50):
            yield " ".join(made_up[start : start + 50])
        for _ in range(2000):
            yield " ".join(rng.choice(_ENGLISH) for _ in range(20)) + ". Question 12: tell me more, 3/4!"

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return str(tokenizer.to_str())


def write_qwen_size_tokenizer(folder: Path, vocab_size: int = QWEN_VOCAB_SIZE) -> Path:
    """A ChatML tokenizer folder with a byte-level BPE of Qwen's vocabulary size (no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_qwen_size_tokenizer_json(vocab_size), encoding="utf-8")
    config = {"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
