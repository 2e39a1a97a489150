"""Chat-template rendering with Hugging Face semantics.

A model's chat template (jinja, from `tokenizer_config.json` or GGUF `tokenizer.chat_template`) is
compiled once per model load into a `ChatTemplate`; each request renders its messages with it.

The environment matches what Hugging Face `apply_chat_template` gives templates: an immutable sandbox
with `trim_blocks` / `lstrip_blocks`, the `loopcontrols` extension, the `{% generation %}` block
(rendered as its plain body), the `raise_exception` and `strftime_now` globals and an HTML-unescaped
`tojson` filter. Variables: `messages`, `tools` (only when non-empty), `add_generation_prompt`,
`bos_token`, `eos_token`, and `enable_thinking` / `reasoning_effort` derived from Ollama's `think`.

Models without a template get `FALLBACK_CHATML_TEMPLATE` (ChatML, the format of Qwen, SmolLM and most
small instruction-tuned models, and what RKLLM toolkits default to).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# ChatML, written for this project. Tool results are rendered as `tool` turns; assistant tool calls as
# Hermes-style `<tool_call>` JSON so a model that saw them in training recognises its own calls.
FALLBACK_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\n' }}"
    "{% if message.content is string %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}"
    "{% for call in message.tool_calls %}"
    "{{ '\n<tool_call>\n' }}"
    '{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}'
    "{{ '\n</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_from_runtime_pieces(system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> str:
    """A chat template made of the three pieces of an RKLLM runtime template (RKLLama's Modelfile keys
    SYSTEM_PROMPT, PROMPT_PREFIX, PROMPT_POSTFIX), for runtimes that do not apply it themselves.

    The system prompt opens the conversation; each user (or tool) turn is prefix + text + postfix; each
    assistant turn is its text followed by the end-of-sequence token. The pieces say nothing about
    system messages, so their text opens the next user turn.
    """
    system, prefix, postfix = (
        json.dumps(piece, ensure_ascii=True) for piece in (system_prompt, prompt_prefix, prompt_postfix)
    )
    return (
        "{% set pending = namespace(text='') %}"
        f"{{{{ {system} }}}}"
        "{% for message in messages %}"
        "{% if message.role == 'system' %}{% set pending.text = pending.text + message.content + '\n\n' %}"
        "{% elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}"
        f"{{% else %}}{{{{ {prefix} + pending.text + message.content + {postfix} }}}}"
        "{% set pending.text = '' %}"
        "{% endif %}"
        "{% endfor %}"
    )


_THINK_LEVELS = ("low", "medium", "high")
_TOOLS_REFERENCE = re.compile(r"\btools\b")
_THINKING_MARKERS = ("enable_thinking", "<think>", "</think>")


class TemplateError(Exception):
    """Compiling or rendering a chat template failed. The message says why, in plain words.

    A broken template is the model's fault: the API answers 500 (but see `TemplateRaisedError`).
    """


class TemplateRaisedError(TemplateError):
    """The template itself rejected the conversation through `raise_exception(...)`.

    The request's messages are not acceptable to the model's template (for example "Conversation
    roles must alternate user/assistant/user/assistant/..."): the API answers 400 with this message.
    """


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: HF's assistant-mask marker, rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: Any) -> None:
    raise TemplateRaisedError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF-style `tojson`: plain `json.dumps`, no HTML escaping of `<`, `>`, `&`, `'`."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _new_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _arguments_as_mapping(arguments: Any) -> Any:
    """Tool-call arguments as a dict: Ollama sends a dict, OpenAI a JSON string."""
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return arguments
        if isinstance(decoded, dict):
            return decoded
    return arguments


def _prepare_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    prepared = dict(call)
    prepared.setdefault("type", "function")
    function = prepared.get("function")
    if isinstance(function, dict):
        function = dict(function)
        if "arguments" in function:
            function["arguments"] = _arguments_as_mapping(function["arguments"])
        prepared["function"] = function
    return prepared


def _prepare_message(message: dict[str, Any]) -> dict[str, Any]:
    """An Ollama/OpenAI message in the shape HF templates read.

    - `role` lower-cased; a missing or null `content` becomes "";
    - `thinking` is also offered as `reasoning_content` (what Qwen3-style templates read for history);
    - `tool_calls` get `type: "function"` and dict `arguments`;
    - `tool_name` is also offered as `name` (templates that label tool results read `message.name`).
    """
    prepared = dict(message)
    role = prepared.get("role")
    if isinstance(role, str):
        prepared["role"] = role.lower()
    if prepared.get("content") is None:
        prepared["content"] = ""
    thinking = prepared.get("thinking")
    if thinking and "reasoning_content" not in prepared:
        prepared["reasoning_content"] = thinking
    tool_calls = prepared.get("tool_calls")
    if isinstance(tool_calls, list):
        prepared["tool_calls"] = [_prepare_tool_call(call) for call in tool_calls]
    if prepared.get("tool_name") and not prepared.get("name"):
        prepared["name"] = prepared["tool_name"]
    return prepared


def _thinking_variables(think: bool | str | None) -> dict[str, Any]:
    if think is None:
        return {}
    if think is False:
        return {"enable_thinking": False}
    if think is True:
        return {"enable_thinking": True}
    level = "high" if think == "max" else think
    if level in _THINK_LEVELS:
        return {"enable_thinking": True, "reasoning_effort": level}
    raise TemplateError(f'invalid think value: "{think}" (must be true, false, "low", "medium" or "high")')


class ChatTemplate:
    """One compiled chat template. Thread-safe to render from several requests."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        """Compile `source`; an empty or missing template means the ChatML fallback (logged)."""
        if not source or not source.strip():
            logger.debug("no chat template given; using the ChatML fallback")  # callers warn with the name
            source = FALLBACK_CHATML_TEMPLATE
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._compiled = _new_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template is invalid: {exc.message} (line {exc.lineno})") from exc
        self.supports_tools = bool(_TOOLS_REFERENCE.search(source))
        self.supports_thinking = any(marker in source for marker in _THINKING_MARKERS)
        # Ollama's FIM (`suffix`) needs a template that places the suffix; HF templates never do.
        self.supports_insert = "suffix" in source

    @property
    def is_fallback(self) -> bool:
        return self.source == FALLBACK_CHATML_TEMPLATE

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
        add_generation_prompt: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Render a conversation into the prompt text.

        `extra` holds further template variables (Modelfile-level switches such as `enable_thinking`
        when `think` is None); the arguments above take precedence over it. Tools given to a template
        that cannot render them are ignored (logged), so clients that always send tools still work.
        Raises `TemplateRaisedError` when the template rejects the messages, `TemplateError` otherwise.
        """
        variables: dict[str, Any] = dict(extra or {})
        variables.update(
            messages=[_prepare_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        variables.update(_thinking_variables(think))
        if tools:
            if self.supports_tools:
                variables["tools"] = tools
            else:
                logger.info("chat template cannot render tools; ignoring %d tool definitions", len(tools))
        return self._render(variables)

    def render_generate(
        self,
        prompt: str,
        system: str | None = None,
        *,
        suffix: str | None = None,
        think: bool | str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Render Ollama's `/api/generate` input: messages `[system?, user]` plus a generation prompt.

        `prompt` and `suffix` are also offered as template variables, for templates that implement
        fill-in-the-middle (`supports_insert`); the API refuses `suffix` for the others.
        """
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        variables = dict(extra or {})
        variables["prompt"] = prompt
        if suffix:
            variables["suffix"] = suffix
        return self.render(messages, think=think, add_generation_prompt=True, extra=variables)

    def _render(self, variables: dict[str, Any]) -> str:
        try:
            return self._compiled.render(variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # a template is foreign code: any failure is a rendering failure
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
