"""`rkllama-ollama run`: one answer, or an interactive chat REPL shaped like `ollama run`."""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rkllama_ollama.cli.client import Client, DaemonError
from rkllama_ollama.cli.formatting import show_info

log = logging.getLogger(__name__)

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
DIM = "\x1b[90m"
RESET = "\x1b[0m"

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""
SET_HELP = """Available Commands:
  /set parameter KEY VALUE   Set a parameter (num_predict, temperature, top_k, top_p, seed, stop, ...)
  /set system <string>       Set system message
  /set verbose               Show timings for each response
  /set quiet                 Disable timings
  /set think | nothink       Enable or disable thinking
"""
SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""


class ParameterError(ValueError):
    pass


def parameter_value(key: str, values: list[str]) -> Any:
    """Type a `/set parameter KEY VALUE...` value the way the daemon's options expect it."""
    from rkllama_ollama.options import BOOL_OPTIONS, FLOAT_OPTIONS, INT_OPTIONS, LIST_OPTIONS  # the one table

    if not values:
        raise ParameterError(f"missing value for {key!r}")
    text = " ".join(values)
    try:
        if key in LIST_OPTIONS:
            return list(values)
        if key in INT_OPTIONS:
            return int(text)
        if key in FLOAT_OPTIONS:
            return float(text)
    except ValueError:
        kind = "int" if key in INT_OPTIONS else "float"
        raise ParameterError(f"invalid {kind} value [{text}]") from None
    if key in BOOL_OPTIONS:
        if text.lower() not in ("true", "false"):
            raise ParameterError(f"invalid bool value [{text}]")
        return text.lower() == "true"
    raise ParameterError(f"unknown parameter {key!r}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
_WORD = re.compile(r"""(?:"([^"]+)"|'([^']+)'|(\S+))""")


def extract_images(prompt: str) -> tuple[str, list[Path]]:
    """Like `ollama run`: picture files named in the prompt (quoted or not) are taken out of it and sent
    as images. Returns the remaining prompt and the files, in order."""
    found: list[Path] = []
    kept: list[str] = []
    position = 0
    for match in _WORD.finditer(prompt):
        word = match.group(1) or match.group(2) or match.group(3)
        path = Path(word).expanduser()
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            kept.append(prompt[position : match.start()])
            position = match.end()
            found.append(path)
    kept.append(prompt[position:])
    return " ".join(" ".join(kept).split()), found


@dataclass
class Session:
    """What one `run` keeps between turns."""

    client: Client
    model: str
    out: TextIO
    messages: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    think: bool | None = None
    verbose: bool = False
    keep_alive: str | None = None
    color: bool = False
    vision: bool = False  # the model takes images: picture paths in a prompt are sent as images

    def user_message(self, prompt: str) -> dict[str, Any]:
        if not self.vision:
            return {"role": "user", "content": prompt}
        text, files = extract_images(prompt)
        if not files:
            return {"role": "user", "content": prompt}
        for path in files:
            self._write_dim(f"Added image '{path}'\n")
        images = [base64.b64encode(path.read_bytes()).decode("ascii") for path in files]
        return {"role": "user", "content": text, "images": images}

    def request_body(self, prompt: str | dict[str, Any]) -> dict[str, Any]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        user = prompt if isinstance(prompt, dict) else {"role": "user", "content": prompt}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*messages, user],
            "stream": True,
        }
        if self.options:
            body["options"] = self.options
        if self.think is not None:
            body["think"] = self.think
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    def ask(self, prompt: str) -> None:
        """Stream one answer to the terminal and keep the turn in the history."""
        user = self.user_message(prompt)
        events = self.client.chat(self.request_body(user))
        try:
            answer, final = self._print_stream(events)
        finally:
            events.close()  # type: ignore[attr-defined]
        self.messages += [user, {"role": "assistant", "content": answer}]
        if self.verbose and final:
            self.out.write(stats_text(final))
            self.out.flush()

    def _print_stream(self, events: Iterator[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
        answer: list[str] = []
        thinking = False
        final = None
        for event in events:
            message = event.get("message") or {}
            if message.get("thinking"):
                if not thinking:
                    self._write_dim("Thinking...\n")
                    thinking = True
                self._write_dim(message["thinking"])
            content = message.get("content") or ""
            if content:
                if thinking:
                    self._write_dim("\n...done thinking.\n\n")
                    thinking = False
                answer.append(content)
                self.out.write(content)
                self.out.flush()
            if event.get("done"):
                final = event
        text = "".join(answer)
        self.out.write("\n" if text.endswith("\n") else "\n\n")
        self.out.flush()
        return text, final

    def _write_dim(self, text: str) -> None:
        self.out.write(f"{DIM}{text}{RESET}" if self.color else text)
        self.out.flush()

    # -- slash commands -----------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a `/command`; False means the REPL should end."""
        words = line.split()
        name, args = words[0].lower(), words[1:]
        if name in ("/bye", "/exit"):
            return False
        if name in ("/?", "/help"):
            topic = args[0].lower() if args else ""
            self.say(SET_HELP if topic == "/set" else SHOW_HELP if topic == "/show" else HELP)
        elif name == "/clear":
            self.messages.clear()
            self.say("Cleared session context\n")
        elif name == "/set":
            self._set(line, args)
        elif name == "/show":
            self._show(args)
        else:
            self.say(f"Unknown command '{words[0]}'. Type /? for help\n")
        return True

    def _set(self, line: str, args: list[str]) -> None:
        what = args[0].lower() if args else ""
        if what == "parameter":
            if len(args) < 3:
                self.say("Usage: /set parameter KEY VALUE\n")
                return
            key = args[1]
            try:
                self.options[key] = parameter_value(key, args[2:])
            except ParameterError as exc:
                self.say(f"Couldn't set parameter: {exc}\n")
                return
            self.say(f"Set parameter '{key}' to '{' '.join(args[2:])}'\n")
        elif what == "system":
            text = line.split(None, 2)[2] if len(args) > 1 else ""
            self.system = text.strip().strip('"') or None
            self.say("Set system message.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.say(f"Set '{what}' mode.\n")
        elif what in ("think", "nothink"):
            self.think = what == "think"
            self.say(f"Set '{what}' mode.\n")
        else:
            self.say(SET_HELP)

    def _show(self, args: list[str]) -> None:
        what = args[0].lower() if args else ""
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            self.say(SHOW_HELP)
            return
        try:
            info = self.client.show(self.model)
        except DaemonError as exc:
            self.say(f"Error: {exc.message}\n")
            return
        if what == "info":
            self.say(show_info(info))
        elif what == "parameters":
            params = "\n".join(f"{k:<30} {v}" for k, v in self.options.items())
            self.say((info.get("parameters") or "No parameters set for this model.") + "\n")
            if params:
                self.say(f"User defined parameters:\n{params}\n")
        elif what == "system" and self.system:
            self.say(self.system + "\n")
        else:
            text = str(info.get(what) or "")
            self.say(text + "\n" if text else f"No {what} was specified for this model.\n")

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def read_message(read_line: Callable[[str], str]) -> str:
    """One user message: a line, or a `\"\"\"` block over several lines. EOFError ends input."""
    line = read_line(PROMPT)
    stripped = line.strip()
    if not stripped.startswith(FENCE):
        return line
    body = stripped[len(FENCE) :]
    if body.endswith(FENCE) and body:
        return body[: -len(FENCE)]
    lines = [body] if body else []
    while True:
        line = read_line(CONTINUATION)
        if line.rstrip().endswith(FENCE):
            lines.append(line.rstrip()[: -len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def interactive(session: Session, read_line: Callable[[str], str] = input) -> int:
    """The REPL; returns the exit code."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on Linux
        pass
    while True:
        try:
            message = read_message(read_line)
        except EOFError:
            session.say("\n")
            return 0
        except KeyboardInterrupt:
            session.say("\nUse Ctrl + d or /bye to exit.\n")
            continue
        if not message.strip():
            continue
        if message.lstrip().startswith("/") and not message.lstrip().startswith("//"):
            if not session.command(message.strip()):
                return 0
            continue
        try:
            session.ask(message)
        except KeyboardInterrupt:
            session.say("\n\n")
        except DaemonError as exc:
            session.say(f"Error: {exc.message}\n")


def stats_text(final: dict[str, Any]) -> str:
    """The `--verbose` timing block from a final chat/generate object (durations in ns)."""

    def seconds(key: str) -> float:
        return float(final.get(key) or 0) / 1e9

    def duration(key: str) -> str:
        return duration_text(int(final.get(key) or 0))

    def rate(count_key: str, duration_key: str) -> str:
        duration = seconds(duration_key)
        return f"{(final.get(count_key) or 0) / duration:.2f} tokens/s" if duration > 0 else "n/a"

    rows = [
        ("total duration", duration("total_duration")),
        ("load duration", duration("load_duration")),
        ("prompt eval count", f"{final.get('prompt_eval_count') or 0} token(s)"),
        ("prompt eval duration", duration("prompt_eval_duration")),
        ("prompt eval rate", rate("prompt_eval_count", "prompt_eval_duration")),
        ("eval count", f"{final.get('eval_count') or 0} token(s)"),
        ("eval duration", duration("eval_duration")),
        ("eval rate", rate("eval_count", "eval_duration")),
    ]
    return "".join(f"{label + ':':<22}{value}\n" for label, value in rows)


def duration_text(nanoseconds: int) -> str:
    """A duration the way Go prints one: `850ns`, `12.5µs`, `3.2751ms`, `1.77s`, `2m3.5s`."""
    if nanoseconds < 1_000:
        return f"{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return f"{nanoseconds / 1e3:.6g}µs"
    if nanoseconds < 1_000_000_000:
        return f"{nanoseconds / 1e6:.6g}ms"
    seconds = nanoseconds / 1e9
    if seconds < 60:
        return f"{seconds:.6g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.6g}s"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_once(session: Session, prompt: str) -> int:
    session.ask(prompt)
    return 0


def run(session: Session, prompt_words: list[str], stdin: TextIO | None = None) -> int:
    """`run MODEL [PROMPT]`: piped stdin or a prompt answers once; a terminal gets the REPL."""
    stdin = stdin or sys.stdin
    parts = []
    if not is_terminal(stdin):
        parts.append(stdin.read())
    if prompt_words:
        parts.append(" ".join(prompt_words))
    if parts:
        prompt = " ".join(p.strip() for p in parts if p.strip())
        if not prompt:
            return 0
        return run_once(session, prompt)
    return interactive(session)
