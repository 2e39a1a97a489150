"""generation_plan.py: the pure plan of a generation (messages, prompt, think, tools, sampling, stops,
structured output), without a runner or a scheduler."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rkllama_ollama.chat.template import ChatTemplate
from rkllama_ollama.generation_plan import (
    GenerationRequest,
    chat_messages,
    default_think,
    plan_generation,
    prompt_images,
)
from rkllama_ollama.models.capabilities import Capability
from rkllama_ollama.models.modelfile import Modelfile
from rkllama_ollama.models.names import parse_name
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.runtime.base import InvalidInput, ModelInfo

TOOLS_AND_THINKING = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if tools %}[tools:{{ tools | length }}]{% endif %}"
    "{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}<|assistant|>"
)
PLAIN = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}


def entry(
    *,
    fmt: str = "gguf",
    capabilities: tuple[Capability, ...] = (Capability.COMPLETION,),
    modelfile: Modelfile | None = None,
) -> ModelEntry:
    return ModelEntry(
        name=parse_name("plan-test:latest"),
        folder=Path("/nowhere"),
        weights=Path(f"/nowhere/model.{fmt}"),
        format=fmt,
        modelfile=modelfile or Modelfile(),
        size=0,
        modified_at=datetime.now(UTC),
        digest="0" * 64,
        digest_provisional=False,
        details={},
        model_info={},
        capabilities=list(capabilities),
        chat_template=None,
        bos_token="",
        eos_token="",
        tokenizer_dir=None,
        context_length=0,
        max_context_length=0,
        embedding_length=0,
    )


INFO = ModelInfo(context_length=512, bos_token="<s>", add_bos_token=True)


def chat(model: ModelEntry, **fields: Any) -> GenerationRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return GenerationRequest(entry=model, **fields)


def test_the_modelfile_system_and_messages_come_first() -> None:
    model = entry(
        modelfile=Modelfile(system="be brief", messages=[{"role": "assistant", "content": "hello"}])
    )
    plan = plan_generation(chat(model), ChatTemplate(PLAIN), INFO)
    assert plan.prompt is None
    assert plan.messages is not None
    assert [m["role"] for m in plan.messages] == ["system", "assistant", "user"]
    assert plan.render(plan.messages) == "<|system|>be brief\n<|assistant|>hello\n<|user|>hi\n<|assistant|>"
    own_system = chat(
        entry(modelfile=Modelfile(system="be brief")),
        messages=[{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}],
    )
    assert [m["content"] for m in chat_messages(own_system)] == ["mine", "x"]  # the request's system wins


def test_think_follows_the_request_then_the_modelfile_then_the_capability() -> None:
    thinker = entry(capabilities=(Capability.COMPLETION, Capability.THINKING))
    template = ChatTemplate(TOOLS_AND_THINKING)
    assert plan_generation(chat(thinker), template, INFO).think is True  # unset: on for a thinking model
    assert plan_generation(chat(thinker, think=False), template, INFO).think is False
    assert plan_generation(chat(thinker, think="high"), template, INFO).think == "high"
    switched_off = entry(
        capabilities=(Capability.COMPLETION, Capability.THINKING),
        modelfile=Modelfile(extra={"ENABLE_THINKING": "False"}),
    )
    assert default_think(switched_off) is False
    assert plan_generation(chat(switched_off), template, INFO).think is False
    plain = entry()
    assert default_think(plain) is None
    assert plan_generation(chat(plain, think=True), template, INFO).think is None  # cannot think: not passed


def test_tools_reach_only_a_template_that_renders_them() -> None:
    model = entry(capabilities=(Capability.COMPLETION, Capability.TOOLS))
    with_tools = plan_generation(chat(model, tools=[TOOL]), ChatTemplate(TOOLS_AND_THINKING), INFO)
    assert with_tools.tools == [TOOL]
    assert with_tools.messages is not None and "[tools:1]" in with_tools.render(with_tools.messages)
    assert plan_generation(chat(model, tools=[TOOL]), ChatTemplate(PLAIN), INFO).tools is None


def test_sampling_layers_request_options_over_the_modelfile() -> None:
    model = entry(modelfile=Modelfile(parameters={"temperature": 0.2, "top_k": 7, "stop": ["<end>"]}))
    request = chat(model, options={"temperature": 0.9}, top_logprobs=3, shift=False)
    plan = plan_generation(request, ChatTemplate(PLAIN), INFO)
    sampling = plan.sampling(plan.pipeline("prompt"))
    assert (sampling.temperature, sampling.top_k) == (0.9, 7)
    assert sampling.top_logprobs == 3 and sampling.shift is False
    assert sampling.json_schema is None
    assert plan.stops == ["<end>"]
    defaults = plan_generation(chat(entry()), ChatTemplate(PLAIN), INFO)
    default_sampling = defaults.sampling(defaults.pipeline("prompt"))
    assert default_sampling.top_logprobs == -1 and default_sampling.shift is True and defaults.stops == []


def test_a_format_is_a_grammar_on_llama_cpp_and_a_checked_answer_on_rkllm() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    on_cpu = plan_generation(chat(entry(), format=schema), ChatTemplate(PLAIN), INFO)
    assert on_cpu.constrained and on_cpu.held_format is None
    assert on_cpu.messages == [{"role": "user", "content": "hi"}]  # not asked for in the prompt
    sampling = on_cpu.sampling(on_cpu.pipeline("prompt"))
    assert sampling.json_schema is not None and json.loads(sampling.json_schema) == schema

    on_npu = plan_generation(chat(entry(fmt="rkllm"), format=schema), ChatTemplate(PLAIN), INFO)
    assert not on_npu.constrained and on_npu.held_format == schema
    assert on_npu.messages is not None and on_npu.messages[0]["role"] == "system"  # the format, asked for
    assert on_npu.sampling(on_npu.pipeline("prompt")).json_schema is None


def test_a_grammar_waits_for_the_end_of_a_thinking_block() -> None:
    thinker = entry(capabilities=(Capability.COMPLETION, Capability.THINKING))
    plan = plan_generation(chat(thinker, format="json"), ChatTemplate(TOOLS_AND_THINKING), INFO)
    sampling = plan.sampling(plan.pipeline("<|user|>hi\n<think><|assistant|>"))
    assert sampling.json_schema == "{}"
    assert sampling.think_close == "</think>"


def test_generate_renders_the_prompt_and_raw_leaves_it_alone() -> None:
    model = entry(modelfile=Modelfile(system="sys"))
    template = ChatTemplate(PLAIN)
    generate = plan_generation(GenerationRequest(entry=model, prompt="why"), template, INFO)
    assert generate.messages is None
    assert generate.prompt == "<|system|>sys\n<|user|>why\n<|assistant|>"
    own = plan_generation(GenerationRequest(entry=model, prompt="why", system="other"), template, INFO)
    assert own.prompt is not None and own.prompt.startswith("<|system|>other")
    raw = plan_generation(
        GenerationRequest(entry=model, prompt="as is", raw=True, images=["a"]), template, INFO
    )
    assert raw.prompt == "<image>\nas is"


def test_a_bos_the_engine_adds_is_not_rendered_twice() -> None:
    plan = plan_generation(chat(entry()), ChatTemplate("<s><s>{{ messages[0].content }}"), INFO)
    assert plan.messages is not None and plan.render(plan.messages) == "hi"
    keeps = plan_generation(chat(entry()), ChatTemplate("<s>{{ messages[0].content }}"), ModelInfo(512))
    assert keeps.messages is not None and keeps.render(keeps.messages) == "<s>hi"


def test_prompt_images_are_the_ones_the_prompt_still_holds() -> None:
    messages = [
        {"role": "user", "content": "a", "images": ["one"]},
        {"role": "user", "content": "b", "images": ["two", "three"]},
    ]
    request = GenerationRequest(entry=entry(), messages=messages)
    assert prompt_images(request, "<image><image> b") == ["two", "three"]  # the oldest was truncated away
    assert prompt_images(request, "no pictures left") is None
    assert prompt_images(GenerationRequest(entry=entry(), messages=[]), "<image>") is None
    with pytest.raises(InvalidInput, match="4 <image> tags but the request has 3 images"):
        prompt_images(request, "<image>" * 4)
