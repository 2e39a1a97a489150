"""After Open WebUI-style background requests, the last streamed conversation is fed back into the KV
cache while the session is idle, so the next message only feeds what is new (tiny GGUF, live daemon)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import ollama

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon

RESTORED = re.compile(r"conversation restored in the cache model=tiny:latest: (\d+) tokens fed")
OPTIONS = {"num_predict": 6, "seed": 2, "temperature": 0}


def wait_for_log(daemon: Daemon, pattern: re.Pattern[str], count: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.findall(daemon.log())
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern.pattern!r} in the log:\n{daemon.log()[-3000:]}")


def test_the_next_message_after_background_requests_feeds_only_what_is_new(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", context_length=4096)
    history = [{"role": "user", "content": "tell me about the water and the people " * 8}]
    with Daemon(store).start() as daemon:
        client = ollama.Client(host=daemon.url)
        reply = "".join(
            part.message.content or ""
            for part in client.chat("tiny", messages=history, options=OPTIONS, stream=True)
        )
        # Open WebUI's title, then its follow-ups: non-streamed, unrelated prompts.
        client.generate("tiny", prompt="### Task: Generate a concise title " * 5, options=OPTIONS)
        client.generate("tiny", prompt="### Task: Suggest follow-up questions " * 5, options=OPTIONS)
        (restored,) = wait_for_log(daemon, RESTORED, 1)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        final = list(client.chat("tiny", messages=history, options=OPTIONS, stream=True))[-1]
        assert final.prompt_eval_count is not None
        # Without the restore the whole conversation (more than the restored part) would be fed again.
        assert 0 < final.prompt_eval_count < int(restored) // 2
        # A streamed request never triggers a restore: the cache already holds its conversation.
        assert len(RESTORED.findall(daemon.log())) == 1
