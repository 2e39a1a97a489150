"""A local Hugging Face cache made by the test, and a small Llama-3-style tokenizer to put in it.

The cache layout is huggingface_hub's: ``<HF_HOME>/hub/models--<org>--<name>/refs/main`` holds the
commit hash, ``snapshots/<hash>/<file>`` the files (huggingface_hub links them to ``blobs/``; plain
files read the same).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.rkllm_support.sim import _bytes_to_unicode

COMMIT = "0123456789abcdef0123456789abcdef01234567"

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# A Llama-3-style chat template (header tokens around the role, <|eot_id|> after each turn), written here.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def cache_repo_folder(hf_home: Path, repo_id: str) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def write_cached_repo(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Put `files` in the cache as the `main` snapshot of `repo_id`; returns the snapshot folder."""
    repo = cache_repo_folder(hf_home, repo_id)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def llama3_tokenizer_files() -> dict[str, bytes]:
    """tokenizer.json (byte-level BPE, one id per byte, Llama-3 special tokens as single ids) and a
    tokenizer_config.json carrying the Llama-3-style chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in LLAMA3_SPECIALS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
    }


def vocab_merges_tokenizer_files(chat_template: str = LLAMA3_TEMPLATE) -> dict[str, bytes]:
    """A tokenizer with no tokenizer.json: GPT-2-style `vocab.json` + `merges.txt` (one id per byte, the
    Llama-3 specials after them), which only transformers can load."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for offset, token in enumerate(LLAMA3_SPECIALS):
        vocab[token] = 256 + offset
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "unk_token": "<|eot_id|>",
        "additional_special_tokens": list(LLAMA3_SPECIALS),
        "chat_template": chat_template,
    }
    return {
        "vocab.json": json.dumps(vocab).encode(),
        "merges.txt": b"#version: 0.2\n",
        "tokenizer_config.json": json.dumps(config).encode(),
    }
