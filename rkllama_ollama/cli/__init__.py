"""The `rkllama-ollama` command (`commands.py`), its HTTP client for the daemon (`client.py`), the
`run` REPL (`repl.py`) and the text shapes of its output (`formatting.py`). It imports no server module
at start-up."""

from rkllama_ollama.cli.commands import main

__all__ = ["main"]
