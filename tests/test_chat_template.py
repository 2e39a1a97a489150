"""Chat-template rendering: HF semantics, tools, thinking switches, errors.

The templates below are written for these tests in the shape of the families they imitate
(ChatML, Qwen2.5 with tools, Qwen3 with enable_thinking, Llama 3, DeepSeek-R1), not copied.
"""

from __future__ import annotations

import json
import logging

import pytest

from rkllama_ollama.chat.template import (
    FALLBACK_CHATML_TEMPLATE,
    ChatTemplate,
    TemplateError,
    TemplateRaisedError,
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25_TOOLS = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\\n\\n# Tools\\n\\nFunction signatures are listed in <tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}{{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nCall a function by replying with <tool_call>\\n'
        + '{"name": <name>, "arguments": <object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

QWEN3_THINKING = """
{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n'
                + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA3 = """
{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + date_string + '\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message.role == 'user' and loop.first and tools is defined %}
        {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
        {{- 'Answer with a JSON object {"name": function name, "parameters": argument object}.\\n\\n' }}
        {%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
    {%- elif message.tool_calls is defined and message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'
            + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

DEEPSEEK_R1 = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% else %}<｜Assistant｜>{{ m.content }}<｜end｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city <b>now</b> & 'later' — ☀",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_chatml_renders_turns_and_generation_prompt() -> None:
    template = ChatTemplate(CHATML)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert not template.supports_tools
    assert not template.supports_thinking


def test_roles_are_lower_cased_and_null_content_is_empty() -> None:
    template = ChatTemplate(CHATML)
    rendered = template.render([{"role": "USER", "content": None}], add_generation_prompt=False)
    assert rendered == "<|im_start|>user\n<|im_end|>\n"


def test_fallback_chatml_is_used_without_a_model_template() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.source == FALLBACK_CHATML_TEMPLATE
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate("  ").is_fallback
    assert ChatTemplate("").render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
    assert not ChatTemplate(CHATML).is_fallback


def test_fallback_chatml_renders_tool_calls_in_history() -> None:
    template = ChatTemplate("")
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "f"},
    ]
    rendered = template.render(messages, add_generation_prompt=False)
    assert (
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>'
        in rendered
    )
    assert rendered.endswith("<|im_start|>tool\nsunny<|im_end|>\n")


def test_qwen25_tools_are_rendered_as_unescaped_json() -> None:
    template = ChatTemplate(QWEN25_TOOLS)
    assert template.supports_tools
    rendered = template.render([{"role": "user", "content": "Weather in Tokyo?"}], tools=[WEATHER_TOOL])
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in rendered
    assert "<b>now</b> & 'later' — ☀" in rendered  # tojson does not HTML-escape nor ASCII-escape
    assert "\\u003c" not in rendered and "&lt;" not in rendered
    assert rendered.endswith("<|im_start|>user\nWeather in Tokyo?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen25_without_tools_has_no_tools_section() -> None:
    rendered = ChatTemplate(QWEN25_TOOLS).render([{"role": "user", "content": "Hi"}], tools=[])
    assert "<tools>" not in rendered
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_qwen25_tool_history_round_trip() -> None:
    """Ollama history: assistant tool_calls with dict arguments, then `tool` results (grouped)."""
    messages = [
        {"role": "user", "content": "Weather in Tokyo and Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_abcdefgh",
                    "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}},
                },
                # OpenAI clients send arguments as a JSON string: rendered the same way
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            ],
        },
        {"role": "tool", "content": "22C", "tool_name": "get_weather", "tool_call_id": "call_abcdefgh"},
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
    ]
    rendered = ChatTemplate(QWEN25_TOOLS).render(messages, tools=[WEATHER_TOOL])
    assert (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in rendered
    assert (
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
    ) in rendered


def test_tool_message_fields_reach_the_template() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m.name }}|{{ m.tool_name }}|{{ m.tool_call_id }}{% endfor %}"
    )
    message = {"role": "tool", "content": "x", "tool_name": "get_weather", "tool_call_id": "call_1"}
    assert template.render([message], add_generation_prompt=False) == "get_weather|get_weather|call_1"
    assert message == {"role": "tool", "content": "x", "tool_name": "get_weather", "tool_call_id": "call_1"}


