"""A model with no tokenizer files on runtime 1.2.0+: the chat template built into the .rkllm is used.

The simulator's built-in template (like the vendor runtime's, set at conversion time) wraps a prompt
input in a prefix and a postfix and reports what it prefilled; `rkllm_set_chat_template` replaces the
three pieces. So `prompt_eval_count` shows whether the runtime's template was applied, and which one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllama_ollama.chat.template import ChatTemplate, template_from_runtime_pieces
from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime, RkllmSession
from rkllama_ollama.runtime.rkllm.tokens import RUNTIME_TURN_TEMPLATE
from tests.rkllm_support.sim import build_simulators, write_byte_tokenizer, write_model

# The simulator's built-in template pieces (its rkllm_init default).
SIM_PREFIX = "<|im_start|>user\n"
SIM_POSTFIX = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(params=["D", "E", "F"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def load(family: str, tmp_path: Path) -> Iterator[object]:
    runtime = RkllmRuntime(str(build_simulators()[family]))
    sessions: list[RkllmSession] = []

    def make(
        *, runtime_template: bool, tokenizer: bool = False, params: dict[str, str] | None = None
    ) -> RkllmSession:
        folder = tmp_path / f"m{len(sessions)}"
        model = write_model(folder, reply="ok")
        tokenizer_dir = str(write_byte_tokenizer(folder / "tokenizer")) if tokenizer else None
        spec = LoadSpec(
            engine="rkllm",
            model_path=str(model),
            tokenizer_dir=tokenizer_dir,
            runtime_template=runtime_template,
            params=dict(params or {}),
        )
        session = runtime.load(spec)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def run(session: RkllmSession, prompt: str) -> tuple[str, int]:
    pieces: list[str] = []
    stats = session.generate(prompt, SamplingOptions(), pieces.append)
    return "".join(pieces), stats.prompt_eval_count


def test_without_template_the_runtime_applies_its_own(load: object, family: str) -> None:
    session = load(runtime_template=True)  # type: ignore[operator]
    assert session.info.chat_template == RUNTIME_TURN_TEMPLATE
    text = "Be brief.\n\nHi there"
    reply, fed = run(session, text)
    assert reply == "ok"
    if family != "D":  # 1.2.0 reports no prefill count: the session can only count what it fed
        assert fed == len(text) + len(SIM_PREFIX) + len(SIM_POSTFIX)
    # every run is one templated turn: nothing is kept from the previous one
    _, again = run(session, text + " and more")
    if family != "D":
        assert again == len(text + " and more") + len(SIM_PREFIX) + len(SIM_POSTFIX)


def test_the_modelfile_pieces_replace_the_built_in_template(load: object, family: str) -> None:
    pieces = {"system_prompt": "<s>", "prompt_prefix": "[INST] ", "prompt_postfix": " [/INST]"}
    session = load(runtime_template=True, params=pieces)  # type: ignore[operator]
    _, fed = run(session, "Hi")
    if family != "D":
        assert fed == len("<s>") + len("[INST] ") + len("Hi") + len(" [/INST]")


def test_a_server_rendered_prompt_blanks_the_runtime_template(load: object, family: str) -> None:
    session = load(runtime_template=False)  # type: ignore[operator]
    assert session.info.chat_template is None
    _, fed = run(session, "Hi there")
    assert fed == len("Hi there")
    tokenized = load(runtime_template=True, tokenizer=True)  # type: ignore[operator]
    assert tokenized.info.chat_template is not None  # the tokenizer's own template wins
    _, fed = run(tokenized, "Hi there")
    assert fed == len("Hi there")


def test_the_runtime_turn_template_folds_the_conversation_into_one_turn() -> None:
    template = ChatTemplate(RUNTIME_TURN_TEMPLATE)
    assert template.render([{"role": "user", "content": "Hi"}]) == "Hi"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    assert template.render(conversation) == "Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nWhy?"


def test_a_template_from_the_runtime_pieces_renders_like_the_runtime_would() -> None:
    source = template_from_runtime_pieces(
        "<|im_start|>system\nBe brief.<|im_end|>\n", SIM_PREFIX, SIM_POSTFIX
    )
    template = ChatTemplate(source, eos_token="<|im_end|>\n")
    rendered = template.render(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": 'Hi "q" {{ x }}'},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "More"},
        ]
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        '<|im_start|>user\nS\n\nHi "q" {{ x }}<|im_end|>\n<|im_start|>assistant\n'
        "Yo<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"
    )
