"""Build the RKLLM simulator and write simulator model folders for tests."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path

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


def write_model(folder: Path, reply: str = "ok", **keys: object) -> Path:
    """A RKLLM-SIM model file; `reply` newlines are written as \\n escapes."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["RKLLM-SIM", "reply=" + reply.replace("\\", "\\\\").replace("\n", "\\n")]
    lines += [f"{key}={value}" for key, value in keys.items()]
    path = folder / "sim.rkllm"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def add_sim_model(
    store: Path,
    name: str,
    *,
    file_name: str = "sim.rkllm",
    tokenizer: bool = False,
    modelfile: tuple[str, ...] = (),
    **keys: object,
) -> Path:
    """A store folder in the seed layout: a simulator model `file_name`, a Modelfile (`FROM` plus the
    `modelfile` lines), and with `tokenizer` the byte tokenizer. `keys` go to the model (`write_model`)."""
    folder = store / name
    path = write_model(folder, **keys)
    if file_name != path.name:
        path = path.rename(folder / file_name)
    lines = [f'FROM="{file_name}"', *modelfile]
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if tokenizer:
        write_byte_tokenizer(folder / "tokenizer")
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
