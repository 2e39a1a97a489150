"""The plan of one generation: what to render, how to sample, where to stop, what to check afterwards.

`plan_generation` is pure: from the request, its model entry (on the request), the model's chat
template and what the loaded engine reported (`ModelInfo`), it decides the template arguments (think,
tools), the chat messages or the generate prompt, the layered options, the stop sequences and how
structured output is enforced. What needs the runner (tokenizing to fit the context, detokenizing an
earlier `context`) happens in generation.py with the plan's `render`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from rkllama_ollama.chat.images import images_in_order, tagged_messages, with_image_tags
from rkllama_ollama.chat.parse import OutputPipeline
from rkllama_ollama.chat.template import ChatTemplate
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.options import layer_options, sampling_from
from rkllama_ollama.runtime.base import IMAGE_TAG, Engine, InvalidInput, ModelInfo, SamplingOptions
from rkllama_ollama.structured import Format, guided_messages, guided_system, schema_text

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    entry: ModelEntry
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # generate
    system: str | None = None  # generate: overrides the Modelfile SYSTEM
    suffix: str | None = None  # generate: fill-in-the-middle (models whose template has `suffix`)
    raw: bool = False
    context: list[int] | None = None  # generate: token ids from an earlier reply
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # validated request options
    keep_alive_s: float | None = None
    interactive: bool = True  # streaming requests go ahead of queued non-streaming ones
    format: Format | None = None  # structured output: "json" or a JSON schema (already checked)
    top_logprobs: int = -1  # -1: no log-probabilities; n >= 0: with each token's n likeliest alternatives
    truncate: bool = True  # chat: drop the oldest messages when the conversation outgrows the context
    shift: bool = True  # a reply that fills the context shifts it and goes on (llama.cpp)
    images: list[str] | None = None  # generate: base64 pictures (checked); chat images ride on messages


def default_think(entry: ModelEntry) -> bool | None:
    """`think` when the request has none: the Modelfile's ENABLE_THINKING (RKLLama's switch), else on
    for models that can think."""
    configured = entry.modelfile.enable_thinking()
    if configured is not None:
        return configured
    return "thinking" in entry.capabilities or None


def constrains_decoding(entry: ModelEntry) -> bool:
    """Whether the model's engine constrains decoding to a JSON schema (llama.cpp grammars); on RKLLM
    the format is asked for in the prompt and checked afterwards."""
    return entry.engine is Engine.LLAMACPP


@dataclass(frozen=True)
class GenerationPlan:
    request: GenerationRequest
    template: ChatTemplate
    think: bool | str | None  # what the template is given (None when the model cannot think)
    tools: list[dict[str, Any]] | None  # the tools the template renders (None when it cannot)
    messages: list[dict[str, Any]] | None  # chat: the messages to render, Modelfile's first
    prompt: str | None  # generate: the rendered prompt (an earlier `context` still goes before it)
    options: dict[str, Any]  # Modelfile parameters under the request's options
    context_length: int  # what a chat prompt must fit when `truncate` is on
    bos_token: str = ""
    engine_adds_bos: bool = False

    @property
    def stops(self) -> list[str]:
        return list(self.options.get("stop") or [])

    @property
    def constrained(self) -> bool:
        return self.request.format is not None and constrains_decoding(self.request.entry)

    @property
    def held_format(self) -> Format | None:
        """The format checked after the answer (engines that cannot constrain decoding)."""
        return None if self.constrained else self.request.format

    def render(self, kept: list[dict[str, Any]]) -> str:
        """The chat prompt for the messages kept (all of `messages`, or the latest when truncated)."""
        return self.without_double_bos(self.template.render(kept, tools=self.tools, think=self.think))

    def without_double_bos(self, prompt: str) -> str:
        """Engines that add BOS themselves would otherwise see it twice (templates often print it)."""
        bos = self.bos_token
        while self.engine_adds_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    def pipeline(self, prompt: str) -> OutputPipeline:
        """The output parsers for the rendered prompt: stop sequences, thinking, tool calls."""
        request = self.request
        return OutputPipeline.for_request(
            None if request.raw else self.template,
            prompt,
            think=request.think,
            tools=request.tools if self.template.supports_tools else None,
            stops=self.stops,
        )

    def sampling(self, pipeline: OutputPipeline) -> SamplingOptions:
        """The runner's sampling: the layered options, logprobs, shift, and the JSON schema of a
        format the engine constrains (after a thinking block, which stays free, like Ollama)."""
        request = self.request
        sampling = sampling_from(self.options)
        if request.top_logprobs >= 0:
            sampling = replace(sampling, top_logprobs=request.top_logprobs)
        if not request.shift:
            sampling = replace(sampling, shift=False)
        if self.constrained and request.format is not None:
            think_open, think_close = pipeline.thinking_tags or ("", "")
            sampling = replace(
                sampling,
                json_schema=schema_text(request.format),
                think_open=think_open,
                think_close=think_close,
            )
        return sampling


def plan_generation(request: GenerationRequest, template: ChatTemplate, info: ModelInfo) -> GenerationPlan:
    """The plan of `request` on its model (raises chat.template.TemplateError for a generate prompt
    the template cannot render)."""
    entry = request.entry
    think = request.think if request.think is not None else default_think(entry)
    think = think if "thinking" in entry.capabilities else None
    tools = request.tools or None
    if tools and not template.supports_tools:
        log.info(
            "model=%s cannot render tools; answering without the %d tool definitions",
            entry.name.display,
            len(tools),
        )
        tools = None
    guide = None if constrains_decoding(entry) else request.format  # asked in the prompt instead
    plan = GenerationPlan(
        request=request,
        template=template,
        think=think,
        tools=tools,
        messages=None,
        prompt=None,
        options=layer_options(entry.modelfile.parameters, request.options),
        context_length=info.context_length,
        bos_token=info.bos_token,
        engine_adds_bos=info.add_bos_token,
    )
    if request.messages is not None:
        messages = tagged_messages(chat_messages(request))
        return replace(plan, messages=guided_messages(messages, guide) if guide is not None else messages)
    prompt = with_image_tags(request.prompt or "", len(request.images or ()))
    if not request.raw:
        system = request.system if request.system is not None else entry.modelfile.system
        if guide is not None:
            system = guided_system(system, guide)
        prompt = template.render_generate(prompt, system, suffix=request.suffix, think=think)
    return replace(plan, prompt=prompt)


def chat_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The Modelfile's messages, then the request's; the Modelfile SYSTEM when the chat has none."""
    modelfile = request.entry.modelfile
    messages = [dict(m) for m in (modelfile.messages or [])] + [dict(m) for m in request.messages or []]
    if modelfile.system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": modelfile.system})
    return messages


def prompt_images(request: GenerationRequest, prompt: str) -> list[str] | None:
    """The request's images that the rendered prompt still holds, in order. When the conversation was
    truncated, the oldest messages went with their images: the prompt's tags belong to the last ones."""
    if request.messages is not None:
        images = images_in_order(request.messages)
    else:
        images = list(request.images or ())
    if not images:
        return None
    tags = prompt.count(IMAGE_TAG)
    if tags > len(images):
        raise InvalidInput(f"the prompt has {tags} {IMAGE_TAG} tags but the request has {len(images)} images")
    return images[len(images) - tags :] if tags else None
