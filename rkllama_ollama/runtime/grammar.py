"""Constraining only the answer of a thinking model (GBNF text; no engine import).

Ollama lets a thinking model think freely and applies `format` to the answer that follows the thinking
block. Two cases, after how the prompt ends:

- The prompt already opened the block (`...<|Assistant|><think>\\n`): the model thinks first, so the
  grammar waits. It is *lazy*: llama.cpp leaves sampling alone until the generated text matches
  `trigger_pattern` (the close tag), then feeds the grammar the text from the close tag on. Thinking
  costs nothing extra. The composed grammar therefore starts with the close tag itself.
- The model may or may not open a block itself: the grammar applies from the first token and allows an
  optional `<think> ... </think>` before the answer, whose body is any text that does not contain the
  close tag. An answer that skips thinking is still held to the format.

Assumption: the close tag's first character does not reappear later in the tag (true of `</think>`),
which keeps the "text without the tag" rules a simple chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMA_ROOT = "root"  # the start rule of a grammar made from a JSON schema
COMPOSED_ROOT = "rkllama-answer-root"
_BODY = "rkllama-think-body"
_WS = r"[ \t\n\r]*"


@dataclass(frozen=True)
class AnswerGrammar:
    gbnf: str
    root: str
    trigger_pattern: str | None  # lazy grammar: waits until the generated text matches this regex


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _class_char(char: str) -> str:
    if char in "\\]^-[":
        return "\\" + char
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, char)


def _text_without(tag: str) -> list[str]:
    """Rules for `_BODY`: any text in which `tag` does not occur (a chain of partial-match states)."""
    first = tag[0]
    if len(tag) == 1:
        return [f"{_BODY} ::= [^{_class_char(first)}]*"]
    state = [f"{_BODY}-{i}" for i in range(len(tag))]
    rules = [f"{_BODY} ::= ( [^{_class_char(first)}] | {_literal(first)} {state[1]} )*"]
    for i in range(1, len(tag)):
        char = tag[i]
        branches = [f"[^{_class_char(char)}{_class_char(first)}]", f"{_literal(first)} {state[1]}"]
        if i < len(tag) - 1:
            branches.append(f"{_literal(char)} {state[i + 1]}")
        rules.append(f"{state[i]} ::= " + " | ".join(branches))
    return rules


def answer_after_thinking(gbnf: str, open_tag: str, close_tag: str) -> AnswerGrammar:
    """`gbnf` (start rule `root`) applied only to what follows the thinking block.

    `open_tag` empty: the prompt opened the block (lazy grammar, triggered by `close_tag`).
    Otherwise the block is optional and the grammar applies from the first token.
    """
    if not close_tag:
        raise ValueError("a thinking block needs its close tag")
    if not open_tag:
        composed = f"{gbnf}\n{COMPOSED_ROOT} ::= {_literal(close_tag)} {_WS} {SCHEMA_ROOT}\n"
        pattern = r"[\s\S]*?(" + re.escape(close_tag) + r"[\s\S]*)"
        return AnswerGrammar(composed, COMPOSED_ROOT, pattern)
    block = f"( {_literal(open_tag)} {_BODY} {_literal(close_tag)} {_WS} )?"
    rules = [f"{COMPOSED_ROOT} ::= {_WS} {block} {SCHEMA_ROOT}", *_text_without(close_tag)]
    return AnswerGrammar(gbnf + "\n" + "\n".join(rules) + "\n", COMPOSED_ROOT, None)
