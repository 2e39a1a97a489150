"""What every HTTP face needs: settings, the model store, the scheduler and the generator."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from rkllama_ollama.config import Settings
from rkllama_ollama.generation import Generator
from rkllama_ollama.models.names import InvalidModelName, parse_name
from rkllama_ollama.models.store import Store
from rkllama_ollama.scheduler import Scheduler


@dataclass
class AppContext:
    settings: Settings
    store: Store
    scheduler: Scheduler
    generator: Generator

    @staticmethod
    def display_name(name: str) -> str:
        """The shortest display form (`x` -> `x:latest`), or the name as sent when it is not valid."""
        try:
            return parse_name(name).display
        except InvalidModelName:
            return name


CONTEXT_KEY = web.AppKey("context", AppContext)
