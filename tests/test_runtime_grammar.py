"""A thinking model under `format`: it thinks freely and only the answer after its thinking block is held
to the grammar (runtime/grammar.py, on the tiny GGUF). The tiny model cannot be made to think, so the
lazy case takes its "close tag" from what the model really says with the same seed: everything up to that
text must be exactly the unconstrained output, and everything after it JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_cpp")

from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions, TokenLogprob  # noqa: E402
from rkllama_ollama.runtime.grammar import answer_after_thinking  # noqa: E402
from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime, LlamaCppSession  # noqa: E402
from tests.support.tiny_gguf import write_tiny_gguf  # noqa: E402

PROMPT = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
OBJECT = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
FREE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppSession]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    loaded = LlamaCppRuntime().load(
        LoadSpec(engine="llamacpp", model_path=str(path), num_ctx=1024, n_threads=1)
    )
    yield loaded
    loaded.close()


def tokens_of(session: LlamaCppSession, options: SamplingOptions) -> tuple[list[bytes], str]:
    """The generated tokens' bytes (from their logprob entries) and the done reason."""
    entries: list[TokenLogprob] = []
    stats = session.generate(PROMPT, options, lambda _text, logprobs: entries.extend(logprobs))
    return [entry.raw for entry in entries], stats.done_reason


def assert_object_answer(answer: str, done_reason: str) -> None:
    answer = answer.lstrip(" \t\n\r")
    if done_reason == "stop":
        assert isinstance(json.loads(answer)["a"], int), answer
    else:
        assert answer.startswith("{"), answer[:80]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lazy_the_model_thinks_unconstrained_then_answers_in_json(
    session: LlamaCppSession, seed: int
) -> None:
    free, _ = tokens_of(session, SamplingOptions(num_predict=40, seed=seed, top_logprobs=0, **FREE))

    # The "close tag": two whole tokens of the free run, from token 6 on, whose text appears there first.
    def first_seen_at(i: int) -> bool:
        pair = free[i - 1 : i + 1]
        if not all(token.isascii() and token.strip() for token in pair):
            return False
        upto = b"".join(free[: i + 1])
        return upto.find(b"".join(pair)) == len(upto) - len(b"".join(pair))

    cut = next(i for i in range(6, 30) if first_seen_at(i))
    close = b"".join(free[cut - 1 : cut + 1]).decode()
    options = SamplingOptions(
        num_predict=200, seed=seed, top_logprobs=0, json_schema=OBJECT, think_close=close, **FREE
    )
    constrained, done_reason = tokens_of(session, options)
    assert constrained[: cut + 1] == free[: cut + 1]  # thinking was not touched by the grammar
    text = b"".join(constrained).decode("utf-8", errors="replace")
    assert_object_answer(text.split(close, 1)[1], done_reason)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lazy_a_close_tag_that_is_one_token_triggers_on_that_token(
    session: LlamaCppSession, seed: int
) -> None:
    free, _ = tokens_of(session, SamplingOptions(num_predict=40, seed=seed, top_logprobs=0, **FREE))
    llm = session._llm

    def single_token_first_seen(i: int) -> bool:
        token = free[i]
        if not (token.isascii() and token.strip()) or token in b"".join(free[:i]):
            return False
        return len(llm.tokenize(token, add_bos=False, special=True)) == 1

    cut = next(i for i in range(6, 30) if single_token_first_seen(i))
    close = free[cut].decode()
    options = SamplingOptions(
        num_predict=200, seed=seed, top_logprobs=0, json_schema=OBJECT, think_close=close, **FREE
    )
    constrained, done_reason = tokens_of(session, options)
    assert constrained[: cut + 1] == free[: cut + 1]
    text = b"".join(constrained).decode("utf-8", errors="replace")
    assert_object_answer(text.split(close, 1)[1], done_reason)


@pytest.mark.parametrize("seed", range(1, 7))
def test_optional_block_a_direct_answer_is_still_json(session: LlamaCppSession, seed: int) -> None:
    options = SamplingOptions(
        num_predict=200, seed=seed, json_schema=OBJECT, think_open="<think>", think_close="</think>", **FREE
    )
    pieces: list[str] = []
    stats = session.generate(PROMPT, options, pieces.append)
    text = "".join(pieces).lstrip(" \t\n\r")
    if text.startswith("<think>"):  # the grammar allows one block first; the answer follows it
        assert "</think>" in text or stats.done_reason == "length"
        text = text.split("</think>", 1)[1] if "</think>" in text else "{"
    assert_object_answer(text, stats.done_reason)


@pytest.mark.parametrize("tag", ["</think>", "[/THINK]", "<|end_thinking|>", '"q"\\', "\n", "x"])
def test_composed_grammars_parse_in_llama_cpp(session: LlamaCppSession, tag: str) -> None:
    from rkllama_ollama.runtime.llamacpp import _schema_grammar

    gbnf = _schema_grammar(OBJECT)
    for open_tag in ("", "<think>", "[THINK]"):
        options = SamplingOptions(json_schema=OBJECT, think_open=open_tag, think_close=tag)
        sampler = session._grammar_sampler(gbnf, options)  # raises RuntimeFailure when it does not parse
        session._llama_cpp.llama_sampler_free(sampler)


def test_the_body_rules_refuse_the_close_tag_inside_thinking() -> None:
    grammar = answer_after_thinking('root ::= "{}"', "<t>", "</t>")
    assert grammar.trigger_pattern is None and grammar.root == "rkllama-answer-root"
    assert 'rkllama-think-body-3 ::= [^><] | "<" rkllama-think-body-1\n' in grammar.gbnf  # no "</t>" inside
    lazy = answer_after_thinking('root ::= "{}"', "", "</t>")
    assert lazy.trigger_pattern == r"[\s\S]*?(</t>[\s\S]*)"
    assert lazy.gbnf.endswith('rkllama-answer-root ::= "</t>" [ \\t\\n\\r]* root\n')
