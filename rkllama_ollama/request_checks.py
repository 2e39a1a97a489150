"""The checks every face makes before a generation: the model exists, it can do what is asked (chat or
generate, thinking, fill-in-the-middle), and it sees pictures when the request has some.

A refusal is a `RequestRefused(status, message)`; the error middleware (api/app.py) writes it in the
face's error shape. The model is named as the client sent it (`label`), like Ollama does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from rkllama_ollama.models.capabilities import Capability
from rkllama_ollama.models.names import InvalidModelName, name_from_folder
from rkllama_ollama.models.store import ModelEntry, ModelNotFound, Store

# What a generation is called in Ollama's capability errors ('"x" does not support chat').
Kind = Literal["chat", "generate"]

NOT_FOUND = "model '{}' not found"
NOT_FOUND_PULL = 'model "{}" not found, try pulling it first'  # Ollama's wording for embeddings


class RequestRefused(Exception):
    """A request the model cannot serve: an HTTP status and Ollama's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestChecks:
    """The one checker the faces share. `folder_names`: also accept a model's folder name (the
    original RKLLama routes name models that way)."""

    def __init__(self, store: Store, *, folder_names: bool = False) -> None:
        self.store = store
        self.folder_names = folder_names

    async def resolve(self, label: str, *, not_found: str = NOT_FOUND) -> ModelEntry:
        """The model named `label`; 404 `not_found` (formatted with the label) when there is none."""
        try:
            return await asyncio.to_thread(self._resolve, label)
        except ModelNotFound:
            raise RequestRefused(404, not_found.format(label)) from None

    def _resolve(self, label: str) -> ModelEntry:
        if self.folder_names:
            try:
                return self.store.resolve(name_from_folder(label))
            except (InvalidModelName, ModelNotFound):
                pass
        return self.store.resolve(label)

    @staticmethod
    def check(
        entry: ModelEntry,
        label: str,
        *,
        kind: Kind,
        think: bool | str | None = None,
        insert: bool = False,
        images: bool = False,
    ) -> None:
        """Refuse (400) what the model cannot do: `kind` needs completion, a `think` that is on needs
        thinking, a suffix (`insert`) needs a template with one, pictures (`images`) need vision."""
        capabilities = entry.capabilities
        if Capability.COMPLETION not in capabilities:
            raise RequestRefused(400, f'"{label}" does not support {kind}')
        if think not in (None, False) and Capability.THINKING not in capabilities:
            raise RequestRefused(400, f'"{label}" does not support thinking')
        if insert and Capability.INSERT not in capabilities:
            raise RequestRefused(400, f"{entry.name.full} does not support insert")
        if images and Capability.VISION not in capabilities:
            raise RequestRefused(400, f'"{label}" does not support images')

    async def model_for(
        self,
        label: str,
        *,
        kind: Kind,
        think: bool | str | None = None,
        insert: bool = False,
        images: bool = False,
        label_of: Callable[[ModelEntry], str] | None = None,
    ) -> ModelEntry:
        """`resolve` then `check`; `label_of` names the model in the capability errors (default: as sent)."""
        entry = await self.resolve(label)
        name = label_of(entry) if label_of is not None else label
        self.check(entry, name, kind=kind, think=think, insert=insert, images=images)
        return entry
