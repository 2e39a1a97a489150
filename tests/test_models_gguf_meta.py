from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from rkllama_ollama.models.gguf_meta import GGUFError, read_gguf, read_gguf_metadata  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def write_gguf(path: Path, *, big_endian: bool = False, vocab: int = 100) -> Path:
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_name("Tiny Test")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_uint8("test.u8", 7)
    writer.add_int32("test.i32", -5)
    writer.add_uint64("test.u64", 2**40)
    writer.add_float64("test.f64", 0.25)
    writer.add_bool("test.flag", True)
    writer.add_array("test.short", [1, 2, 3])
    writer.add_file_type(3)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    writer.add_token_scores([float(i) for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(vocab - 1)
    writer.add_chat_template(TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((64,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_reads_metadata(tmp_path: Path, big_endian: bool) -> None:
    header = read_gguf(write_gguf(tmp_path / "m.gguf", big_endian=big_endian))
    meta = header.metadata
    assert header.version == 3
    assert header.tensor_count == 2
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "Tiny Test"
    assert meta["llama.context_length"] == 512
    assert meta["llama.embedding_length"] == 64
    assert meta["test.u8"] == 7
    assert meta["test.i32"] == -5
    assert meta["test.u64"] == 2**40
    assert meta["test.f64"] == 0.25
    assert meta["test.flag"] is True
    assert meta["test.short"] == [1, 2, 3]
    assert meta["general.file_type"] == 3
    assert meta["tokenizer.chat_template"] == TEMPLATE
    assert meta["tokenizer.ggml.tokens"] == ["tok0", "tok1", "tok2", "tok3", "tok4"]
    assert meta["tokenizer.ggml.scores"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert header.array_lengths["tokenizer.ggml.tokens"] == 100
    assert header.array_lengths["test.short"] == 3
    assert header.parameter_count == 100 * 64 + 64
    assert header.special_tokens == {"bos": "tok1", "eos": "tok99"}


def test_metadata_only_and_item_limit(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    meta = read_gguf_metadata(path, max_array_items=2)
    assert meta["tokenizer.ggml.tokens"] == ["tok0", "tok1"]
    assert read_gguf(path, max_array_items=0).metadata["test.short"] == []


def test_large_vocabulary_is_walked_not_kept(tmp_path: Path) -> None:
    header = read_gguf(write_gguf(tmp_path / "m.gguf", vocab=50_000))
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 5
    assert header.array_lengths["tokenizer.ggml.tokens"] == 50_000
    assert header.special_tokens["eos"] == "tok49999"


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"RKLLM-SIM\nreply=hi\n")
    with pytest.raises(GGUFError, match="magic"):
        read_gguf(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])
    with pytest.raises(GGUFError):
        read_gguf_metadata(cut)


def test_implausible_string_length(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62))
    with pytest.raises(GGUFError, match="implausible"):
        read_gguf(path)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_garbage_after_magic_raises_gguf_error_only(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "g.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + tail)
    try:
        read_gguf(path)
    except GGUFError:
        pass


def test_whole_arrays_and_tensor_infos_when_asked(tmp_path: Path) -> None:
    """`max_array_items=None` keeps every array whole; `tensor_infos` lists name, ggml type and shape in
    file order, as the gguf package reads them."""
    path = write_gguf(tmp_path / "m.gguf", vocab=300)
    header = read_gguf(path, max_array_items=None, tensor_infos=True)
    assert header.metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(300)]
    assert header.metadata["tokenizer.ggml.scores"] == [float(i) for i in range(300)]
    reference = gguf.GGUFReader(str(path))
    assert [(t.name, t.type, list(t.shape)) for t in header.tensors] == [
        (t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in reference.tensors
    ]
    assert header.tensors[0].shape == (64, 300)  # token_embd: 300 rows of 64, fastest dimension first
    assert read_gguf(path).tensors == ()  # not kept unless asked