def test_tools_are_ignored_and_logged_when_the_template_cannot_render_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    template = ChatTemplate(CHATML)
    with caplog.at_level(logging.INFO, logger="rkllama_ollama.chat.template"):
        rendered = template.render([{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL] * 35)
    assert rendered == template.render([{"role": "user", "content": "Hi"}])
    assert "ignoring 35 tool definitions" in caplog.text


def test_qwen3_enable_thinking_switch() -> None:
    template = ChatTemplate(QWEN3_THINKING)
    assert template.supports_thinking
    messages = [{"role": "user", "content": "2+2?"}]
    off = template.render(messages, think=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for think in (True, None, "low", "medium", "high"):
        assert template.render(messages, think=think).endswith("<|im_start|>assistant\n")


def test_thinking_variables() -> None:
    probe = ChatTemplate(
        "{{ enable_thinking if enable_thinking is defined else 'undef' }}/"
        "{{ reasoning_effort if reasoning_effort is defined else 'undef' }}"
    )
    assert probe.render([], think=None) == "undef/undef"
    assert probe.render([], think=True) == "True/undef"
    assert probe.render([], think=False) == "False/undef"
    assert probe.render([], think="low") == "True/low"
    assert probe.render([], think="high") == "True/high"
    assert probe.render([], think="max") == "True/high"
    # a Modelfile-level default applies only when the request leaves `think` unset
    assert probe.render([], think=None, extra={"enable_thinking": False}) == "False/undef"
    assert probe.render([], think=True, extra={"enable_thinking": False}) == "True/undef"
    with pytest.raises(TemplateError, match="invalid think value"):
        probe.render([], think="sometimes")


def test_qwen3_history_reasoning_from_ollama_thinking_field() -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "two plus two"},
    ]
    rendered = ChatTemplate(QWEN3_THINKING).render(messages, add_generation_prompt=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\ntwo plus two\n</think>\n\n4<|im_end|>\n")


def test_llama3_tools_bos_and_date() -> None:
    template = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert template.supports_tools
    messages = [{"role": "system", "content": " sys "}, {"role": "user", "content": "Weather?"}]
    rendered = template.render(messages, tools=[WEATHER_TOOL], extra={"date_string": "01 Jan 2025"})
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Today Date: 01 Jan 2025\n\nsys<|eot_id|>"
    )
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False, indent=4) in rendered
    assert rendered.endswith("Weather?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    dated = template.render([{"role": "user", "content": "Hi"}])
    assert "Today Date: " in dated and "undefined" not in dated


def test_llama3_tool_history() -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "ok", "tool_name": "f"},
    ]
    rendered = ChatTemplate(LLAMA3).render(messages, extra={"date_string": "d"})
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "f", "parameters": {"x": 1}}<|eot_id|>'
        in rendered
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nok<|eot_id|>" in rendered


def test_deepseek_style_prompt_ends_inside_thinking() -> None:
    template = ChatTemplate(DEEPSEEK_R1, bos_token="<BOS>")
    assert template.supports_thinking
    rendered = template.render([{"role": "user", "content": "Hi"}])
    assert rendered == "<BOS><｜User｜>Hi<｜Assistant｜><think>\n"


def test_raise_exception_gives_the_templates_message() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateRaisedError, match="^Conversation must start with a user turn$"):
        template.render([{"role": "assistant", "content": "x"}])


def test_syntax_error_is_a_template_error_at_load() -> None:
    with pytest.raises(TemplateError, match="chat template is invalid"):
        ChatTemplate("{% for m in messages %}{{ m }")


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[0].content.nope() }}",  # undefined method
        "{{ messages.append(1) }}",  # the sandbox forbids mutation
        "{{ 1 / 0 }}",
        "{{ messages[0].__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
    ],
)
def test_rendering_failures_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError) as caught:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert not isinstance(caught.value, TemplateRaisedError)
    assert str(caught.value).startswith("chat template failed")


def test_loop_controls_and_generation_block() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
    )
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "never"},
    ]
    assert template.render(messages) == "u[a]"


def test_tojson_options() -> None:
    template = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}")
    rendered = template.render([], extra={"x": {"b": "<é>", "a": 1}})
    assert rendered == '{"b": "<é>", "a": 1}|{\n  "b": "<é>",\n  "a": 1\n}|{"a": 1, "b": "<é>"}'


def test_render_generate_builds_system_and_user() -> None:
    template = ChatTemplate(CHATML)
    assert template.render_generate("Hi", "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render_generate("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not template.supports_insert


def test_render_generate_fill_in_the_middle_variables() -> None:
    template = ChatTemplate("<PRE> {{ prompt }} <SUF>{{ suffix }} <MID>")
    assert template.supports_insert
    assert (
        template.render_generate("def add(", suffix="    return c")
        == "<PRE> def add( <SUF>    return c <MID>"
    )
