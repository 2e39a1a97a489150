"""Every key of an RKLLama Modelfile is read: parsed, typed, written back, and mapped to the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllama_ollama.models.modelfile import Modelfile, parse_modelfile
from rkllama_ollama.runtime.rkllm.params import load_params

# RKLLama's pull-generated Modelfile (create_modelfile): upper-case keys, bare numbers, Python booleans.
RKLLAMA_TEXT = """FROM="Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm"

HUGGINGFACE_PATH="Qwen/Qwen3-1.7B"

SYSTEM="You are a helpful assistant."

TEMPERATURE=0.5

ENABLE_THINKING=False

NUM_CTX=4096

MAX_NEW_TOKENS=1024

TOP_K=7

TOP_P=0.5

REPEAT_PENALTY=1.1

FREQUENCY_PENALTY=0.2

PRESENCE_PENALTY=0.3

MIROSTAT=2

MIROSTAT_TAU=3.0

MIROSTAT_ETA=0.2

SYSTEM_PROMPT="<|im_start|>system\\nBe brief.<|im_end|>\\n"

PROMPT_PREFIX="<|im_start|>user\\n"

PROMPT_POSTFIX="<|im_end|>\\n<|im_start|>assistant\\n"

TOKENIZER="/opt/tokenizers/qwen3"

