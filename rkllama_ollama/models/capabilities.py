"""Which Ollama capabilities a model has, judged from its chat template and metadata.

- ``embedding`` instead of ``completion`` for embedding-only models: a GGUF whose architecture is an
  encoder (``bert``, ``nomic-bert``, ...) or that has a ``<arch>.pooling_type`` key; an ``.rkllm`` whose
  file name says ``embedding`` (e.g. ``Qwen3-Embedding-0.6B-...rkllm``).
- ``tools`` when the template uses a ``tools`` variable (jinja) or ``.Tools`` (Go template).
- ``thinking`` when the template handles ``<think>``, ``enable_thinking`` or ``reasoning_content``.
- ``insert`` only when the template uses a ``suffix`` variable / ``.Suffix``; chat templates from Hugging
  Face almost never do, and a model that only has FIM tokens in its vocabulary is not enough.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Capability(StrEnum):
    """What a model can be asked for (Ollama's names; equal to those strings)."""

    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TOOLS = "tools"
    THINKING = "thinking"
    INSERT = "insert"
    VISION = "vision"  # a .rkllm model with its image encoder (models/store.py decides)


EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "neo-bert",
        "modern-bert",
        "t5encoder",
    }
)

_JINJA_CODE_RE = re.compile(r"\{%-?(.*?)-?%\}|\{\{-?(.*?)-?\}\}", re.DOTALL)
_TOOLS_RE = re.compile(r"(?<![\w.])tools\b|\.Tools\b")
_SUFFIX_RE = re.compile(r"(?<![\w.])suffix\b|\.Suffix\b")
_THINKING_MARKERS = ("<think>", "</think>", "enable_thinking", "reasoning_content", ".Think")


def _template_code(template: str) -> str:
    """The code inside ``{% %}`` and ``{{ }}`` tags (literal text in a template does not count)."""
    return "\n".join(a or b for a, b in _JINJA_CODE_RE.findall(template))


def is_embedding_only(architecture: str | None, metadata: Mapping[str, Any], file_name: str = "") -> bool:
    if architecture and architecture.lower() in EMBEDDING_ARCHITECTURES:
        return True
    if architecture and f"{architecture}.pooling_type" in metadata:
        return True
    return file_name.lower().endswith(".rkllm") and "embedding" in file_name.lower()


def detect_capabilities(
    template: str | None,
    *,
    architecture: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    file_name: str = "",
) -> list[Capability]:
    """Capabilities in Ollama's order: completion/embedding first, then tools, insert, thinking."""
    if is_embedding_only(architecture, metadata or {}, file_name):
        return [Capability.EMBEDDING]
    capabilities = [Capability.COMPLETION]
    if not template:
        return capabilities
    code = _template_code(template) if "{%" in template or "{{" in template else ""
    if _TOOLS_RE.search(code):
        capabilities.append(Capability.TOOLS)
    if _SUFFIX_RE.search(code):
        capabilities.append(Capability.INSERT)
    if any(marker in template for marker in _THINKING_MARKERS):
        capabilities.append(Capability.THINKING)
    return capabilities
