"""Conversation caches: the KV state of the last few conversations of one loaded model, keyed by the
token sequence each state holds, so a returning conversation restores its state instead of re-feeding.

Both engines use it (one instance per session, in the runner process):
- llama.cpp hands over its per-sequence state as bytes (`add_state`): kept in RAM up to a byte budget,
  the least recently used spilled to files beyond it;
- the RKLLM runtime writes prompt-cache files itself (`reserve_file`, then `add_file` once written).

A conversation that grew turn by turn keeps one entry: a new state whose tokens extend an older
entry's tokens supersedes it. Lookup is a token-by-token longest-common-prefix over the entries.
Files live in a folder of their own per process (`<model cache folder>/<engine>-<pid>`): folders of
processes that are gone are removed when a session starts, and the whole model cache folder is
removed with the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_SLOTS = 8  # conversations kept when the number is sized from free memory
RAM_SHARE_OF_AVAILABLE = 4  # the default RAM budget: a quarter of the memory available at load
# A restore must save at least this many tokens of prefill over what the live cache already offers:
# loading a state has a cost of its own, and a shared chat-template opener is not a conversation.
RESTORE_MIN_GAIN = 32
# The live cache is saved when a prompt is about to discard at least this many of its tokens.
SAVE_MIN_TOKENS = 32


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class CacheBudget:
    """How many conversations to keep and how much RAM their states may take."""

    slots: int
    ram_bytes: int

    @classmethod
    def sized(cls, slots: int, ram_mb: int, conversation_bytes: int) -> CacheBudget:
        """`slots` < 0 and `ram_mb` <= 0 mean "from free memory": the RAM budget is a quarter of the
        memory available now, and the slots as many full-context conversations (`conversation_bytes`
        each, 0 when unknown) as fit in it, between 1 and DEFAULT_MAX_SLOTS."""
        ram = ram_mb * 2**20 if ram_mb > 0 else available_memory_bytes() // RAM_SHARE_OF_AVAILABLE
        if slots < 0:
            fitting = ram // conversation_bytes if conversation_bytes > 0 else DEFAULT_MAX_SLOTS
            slots = max(1, min(DEFAULT_MAX_SLOTS, fitting))
        return cls(slots=slots, ram_bytes=ram)


@dataclass
class CachedConversation:
    tokens: tuple[int, ...]
    size: int  # bytes of the state
    data: bytes | None = None  # in RAM
    path: Path | None = None  # on disk


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ConversationCache:
    """Keeps up to `budget.slots` conversation states, most recently used last."""

    def __init__(self, model_folder: Path | None, engine: str, budget: CacheBudget) -> None:
        self.budget = budget
        self._entries: list[CachedConversation] = []
        self._folder: Path | None = None
        if model_folder is not None and budget.slots > 0:
            self._remove_orphans(model_folder, engine)
            self._folder = model_folder / f"{engine}-{os.getpid()}"
            shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def enabled(self) -> bool:
        return self.budget.slots > 0

    @property
    def has_folder(self) -> bool:
        return self._folder is not None

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _remove_orphans(model_folder: Path, engine: str) -> None:
        if not model_folder.is_dir():
            return
        for child in model_folder.iterdir():
            engine_name, _, pid = child.name.rpartition("-")
            if engine_name == engine and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)

    def best_match(self, tokens: Sequence[int]) -> tuple[CachedConversation | None, int]:
        """The entry sharing the longest token prefix with `tokens`, and that length."""
        best: CachedConversation | None = None
        best_length = 0
        for entry in self._entries:
            length = common_prefix_length(entry.tokens, tokens)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def touch(self, entry: CachedConversation) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._entries.append(entry)

    def forget(self, entry: CachedConversation) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    def reserve_file(self) -> Path | None:
        """A new file path for a state the runtime writes itself (None without a folder)."""
        if self._folder is None:
            return None
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder / f"{uuid.uuid4().hex}.cache"

    def add_file(self, tokens: Sequence[int], path: Path) -> None:
        """Register a state file the runtime wrote, holding `tokens`."""
        if not path.is_file():
            log.warning("the runtime wrote no prompt cache at %s", path)
            return
        self._add(CachedConversation(tuple(tokens), path.stat().st_size, path=path))

    def add_state(self, tokens: Sequence[int], data: bytes) -> None:
        """Keep a state handed over as bytes (RAM first, spilled to disk past the RAM budget)."""
        self._add(CachedConversation(tuple(tokens), len(data), data=data))

    def read(self, entry: CachedConversation) -> bytes:
        if entry.data is not None:
            return entry.data
        assert entry.path is not None
        return entry.path.read_bytes()

    def _add(self, new: CachedConversation) -> None:
        if not self.enabled or not new.tokens:
            self.forget(new)
            return
        for entry in list(self._entries):
            shared = common_prefix_length(entry.tokens, new.tokens)
            if shared == len(entry.tokens):  # an earlier turn of the same conversation: superseded
                self.forget(entry)
            elif shared == len(new.tokens):  # already held, with more after it
                self.touch(entry)
                self.forget(new)
                return
        self._entries.append(new)
        while len(self._entries) > self.budget.slots:
            self.forget(self._entries[0])
        self._spill()

    def _spill(self) -> None:
        """Move the least recently used in-RAM states to disk while RAM use is over the budget (dropped
        instead when there is no folder)."""
        in_ram = sum(entry.size for entry in self._entries if entry.data is not None)
        for entry in list(self._entries):
            if in_ram <= self.budget.ram_bytes:
                return
            if entry.data is None:
                continue
            in_ram -= entry.size
            path = self.reserve_file()
            if path is None:
                self.forget(entry)
                continue
            try:
                path.write_bytes(entry.data)
            except OSError as exc:
                log.warning("could not spill a conversation state to %s: %s", path, exc)
                self.forget(entry)
                continue
            entry.path, entry.data = path, None

    def clear(self) -> None:
        for entry in list(self._entries):
            self.forget(entry)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
