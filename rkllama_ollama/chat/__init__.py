"""Messages -> prompt (template.py) and model output -> thinking / content / tool-call events (parse.py)."""

from rkllama_ollama.chat.parse import (
    CONTENT,
    STYLE_HERMES,
    STYLE_LLAMA3_JSON,
    STYLE_QWEN_XML,
    THINKING,
    TOOL_CALL,
    Event,
    OutputPipeline,
    StopMatcher,
    ThinkingSplitter,
    ToolCall,
    ToolCallParser,
    detect_tool_style,
    new_call_id,
    prompt_opens_thinking,
)
from rkllama_ollama.chat.template import (
    FALLBACK_CHATML_TEMPLATE,
    ChatTemplate,
    TemplateError,
    TemplateRaisedError,
)

__all__ = [
    "CONTENT",
    "FALLBACK_CHATML_TEMPLATE",
    "STYLE_HERMES",
    "STYLE_LLAMA3_JSON",
    "STYLE_QWEN_XML",
    "THINKING",
    "TOOL_CALL",
    "ChatTemplate",
    "Event",
    "OutputPipeline",
    "StopMatcher",
    "TemplateError",
    "TemplateRaisedError",
    "ThinkingSplitter",
    "ToolCall",
    "ToolCallParser",
    "detect_tool_style",
    "new_call_id",
    "prompt_opens_thinking",
]