IMAGE_WIDTH=448
"""


def test_every_key_rkllama_writes_is_read() -> None:
    mf = parse_modelfile(RKLLAMA_TEXT)
    assert mf.from_ == "Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm"
    assert mf.huggingface_path == "Qwen/Qwen3-1.7B"
    assert mf.system == "You are a helpful assistant."
    assert mf.parameters == {
        "temperature": 0.5,
        "num_ctx": 4096,
        "num_predict": 1024,
        "top_k": 7,
        "top_p": 0.5,
        "repeat_penalty": 1.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
    }
    assert mf.enable_thinking() is False
    assert mf.rkllm_parameters() == {"mirostat": "2", "mirostat_tau": "3.0", "mirostat_eta": "0.2"}
    assert mf.runtime_template() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n",
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    )
    assert mf.tokenizer_path() == "/opt/tokenizers/qwen3"
    assert mf.extra_value("image_width") == "448"  # vision keys are kept (and written back)


def test_rkllama_keys_reach_the_rkllm_load_parameters() -> None:
    mf = parse_modelfile(RKLLAMA_TEXT)
    load = load_params({**mf.rkllm_parameters(), **mf.parameters}, 4096)
    assert (load.mirostat, load.mirostat_tau, load.mirostat_eta) == (2, 3.0, pytest.approx(0.2))
    assert load.max_new_tokens == 1024
    sampling = load.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.5, 7, 0.5)
    assert (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) == (1.1, 0.2, 0.3)


def test_written_back_the_store_keeps_every_rkllama_key() -> None:
    mf = parse_modelfile(RKLLAMA_TEXT)
    again = parse_modelfile(mf.to_seed_text())
    assert again == mf
    assert again.runtime_template() == mf.runtime_template() and again.enable_thinking() is False


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("True", True),
        ("true", True),
        ("1", True),
        ("False", False),
        ("no", False),
        ("maybe", None),
        ("", None),
    ],
)
def test_enable_thinking_values(written: str, expected: bool | None) -> None:
    assert parse_modelfile(f"ENABLE_THINKING={written}\n").enable_thinking() is expected


def test_runtime_template_needs_all_three_pieces() -> None:
    assert parse_modelfile('SYSTEM_PROMPT=""\nPROMPT_PREFIX="U:"\n').runtime_template() is None
    assert parse_modelfile(
        'SYSTEM_PROMPT=""\nPROMPT_PREFIX="U:"\nPROMPT_POSTFIX="A:"\n'
    ).runtime_template() == (
        "",
        "U:",
        "A:",
    )


_floats = st.floats(min_value=0, max_value=100, allow_nan=False).map(lambda f: round(f, 4))
_ints = st.integers(min_value=0, max_value=1 << 20)
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    temperature=_floats,
    top_p=_floats,
    top_k=_ints,
    num_ctx=_ints,
    max_new_tokens=_ints,
    mirostat=st.integers(min_value=0, max_value=2),
    tau=_floats,
    thinking=st.booleans(),
    system=_text,
    repo=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}/[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    lower=st.booleans(),
)
def test_rkllama_modelfiles_parse_to_what_was_written(
    temperature: float,
    top_p: float,
    top_k: int,
    num_ctx: int,
    max_new_tokens: int,
    mirostat: int,
    tau: float,
    thinking: bool,
    system: str,
    repo: str,
    lower: bool,
) -> None:
    """RKLLama's writer: `KEY="text"` for strings (escaped like Python's repr would not be: it writes raw),
    bare `KEY=value` for numbers and booleans; keys in either case."""
    escaped = system.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    lines = {
        "FROM": '"model.rkllm"',
        "HUGGINGFACE_PATH": f'"{repo}"',
        "SYSTEM": f'"{escaped}"',
        "TEMPERATURE": repr(temperature),
        "TOP_P": repr(top_p),
        "TOP_K": str(top_k),
        "NUM_CTX": str(num_ctx),
        "MAX_NEW_TOKENS": str(max_new_tokens),
        "MIROSTAT": str(mirostat),
        "MIROSTAT_TAU": repr(tau),
        "ENABLE_THINKING": str(thinking),
    }
    text = "\n\n".join(f"{key.lower() if lower else key}={value}" for key, value in lines.items()) + "\n"
    mf = parse_modelfile(text)
    assert mf.from_ == "model.rkllm" and mf.huggingface_path == repo and mf.system == system
    params = mf.parameters
    assert math.isclose(params["temperature"], temperature) and math.isclose(params["top_p"], top_p)
    assert (params["top_k"], params["num_ctx"], params["num_predict"]) == (top_k, num_ctx, max_new_tokens)
    assert mf.enable_thinking() is thinking
    load = load_params({**mf.rkllm_parameters(), **params}, 4096)
    assert load.mirostat == mirostat and math.isclose(load.mirostat_tau, tau, rel_tol=1e-6)
    assert parse_modelfile(mf.to_seed_text()) == mf


def test_store_honours_the_legacy_tokenizer_key(tmp_path: Path) -> None:
    from rkllama_ollama.models.store import Store
    from tests.rkllm_support.sim import write_byte_tokenizer, write_model

    tokenizer = write_byte_tokenizer(tmp_path / "elsewhere" / "tok")
    folder = tmp_path / "models" / "m"
    write_model(folder)
    (folder / "Modelfile").write_text(f'FROM="sim.rkllm"\nTOKENIZER="{tokenizer}"\n', encoding="utf-8")
    entry = Store(tmp_path / "models", offer_embedded=False).resolve("m")
    assert entry.tokenizer_dir == tokenizer and entry.chat_template


def test_a_modelfile_without_rkllama_keys_has_no_rkllama_settings() -> None:
    mf = Modelfile(from_="x.rkllm")
    assert mf.rkllm_parameters() == {} and mf.enable_thinking() is None
    assert mf.runtime_template() is None and mf.tokenizer_path() is None


def _entry(tmp_path: Path, modelfile: str, name: str = "m") -> object:
    from rkllama_ollama.models.store import Store
    from tests.rkllm_support.sim import write_model

    folder = tmp_path / "models" / name
    path = write_model(folder)
    path.rename(folder / "Qwen3-1.7B-rk3588-w8a8.rkllm")
    (folder / "Modelfile").write_text(modelfile, encoding="utf-8")
    return Store(tmp_path / "models", offer_embedded=False).resolve(name)


def test_generator_maps_rkllama_keys_into_the_load_and_the_think_default(tmp_path: Path) -> None:
    from rkllama_ollama.generation import Generator
    from rkllama_ollama.generation_plan import default_think
    from rkllama_ollama.models.store import ModelEntry

    entry = _entry(
        tmp_path,
        RKLLAMA_TEXT.replace("Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0", "Qwen3-1.7B-rk3588-w8a8"),
    )
    assert isinstance(entry, ModelEntry)
    generator = Generator(None, default_num_ctx=8192, num_threads=0)  # type: ignore[arg-type]
    spec = generator.load_spec(entry, {})
    assert spec.num_ctx == 4096 and spec.params["mirostat"] == "2" and spec.params["mirostat_tau"] == "3.0"
    assert spec.params["num_predict"] == 1024 and spec.params["temperature"] == 0.5
    assert default_think(entry) is False  # ENABLE_THINKING=False, though Qwen3 can think
    thinking = _entry(tmp_path, RKLLAMA_TEXT.replace("ENABLE_THINKING=False", "ENABLE_THINKING=True"), "t")
    assert default_think(thinking) is True  # type: ignore[arg-type]
    unset = _entry(tmp_path, RKLLAMA_TEXT.replace("ENABLE_THINKING=False", ""), "u")
    assert default_think(unset) is None  # type: ignore[arg-type]  # no template: cannot think


def test_multi_batch_asks_rkllm_loads_for_n_batch_copies_only_when_switched_on(tmp_path: Path) -> None:
    from rkllama_ollama.generation import Generator
    from rkllama_ollama.models.store import ModelEntry
    from rkllama_ollama.residency import estimated_bytes

    entry = _entry(tmp_path, 'FROM="Qwen3-1.7B-rk3588-w8a8.rkllm"\n')
    assert isinstance(entry, ModelEntry)
    off = Generator(None, default_num_ctx=4096, num_threads=0, num_parallel=4)  # type: ignore[arg-type]
    on = Generator(None, default_num_ctx=4096, num_threads=0, num_parallel=4, rkllm_multi_batch=True)  # type: ignore[arg-type]
    wide = Generator(None, default_num_ctx=4096, num_threads=0, num_parallel=12, rkllm_multi_batch=True)  # type: ignore[arg-type]
    assert off.load_spec(entry, {}).parallel == 1
    assert on.load_spec(entry, {}).parallel == 4
    assert wide.load_spec(entry, {}).parallel == 8  # the vendor's recommended n_batch at most
    # residency counts one KV cache per batch element
    assert estimated_bytes(entry, on.load_spec(entry, {})) > estimated_bytes(entry, off.load_spec(entry, {}))
