"""Token-level prefix reuse on a real-size BPE tokenizer and conversation caches, proven through
prompt_eval_count (the tokens really fed): RKLLM simulator of every family, and llama.cpp (tiny GGUF)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllama_ollama.runtime.base import GenerationStats, LoadSpec, SamplingOptions
from rkllama_ollama.runtime.kv_cache import CacheBudget, ConversationCache, common_prefix_length
from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime, LlamaCppSession
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime, RkllmSession
from tests.rkllm_support.sim import FAMILIES, build_simulators, write_model, write_qwen_size_tokenizer
from tests.support.tiny_gguf import write_tiny_gguf

REPLY = "Sure, here it is: the weather will be good today, 21 degrees and sunny."
# A small vocabulary keeps these tests quick; the bench trains the Qwen-size one.
VOCAB = 8000


def chat_prompt(turns: list[tuple[str, str]], question: str) -> str:
    text = "".join(
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in turns
    )
    return text + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


class Chat:
    """One conversation driven turn by turn against a session."""

    def __init__(self, session: RkllmSession | LlamaCppSession, topic: str) -> None:
        self.session = session
        self.topic = topic
        self.turns: list[tuple[str, str]] = []

    def turn(self, options: SamplingOptions | None = None) -> GenerationStats:
        question = f"{self.topic} question {len(self.turns)}: tell me more about it."
        pieces: list[str] = []
        stats = self.session.generate(
            chat_prompt(self.turns, question), options or SamplingOptions(), pieces.append
        )
        self.turns.append((question, "".join(pieces)))
        return stats


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen_size_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)


@pytest.fixture(params=FAMILIES)
def rkllm(
    request: pytest.FixtureRequest, tokenizer_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., RkllmSession]]:
    sessions: list[RkllmSession] = []

    def make(cache_dir: Path | None = None, slots: int = -1) -> RkllmSession:
        model = write_model(tmp_path / f"m{len(sessions)}", reply=REPLY, tokenizer=tokenizer_dir)
        spec = LoadSpec(
            engine="rkllm",
            model_path=str(model),
            tokenizer_dir=str(tokenizer_dir),
            kv_cache_dir=str(cache_dir) if cache_dir else None,
            kv_cache_slots=slots,
        )
        session = RkllmRuntime(str(build_simulators()[request.param])).load(spec)
        sessions.append(session)
        return session

    make.family = request.param  # type: ignore[attr-defined]
    yield make
    for session in sessions:
        session.close()


def test_generated_ids_are_the_tokenizers_and_the_cache_holds_the_end_of_turn(
    rkllm: Callable[..., RkllmSession], tokenizer_dir: Path
) -> None:
    session = rkllm()
    first = Chat(session, "weather").turn()
    assert first.context[first.prompt_tokens :] == session.tokenize(REPLY)
    if rkllm.family == "C":  # type: ignore[attr-defined]
        return
    # The next prompt extends the prompt, the reply and <|im_end|>: only what follows is fed.
    chat = Chat(session, "weather")
    chat.turns = [("weather question 0: tell me more about it.", REPLY)]
    second = chat.turn()
    extension = session.tokenize("\n<|im_start|>user\nweather question 1: tell me more about it.<|im_end|>\n")
    assert second.prompt_eval_count == len(extension) + len(session.tokenize("<|im_start|>assistant\n"))


def test_eight_turns_feed_only_what_is_new(rkllm: Callable[..., RkllmSession]) -> None:
    chat = Chat(rkllm(), "weather")
    fed = [chat.turn().prompt_eval_count for _ in range(8)]
    if rkllm.family == "C":  # type: ignore[attr-defined]
        assert fed[7] > 3 * fed[1]  # no history and no cache folder: the whole conversation every turn
    else:
        assert fed[7] <= 1.5 * fed[1]


def test_a_returning_conversation_restores_its_prompt_cache(
    rkllm: Callable[..., RkllmSession], tmp_path: Path
) -> None:
    session = rkllm(cache_dir=tmp_path / "cache")
    first, second = Chat(session, "weather"), Chat(session, "gardening")
    fed_first = [first.turn().prompt_eval_count for _ in range(3)]
    opening = second.turn()
    assert opening.prompt_eval_count == opening.prompt_tokens  # nothing shared with the weather chat
    second.turn()
    back = first.turn()
    # As much as a continuing turn feeds (give or take the question number's tokens). C: the previous
    # turn's prompt-cache file, then the last reply and the new question, as on any C turn. D-F: the live
    # cache (prompt, reply, end-of-turn) was saved when the gardening chat replaced it: the new question.
    assert abs(back.prompt_eval_count - fed_first[2]) <= 2
    if rkllm.family != "C":  # type: ignore[attr-defined]
        assert back.prompt_eval_count < len(first.session.tokenize(REPLY))
    back_again = second.turn()
    assert back_again.prompt_eval_count < back_again.prompt_tokens / 2
    files = list((tmp_path / "cache").rglob("*.cache"))
    assert len(files) == 2  # one per conversation: each turn supersedes the one before
    session.close()
    assert not list((tmp_path / "cache").rglob("*.cache"))


def test_a_continuing_conversation_writes_no_cache_file_where_the_runtime_keeps_history(
    rkllm: Callable[..., RkllmSession], tmp_path: Path
) -> None:
    """A save writes the whole KV state before the first token: D-F save only when another conversation
    replaces the live cache; C, which keeps no history, saves every turn (one file, superseded)."""
    session = rkllm(cache_dir=tmp_path / "cache")
    chat = Chat(session, "weather")
    for _ in range(3):
        chat.turn()
    files = list((tmp_path / "cache").rglob("*.cache"))
    assert len(files) == (1 if rkllm.family == "C" else 0)  # type: ignore[attr-defined]
    Chat(session, "gardening").turn()  # replaces the weather chat in the live cache: D-F save it now
    assert len(list((tmp_path / "cache").rglob("*.cache"))) == (2 if rkllm.family == "C" else 1)  # type: ignore[attr-defined]
    session.close()


def test_without_slots_nothing_is_saved(rkllm: Callable[..., RkllmSession], tmp_path: Path) -> None:
    session = rkllm(cache_dir=tmp_path / "cache", slots=0)
    first, second = Chat(session, "weather"), Chat(session, "gardening")
    first.turn()
    second.turn()
    back = first.turn()
    assert back.prompt_eval_count == back.prompt_tokens
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*"))


# ---------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", context_length=4096)


def load_gguf(path: Path, **spec: object) -> LlamaCppSession:
    return LlamaCppRuntime().load(
        LoadSpec(engine="llamacpp", model_path=str(path), num_ctx=2048, n_threads=1, **spec)  # type: ignore[arg-type]
    )


GREEDY = SamplingOptions(num_predict=12, temperature=0.0)


def test_llamacpp_alternating_conversations_restore_their_state(gguf: Path, tmp_path: Path) -> None:
    session = load_gguf(gguf, kv_cache_dir=str(tmp_path / "cache"), kv_cache_slots=4)
    try:
        first, second = Chat(session, "weather " * 6), Chat(session, "gardening " * 6)
        first.turn(GREEDY)
        continuing = first.turn(GREEDY)
        opening = second.turn(GREEDY)
        assert opening.prompt_eval_count >= opening.prompt_tokens - 8  # only the template opener is shared
        back = first.turn(GREEDY)  # the weather chat left the cache for the gardening one
        assert back.prompt_eval_count <= continuing.prompt_eval_count + 16
        assert back.prompt_eval_count < back.prompt_tokens / 2
        back_again = second.turn(GREEDY)
        # At least the opening prompt came back (a random model's reply need not re-tokenize the same).
        assert back_again.prompt_eval_count <= back_again.prompt_tokens - opening.prompt_tokens + 1
    finally:
        session.close()


def test_llamacpp_restored_state_generates_what_a_fresh_feed_does(gguf: Path, tmp_path: Path) -> None:
    """A restored conversation continues exactly as the same prompt fed from scratch (greedy)."""
    cached = load_gguf(gguf, kv_cache_dir=str(tmp_path / "cache"), kv_cache_slots=4)
    fresh = load_gguf(gguf, kv_cache_slots=0)
    try:
        chat, other = Chat(cached, "weather " * 6), Chat(cached, "gardening " * 6)
        opening = chat.turn(GREEDY)
        other.turn(GREEDY)
        restored = chat.turn(GREEDY)
        assert restored.prompt_eval_count <= restored.prompt_tokens - opening.prompt_tokens + 1
        replay = Chat(fresh, "weather " * 6)
        replay.turns = chat.turns[:-1]
        again = replay.turn(GREEDY)
        assert again.prompt_eval_count == again.prompt_tokens
        assert replay.turns[-1][1] == chat.turns[-1][1]
    finally:
        cached.close()
        fresh.close()


def test_llamacpp_states_spill_to_disk_past_the_ram_budget(gguf: Path, tmp_path: Path) -> None:
    session = load_gguf(gguf, kv_cache_dir=str(tmp_path / "cache"), kv_cache_slots=4, kv_cache_ram_mb=0)
    session._conversations.budget = CacheBudget(slots=4, ram_bytes=0)  # everything goes to disk
    try:
        chats = [Chat(session, f"topic{n} " * 8) for n in range(3)]
        openings = [chat.turn(GREEDY) for chat in chats]
        assert len(list((tmp_path / "cache").rglob("*.cache"))) == 2  # the two that left the cache
        back = chats[0].turn(GREEDY)
        assert back.prompt_eval_count <= back.prompt_tokens - openings[0].prompt_tokens + 1
    finally:
        session.close()
    assert not list((tmp_path / "cache").rglob("*.cache"))


# ---------------------------------------------------------------- the cache itself


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=12),
    st.lists(st.integers(0, 3), max_size=8),
)
def test_best_match_is_the_longest_shared_prefix(states: list[list[int]], query: list[int]) -> None:
    cache = ConversationCache(None, "test", CacheBudget(slots=100, ram_bytes=1 << 30))
    for tokens in states:
        cache.add_state(tokens, bytes(len(tokens)))
    entry, shared = cache.best_match(query)
    assert shared == max(common_prefix_length(tokens, query) for tokens in states)
    assert (entry is None) == (shared == 0)
    # No entry is a prefix of another: a conversation's earlier turns are superseded.
    kept = [entry.tokens for entry in cache._entries]
    assert all(not (a != b and b[: len(a)] == a) for a in kept for b in kept)


def test_slots_bound_the_entries_least_recently_used_first() -> None:
    cache = ConversationCache(None, "test", CacheBudget(slots=2, ram_bytes=1 << 30))
    cache.add_state([1, 1], b"a")
    cache.add_state([2, 2], b"b")
    cache.touch(cache.best_match([1, 1])[0])  # type: ignore[arg-type]
    cache.add_state([3, 3], b"c")
    assert sorted(entry.tokens for entry in cache._entries) == [(1, 1), (3, 3)]


def test_budget_from_free_memory() -> None:
    budget = CacheBudget.sized(-1, 100, 30 * 2**20)
    assert budget == CacheBudget(slots=3, ram_bytes=100 * 2**20)
    assert CacheBudget.sized(-1, 1, 30 * 2**20).slots == 1
    assert CacheBudget.sized(5, 0, 1).slots == 5
    assert CacheBudget.sized(-1, 0, 0).ram_bytes > 0


# ---------------------------------------------------------------- through the daemon


def test_daemon_keeps_conversation_caches_in_the_store_and_removes_them_with_the_model(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    import ollama

    from tests.rkllm_support.sim import add_sim_model
    from tests.support.daemon import Daemon

    store = tmp_path / "models"
    add_sim_model(store, "chat", tokenizer=tokenizer_dir, reply=REPLY)
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()["E"]), "RKLLAMA_KV_CACHE_SLOTS": "4"}
    with Daemon(store, env=env).start() as daemon:
        client = ollama.Client(host=daemon.url)
        chats: dict[str, list[dict[str, str]]] = {"weather": [], "gardening": []}
        fed: dict[str, list[int]] = {"weather": [], "gardening": []}
        for turn in range(3):
            for topic, messages in chats.items():
                messages.append({"role": "user", "content": f"{topic} question {turn}: tell me more."})
                reply = client.chat("chat", messages=messages)
                messages.append({"role": "assistant", "content": reply.message.content or ""})
                fed[topic].append(reply.prompt_eval_count or 0)
        # Every returning turn fed about what a continuing one does: the last reply and the question.
        assert fed["weather"][2] <= fed["weather"][1] + 4 and fed["gardening"][2] <= fed["gardening"][1] + 4
        folder = store / ".kv-cache" / "chat"
        assert len(list(folder.rglob("*.cache"))) == 2
        client.delete("chat")
        assert not folder.exists()


def test_the_next_message_after_background_requests_feeds_only_what_is_new(tmp_path: Path) -> None:
    """Open WebUI's pattern: a streamed reply, then non-streamed background requests (a title) with an
    unrelated prompt; the conversation's state is saved when the title request replaces it in the cache
    and restored by the next message (tiny GGUF, in-process daemon)."""
    import ollama

    from tests.conftest import make_gguf_model
    from tests.support.inprocess_daemon import InProcessDaemon

    options = {"num_predict": 6, "seed": 2, "temperature": 0}
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", context_length=4096)
    history = [{"role": "user", "content": "tell me about the water and the people " * 8}]
    with InProcessDaemon(store).start() as daemon:
        client = ollama.Client(host=daemon.url)
        parts = list(client.chat("tiny", messages=history, options=options, stream=True))
        first_fed = parts[-1].prompt_eval_count or 0
        reply = "".join(part.message.content or "" for part in parts)
        for task in ("Generate a concise title", "Suggest follow-up questions", "Generate tags"):
            client.generate("tiny", prompt=f"### Task: {task} " * 5, options=options)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        final = list(client.chat("tiny", messages=history, options=options, stream=True))[-1]
        assert final.prompt_eval_count is not None
        # Without the restore the whole conversation (more than the first prompt) would be fed again.
        assert 0 < final.prompt_eval_count < first_fed // 2
        assert "conversation cache restored" in daemon.log()
