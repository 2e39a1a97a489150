"""Several sequences at once in one llama.cpp context (RKLLAMA_NUM_PARALLEL > 1, the `llamacpp` engine).

One decode thread owns the llama.cpp context. Each `generate` call (the runner runs each in a thread
of its own) becomes a sequence in one of `parallel` slots; every step puts one token of each
generating sequence, then prompt chunks of the sequences being fed, into one `llama_batch` (a
sequence id per slot) and makes one `llama_decode`; each sequence samples from its own logits with its
own sampler chain, exactly as the single-sequence session does. On a CPU a step costs about what a
one-token step costs while the weights are read once, so several users stream at once for little more
than the price of one.

Decisions worth knowing:
- the model is loaded by the single-sequence session (same context cap, pinning, model facts,
  samplers); its context is then replaced by one of `parallel` sequences of `num_ctx` tokens each, kept
  in separate KV streams, so each sequence sees the same cache layout as the serial session would
  (at temperature 0 a stream's text is the one a serial run gives);
- each slot keeps the tokens it holds after its request; a new request takes the free slot that shares
  the longest prefix with its prompt (the least recently used among equals) and feeds only the rest (a
  conversation returning to its slot re-feeds only the new message);
- a sequence that fills its `num_ctx` shifts its own context like the serial session (or ends with
  "length" when `shift` is off or the model cannot shift);
- requests beyond `parallel` wait in arrival order (the scheduler never sends more than `parallel`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from rkllama_ollama.runtime.base import (
    Cancel,
    DoneReason,
    EmitPiece,
    GenerationStats,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
    TokenLogprob,
)
from rkllama_ollama.runtime.llamacpp import LlamaCppSession, _PieceDecoder

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One request in a slot."""

    tokens: list[int]  # the whole prompt
    options: SamplingOptions
    sampler: Any
    emit: EmitPiece
    cancel: Cancel
    decoder: _PieceDecoder
    started_ns: int = 0
    slot: int = -1
    pending: list[int] = field(default_factory=list)  # prompt tokens not fed yet
    reused: int = 0
    next_token: int | None = None  # sampled, to be fed in the next step
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_done_ns: int = 0
    done_reason: DoneReason = DoneReason.STOP  # set when the sequence finishes
    stats: GenerationStats | None = None
    error: Exception | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class BatchedLlamaCppSession(LlamaCppSession):
    """A GGUF model serving `spec.parallel` sequences at once. See the module docstring."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        llama_cpp = self._llama_cpp
        llm = self._require_open()
        self._parallel = max(1, spec.parallel)
        params = llama_cpp.llama_context_default_params()
        for name, _ in params._fields_:  # the single-sequence context's settings (threads, batch sizes)
            setattr(params, name, getattr(llm.context_params, name))
        params.n_ctx = self._n_ctx * self._parallel
        params.n_seq_max = self._parallel
        params.kv_unified = False  # one KV stream per sequence: the layout a serial run has
        llm._ctx.close()  # the single-sequence context goes before the larger one is allocated
        from llama_cpp._internals import LlamaContext

        try:
            llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise RuntimeFailure(
                f"could not allocate {self._parallel} sequences of {self._n_ctx} tokens: {exc}"
            ) from exc
        self._ctx = llm._ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._n_batch = int(params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        single_kv = self.info.memory_bytes - int(llama_cpp.llama_model_size(llm.model))
        self.info = replace(
            self.info,
            parallel=self._parallel,
            memory_bytes=self.info.memory_bytes + single_kv * (self._parallel - 1),
        )
        self._slots: list[list[int]] = [[] for _ in range(self._parallel)]  # tokens each slot holds
        self._slot_used = [0] * self._parallel  # when each slot was last taken (admission count)
        self._admitted = 0
        self._active: list[_Sequence | None] = [None] * self._parallel
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._decode_loop, name="batched-decode", daemon=True)
        self._thread.start()
        logger.info("serving %d sequences of %d tokens at once", self._parallel, self._n_ctx)

    # -- requests ----------------------------------------------------------------------------

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        self._require_open()
        tokens = self._prompt_tokens(prompt)
        cancel = cancel or Cancel()
        if cancel.is_set():
            return GenerationStats(DoneReason.ABORT, len(tokens), 0, 0, 0, 0, context=tokens)
        sequence = _Sequence(
            tokens,
            options,
            self._build_sampler(options, tokens),
            emit,
            cancel,
            _PieceDecoder(self._token_bytes),
            started_ns=time.perf_counter_ns(),
        )
        try:
            with self._wake:
                if self._closing:
                    raise RuntimeFailure("the model has been unloaded")
                self._queue.append(sequence)
                self._wake.notify()
            sequence.finished.wait()
        finally:
            sequence.sampler.close()
        if sequence.error is not None:
            raise sequence.error
        assert sequence.stats is not None
        return sequence.stats

    # -- the decode thread -------------------------------------------------------------------

    def _decode_loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._queue and not any(self._active):
                    self._wake.wait()
                if self._closing:
                    waiting = list(self._queue) + [s for s in self._active if s is not None]
                    self._queue.clear()
                    break
                while self._queue and None in self._active:
                    self._admit(self._queue.popleft())
            try:
                self._step()
            except Exception as exc:  # a decode failure ends every sequence in the batch
                logger.exception("batched decode failed")
                self._fail_all(RuntimeFailure(f"llama.cpp failed during generation: {exc}"))
        for sequence in waiting:
            sequence.error = RuntimeFailure("the model has been unloaded")
            sequence.finished.set()

    def _admit(self, sequence: _Sequence) -> None:
        """Put a request in the free slot that shares the longest prefix with its prompt; among equals
        (often just the system prompt) the least recently used, which keeps the busier conversations."""
        llama_cpp, tokens = self._llama_cpp, sequence.tokens
        free = [slot for slot, active in enumerate(self._active) if active is None]
        shared_by = {slot: _shared_prefix(self._slots[slot], tokens) for slot in free}
        slot = max(free, key=lambda s: (shared_by[s], -self._slot_used[s]))
        self._admitted += 1
        self._slot_used[slot] = self._admitted
        shared = min(shared_by[slot], len(tokens) - 1)  # at least one token is fed, for its logits
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot, shared, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            shared = 0
        self._slots[slot] = tokens[:shared]
        sequence.slot, sequence.reused, sequence.pending = slot, shared, tokens[shared:]
        self._active[slot] = sequence

    def _step(self) -> None:
        """One llama_decode for every active sequence: generated tokens first, then prompt chunks."""
        llama_cpp, batch = self._llama_cpp, self._batch
        for sequence in self._running():
            if sequence.cancel.is_set():
                self._finish(sequence, DoneReason.ABORT)
        entries: list[tuple[_Sequence, int, bool]] = []  # (sequence, token, wants logits)
        for sequence in self._running():
            if sequence.next_token is not None and len(entries) < self._n_batch:
                entries.append((sequence, sequence.next_token, True))
                sequence.next_token = None
        for sequence in self._running():
            room = self._n_batch - len(entries)
            if sequence.pending and room > 0:
                chunk, sequence.pending = sequence.pending[:room], sequence.pending[room:]
                last = len(chunk) - 1
                entries += [
                    (sequence, token, i == last and not sequence.pending) for i, token in enumerate(chunk)
                ]
        if not entries:
            return
        outputs: list[tuple[_Sequence, int]] = []
        for index, (sequence, token, logits) in enumerate(entries):
            slot_tokens = self._slots[sequence.slot]
            batch.token[index] = token
            batch.pos[index] = len(slot_tokens)
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence.slot
            batch.logits[index] = logits
            slot_tokens.append(token)
            if logits:
                outputs.append((sequence, index))
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        now = time.perf_counter_ns()
        for sequence, index in outputs:
            if not sequence.prompt_done_ns:
                sequence.prompt_done_ns = now
            self._sample(sequence, index)

    def _running(self) -> list[_Sequence]:
        return [sequence for sequence in self._active if sequence is not None]

    def _sample(self, sequence: _Sequence, index: int) -> None:
        options = sequence.options
        limit = options.num_predict if options.num_predict >= 0 else self._n_ctx
        if len(sequence.generated) >= limit:
            self._finish(sequence, DoneReason.LENGTH)
            return
        if sequence.cancel.is_set():
            self._finish(sequence, DoneReason.ABORT)
            return
        token = int(sequence.sampler.sample(self._ctx, index))
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(sequence, DoneReason.STOP)
            return
        sequence.generated.append(token)
        piece = sequence.decoder.feed(token)
        if options.top_logprobs >= 0:
            sequence.logprobs.append(self._logprob_at(index, token, options.top_logprobs))
            if piece:
                sequence.emit(piece, sequence.logprobs)
                sequence.logprobs = []
        elif piece:
            sequence.emit(piece)
        if len(sequence.generated) >= limit:
            self._finish(sequence, DoneReason.LENGTH)
            return
        shift = options.shift and options.num_predict != -2
        if len(self._slots[sequence.slot]) >= self._n_ctx and not (shift and self._shift(sequence)):
            self._finish(sequence, DoneReason.LENGTH)
            return
        sequence.next_token = token

    def _shift(self, sequence: _Sequence) -> bool:
        """The serial session's context shift, on this sequence only."""
        llama_cpp = self._llama_cpp
        if not llama_cpp.llama_memory_can_shift(self._memory):
            return False
        held = self._slots[sequence.slot]
        filled = len(held)
        keep = max(0, min(sequence.options.num_keep, filled - 2))
        discard = (filled - keep) // 2
        llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, keep, keep + discard)
        llama_cpp.llama_memory_seq_add(self._memory, sequence.slot, keep + discard, filled, -discard)
        del held[keep : keep + discard]
        logger.info(
            "sequence %d full at %d tokens: kept %d, dropped the %d after them",
            sequence.slot,
            filled,
            keep,
            discard,
        )
        return True

    def _logprob_at(self, index: int, token: int, top: int) -> TokenLogprob:
        """Like the serial session's log-probabilities, from the logits at batch position `index`."""
        return self._logprob_at_position(self._ctx.ctx, index, token, top)

    def _finish(self, sequence: _Sequence, reason: DoneReason) -> None:
        tail = sequence.decoder.flush()
        if sequence.logprobs:
            sequence.emit(tail, sequence.logprobs)
        elif tail:
            sequence.emit(tail)
        finished = time.perf_counter_ns()
        prompt_done = sequence.prompt_done_ns or finished
        fed = len(sequence.tokens) - sequence.reused - len(sequence.pending)
        if sequence.pending:  # aborted while its prompt was being fed: the slot holds a partial prompt
            reason = DoneReason.ABORT
        sequence.stats = GenerationStats(
            done_reason=reason,
            prompt_tokens=len(sequence.tokens),
            prompt_eval_count=fed,
            prompt_eval_ns=prompt_done - sequence.started_ns,
            eval_count=len(sequence.generated),
            eval_ns=finished - prompt_done,
            context=sequence.tokens + sequence.generated,
        )
        logger.info(
            "sequence %d generated %d tokens (%s), prompt %d tokens of which %d fed",
            sequence.slot,
            len(sequence.generated),
            reason,
            len(sequence.tokens),
            fed,
        )
        self._release(sequence)

    def _fail_all(self, error: Exception) -> None:
        for sequence in self._running():
            self._llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, -1, -1)
            self._slots[sequence.slot] = []
            sequence.error = error
            self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        self._active[sequence.slot] = None
        sequence.finished.set()

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if self._llm is not None:
            self._llama_cpp.llama_batch_free(self._batch)
        super().close()


def _shared_prefix(held: list[int], tokens: list[int]) -> int:
    shared = 0
    for old, new in zip(held, tokens, strict=False):
        if old != new:
            break
        shared += 1
    return shared


class BatchedLlamaCppRuntime:
    """The `llamacpp` engine with several sequences per context."""

    def load(self, spec: LoadSpec) -> BatchedLlamaCppSession:
        return BatchedLlamaCppSession(spec)
