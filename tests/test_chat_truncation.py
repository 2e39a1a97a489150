"""A conversation that outgrows the context: the oldest messages go first (Ollama's `truncate`, on by
default), system messages and the last message stay. Unit tests of `fit_messages` with a text-length
tokenizer, then a live daemon on the tiny GGUF."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ollama
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.generation import fit_messages
from tests.conftest import make_gguf_model
from tests.support.inprocess_daemon import InProcessDaemon


def render(messages: list[dict[str, Any]]) -> str:
    return "".join(f"[{m['role']}]{m['content']}" for m in messages)


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return [0] * len(text)


def fit(messages: list[dict[str, Any]], limit: int, counter: Counter | None = None) -> str:
    return asyncio.run(fit_messages(messages, render, counter or Counter(), limit))


def msg(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


CHAT = [
    msg("system", "be brief"),
    msg("user", "a" * 40),
    msg("assistant", "b" * 40),
    msg("user", "c" * 40),
    msg("assistant", "d" * 40),
    msg("user", "e" * 10),
]


def test_a_conversation_that_fits_is_untouched_and_short_ones_are_not_even_tokenized() -> None:
    counter = Counter()
    assert fit(CHAT, 10_000, counter) == render(CHAT)
    assert counter.calls == 0


class PictureCounter(Counter):
    """A vision runner's count: each `<image>` tag takes `cells` positions, the rest one per byte."""

    def __init__(self, cells: int) -> None:
        super().__init__()
        self.cells = cells

    async def __call__(self, text: str) -> list[int]:
        self.calls += 1
        tags = text.count("<image>")
        return [0] * (len(text) - tags * len("<image>")) + [-1] * (tags * self.cells)


def test_a_short_prompt_with_pictures_is_tokenized_and_loses_its_oldest_pictures() -> None:
    chat = [
        msg("user", "<image>one"),
        msg("assistant", "a"),
        msg("user", "<image>two"),
        msg("assistant", "b"),
        msg("user", "<image>three"),
    ]
    assert len(render(chat)) < 100  # the byte-length shortcut alone would keep everything
    counter = PictureCounter(cells=30)
    kept = fit(chat, 100, counter)
    assert counter.calls > 0
    assert kept == render(chat[2:])  # two pictures (60) and their text fit in 100, three (90) do not
    assert fit(chat, 10_000, PictureCounter(cells=30)) == render(chat)


def test_the_oldest_messages_go_first_and_the_system_prompt_stays() -> None:
    kept = fit(CHAT, 130)
    assert kept == render([CHAT[0], CHAT[3], CHAT[4], CHAT[5]])  # starts at a user turn
    assert len(kept) <= 130


def test_a_cut_starts_at_a_user_turn_even_if_one_more_message_would_fit() -> None:
    # Keeping [assistant d, user e] would fit 80, but a conversation starting with an assistant turn
    # breaks templates that insist on alternation: the cut falls on the last user message.
    assert fit(CHAT, 80) == render([CHAT[0], CHAT[5]])


def test_the_last_message_stays_even_when_alone_it_is_too_long() -> None:
    chat = [msg("user", "x" * 10), msg("assistant", "y" * 10), msg("user", "z" * 500)]
    assert fit(chat, 100) == render([chat[2]])


roles = st.sampled_from(["system", "user", "assistant", "tool"])
chats = st.lists(st.builds(msg, roles, st.text("ab", max_size=30)), min_size=1, max_size=12)


def linear_reference(chat: list[dict[str, Any]], limit: int) -> str:
    """The same rule, the slow obvious way: the most messages that fit, cut at a user turn if possible."""
    if len(render(chat)) <= limit:
        return render(chat)
    droppable = [i for i, m in enumerate(chat) if m["role"] != "system"]
    counts = [n for n in range(1, len(droppable)) if chat[droppable[-n]]["role"] == "user"] or list(
        range(1, len(droppable))
    )
    if not counts:
        return render(chat)

    def keeping(count: int) -> str:
        dropped = set(droppable[: len(droppable) - count])
        return render([m for i, m in enumerate(chat) if i not in dropped])

    fitting = [n for n in counts if len(keeping(n)) <= limit]
    return keeping(max(fitting) if fitting else counts[0])


@given(chats, st.integers(min_value=1, max_value=300))
def test_any_conversation_is_cut_as_the_obvious_rule_says(chat: list[dict[str, Any]], limit: int) -> None:
    kept = fit(chat, limit)
    assert kept == linear_reference(chat, limit)
    systems = [m for m in chat if m["role"] == "system"]
    assert all(render([m]) in kept for m in systems)  # system messages always stay


def test_a_live_chat_longer_than_num_ctx_is_answered_and_truncate_false_refuses_it(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", system="You are terse.")
    history: list[dict[str, str]] = []
    for turn in range(12):
        history += [
            {"role": "user", "content": f"question {turn} " + "the of and to in " * 6},
            {"role": "assistant", "content": f"answer {turn} " + "is you that it he " * 6},
        ]
    history.append({"role": "user", "content": "and now?"})
    options = {"num_ctx": 256, "num_predict": 4, "seed": 1}
    with InProcessDaemon(store).start() as served:
        reply = ollama.Client(host=served.url).chat("tiny", messages=history, options=options)
        assert reply.done and reply.eval_count == 4
        assert reply.prompt_eval_count is not None and 0 < reply.prompt_eval_count <= 256
        assert "conversation truncated to the context of 256 tokens: kept the last" in served.log()
        refused = served.request(
            "POST", "/api/chat", {"model": "tiny", "messages": history, "options": options, "truncate": False}
        )
        assert refused.status == 400
        assert "more than the context length of 256 tokens" in refused.error
        wrong = served.request("POST", "/api/chat", {"model": "tiny", "messages": history, "truncate": "no"})
        assert wrong.status == 400 and wrong.error == '"truncate" must be a boolean'


def test_a_reply_longer_than_the_context_goes_on_unless_shift_is_false(tmp_path: Path) -> None:
    """Ollama's `shift` (default true): a reply that fills the context drops older tokens and goes on."""
    store = tmp_path / "models"
    make_gguf_model(store, "tiny")
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": "hello world " * 12,
        "stream": False,
        "options": {"num_ctx": 128, "num_predict": 150, "temperature": 0},
    }
    with InProcessDaemon(store).start() as served:
        shifted = served.request("POST", "/api/generate", body).json()
        assert (shifted["done_reason"], shifted["eval_count"]) == ("length", 150)
        assert "context full at 128 tokens" in served.log()
        stopped = served.request("POST", "/api/generate", {**body, "shift": False}).json()
        assert stopped["done_reason"] == "length" and stopped["eval_count"] < 128
        wrong = served.request("POST", "/api/generate", {**body, "shift": "no"})
        assert wrong.status == 400 and wrong.error == '"shift" must be a boolean'
