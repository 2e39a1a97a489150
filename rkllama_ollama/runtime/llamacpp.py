"""GGUF models on the CPU through llama-cpp-python (the `llamacpp` engine).

The session keeps llama.cpp's KV cache between calls: `generate` tokenizes the prompt, keeps the
longest prefix it shares, token by token, with the tokens already in the cache (the prompt fed and
the tokens generated), truncates the cache there and feeds only the rest. Conversation caches
(runtime/kv_cache.py): before a prompt discards a substantial part of the cache (another conversation,
a background request), the sequence's state is saved (llama_state_seq_get_data); a prompt that shares
more with a saved state than with the live cache restores that state (llama_state_seq_set_data) and
feeds only what follows. Sampling is a
llama.cpp sampler chain built per request from `SamplingOptions`. Decisions worth knowing:

- `num_ctx` is capped at the model's trained context length (read from the GGUF before the context
  is allocated): past it a RoPE model without scaling produces garbage, and the KV memory is wasted
  on a small board. `ModelInfo.context_length` reports the value in force; `num_ctx <= 0` means the
  trained length.
- Generated control tokens that are not end-of-generation (e.g. `<|im_start|>`) are emitted as text,
  as Ollama does, so stop sequences can see them; EOS/EOG tokens end the generation unseen.
- Prompts are tokenized with special-token parsing on (the prompt is a rendered chat template) and
  BOS added when the model asks for it; embedding inputs are tokenized as plain text.
- `num_predict`: > 0 is a limit, 0 evaluates the prompt only, < 0 generates until EOS or a full context.
- A session loaded with `embedding=True` only embeds and one loaded without only generates; the
  scheduler reloads with the other flag when it needs the other kind.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkllama_ollama.runtime.base import (
    Cancel,
    ContextOverflow,
    DoneReason,
    EmbedResult,
    EmitPiece,
    Engine,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    ModelInfo,
    RuntimeFailure,
    SamplingOptions,
    TokenLogprob,
)
from rkllama_ollama.runtime.cpus import plan_threads, process_pinning
from rkllama_ollama.runtime.grammar import answer_after_thinking
from rkllama_ollama.runtime.kv_cache import (
    RESTORE_MIN_GAIN,
    SAVE_MIN_TOKENS,
    CacheBudget,
    CachedConversation,
    ConversationCache,
    common_prefix_length,
)

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

_KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is F16
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: the dist sampler seeds itself randomly
_FALLBACK_CONTEXT = 4096  # when neither the request nor the GGUF names a context length
_SEQUENCE = 0  # the one sequence a session uses


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeFailure(
            "GGUF models need llama-cpp-python: install rkllama-ollama with the 'cpu' extra"
        ) from exc
    # Before the first Llama() the binding prints every native log line; keep only errors.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def _trained_context_length(llama_cpp: Any, model_path: str) -> int:
    """Read the trained context length from the GGUF without loading weights (vocab-only load)."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode("utf-8"), params)
    if not model:
        raise RuntimeFailure(f"could not read the GGUF model {model_path}: not a valid GGUF file")
    try:
        # A vocab-only load leaves the hyper-parameters at zero: read the metadata instead.
        arch = _metadata_value(llama_cpp, model, "general.architecture")
        value = _metadata_value(llama_cpp, model, f"{arch}.context_length") if arch else ""
        return int(value) if value.isdigit() else 0
    finally:
        llama_cpp.llama_model_free(model)


def _metadata_value(llama_cpp: Any, model: Any, key: str) -> str:
    buffer = ctypes.create_string_buffer(256)
    written = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace") if written >= 0 else ""


class _PieceDecoder:
    """Turns generated token ids into text pieces that never split a UTF-8 character."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


@dataclass(frozen=True)
class _FedPrompt:
    """A prompt once decoded into the context, what generation goes on from."""

    length: int  # the positions it takes: its tokens, and the cells of its pictures
    fed: int  # how many of them were decoded now rather than kept from the cache
    complete: bool  # False when a cancel stopped the decoding part way
    tokens: list[int]  # its token ids (pictures left out), the start of the request's `context`


class LlamaCppSession:
    """One GGUF model loaded in llama.cpp. See the module docstring for the decisions it makes."""

    def __init__(self, spec: LoadSpec) -> None:
        llama_cpp = _import_llama_cpp()
        self._llama_cpp = llama_cpp
        model_path = str(spec.model_path)
        if not Path(model_path).is_file():
            raise RuntimeFailure(f"model file not found: {model_path}")
        trained = _trained_context_length(llama_cpp, model_path)
        n_ctx = spec.num_ctx if spec.num_ctx > 0 else (trained or _FALLBACK_CONTEXT)
        if trained > 0:
            n_ctx = min(n_ctx, trained)
        if spec.num_ctx > n_ctx:
            logger.info("num_ctx %d capped at the trained context length %d", spec.num_ctx, n_ctx)
        pinning = process_pinning()  # this is the runner process: it hosts nothing but this model
        plan = plan_threads(spec.n_threads, tuple(spec.cores), cores=pinning.original)
        try:
            pinning.apply(plan)
        except OSError as exc:
            if spec.cores:  # the operator named them: say so rather than run elsewhere
                raise RuntimeFailure(
                    f"cannot run on cores {list(plan.cores)} (RKLLAMA_CPUS): {exc.strerror or exc}"
                ) from None
            logger.warning("could not pin to cores %s (%s); running unpinned", list(plan.cores), exc)
        n_threads = plan.threads
        # Embedding models need a whole input in one micro-batch (non-causal attention).
        n_batch = n_ctx if spec.embedding else min(n_ctx, 512)
        started = time.perf_counter()
        try:
            llm = llama_cpp.Llama(
                model_path=model_path,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                embedding=spec.embedding,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise RuntimeFailure(f"could not load the GGUF model {model_path}: {exc}") from exc
        self._llm: Llama | None = llm  # None once closed: every use goes through _require_open()
        self._embedding = spec.embedding
        # llama.cpp pads its context to a multiple of 256; the binding's bookkeeping holds `n_ctx`.
        self._n_ctx = min(n_ctx, int(llm.n_ctx()))
        self._vocab = llm._model.vocab
        self._add_bos = bool(llm._model.add_bos_token())
        self._piece_cache: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(64)
        self.info = self._model_info(model_path)
        budget = CacheBudget.sized(
            0 if spec.embedding else spec.kv_cache_slots,
            spec.kv_cache_ram_mb,
            self._kv_cache_bytes(self._llm.metadata),
        )
        self._conversations = ConversationCache(
            Path(spec.kv_cache_dir) if spec.kv_cache_dir else None, Engine.LLAMACPP, budget
        )
        logger.info(
            "loaded %s: n_ctx=%d threads=%d (%s%s) embedding=%s in %.3f s",
            model_path,
            self._n_ctx,
            n_threads,
            plan.reason,
            f", pinned to cores {list(plan.cores)}" if plan.cores else "",
            spec.embedding,
            time.perf_counter() - started,
        )

    # -- model facts -------------------------------------------------------------------------

    def _model_info(self, model_path: str) -> ModelInfo:
        llama_cpp = self._llama_cpp
        llm = self._require_open()
        metadata = llm.metadata
        bos, eos = llm.token_bos(), llm.token_eos()
        return ModelInfo(
            context_length=self._n_ctx,
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=self._token_text(bos) if bos >= 0 else "",
            eos_token=self._token_text(eos) if eos >= 0 else "",
            add_bos_token=self._add_bos,
            embedding_length=int(llm.n_embd()),
            memory_bytes=int(llama_cpp.llama_model_size(llm.model)) + self._kv_cache_bytes(metadata),
        )

    def _token_text(self, token: int) -> str:
        text = self._llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def _kv_cache_bytes(self, metadata: dict[str, str]) -> int:
        """Approximate size of the F16 KV cache for the whole context."""
        llama_cpp, llm = self._llama_cpp, self._require_open()
        model = llm.model
        n_layer = int(llama_cpp.llama_model_n_layer(model))
        n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        arch = metadata.get("general.architecture", "")
        head_dim_k = int(metadata.get(f"{arch}.attention.key_length", 0)) or llm.n_embd() // n_head
        head_dim_v = int(metadata.get(f"{arch}.attention.value_length", 0)) or head_dim_k
        return n_layer * self._n_ctx * n_head_kv * (head_dim_k + head_dim_v) * _KV_BYTES_PER_VALUE

    # -- tokens ------------------------------------------------------------------------------

    def _require_open(self) -> Llama:
        if self._llm is None:
            raise RuntimeFailure("the model has been unloaded")
        return self._llm

    def tokenize(self, text: str) -> list[int]:
        llm = self._require_open()
        return llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        """Inverse of `tokenize`: special tokens are rendered, BOS included."""
        llm = self._require_open()
        if not tokens:
            return ""
        n_vocab = int(llm.n_vocab())
        outside = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if outside is not None:  # llama.cpp would abort the process on it
            raise InvalidInput(f"token id {outside} is outside this model's vocabulary of {n_vocab} tokens")
        llama_cpp = self._llama_cpp
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, len(tokens) * 8)
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            written = llama_cpp.llama_detokenize(self._vocab, array, len(tokens), buffer, size, False, True)
            if written >= 0:
                return buffer.raw[:written].decode("utf-8", errors="replace")
            size = -written
        raise RuntimeFailure("could not detokenize the tokens")

    def _token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens rendered), cached per id."""
        piece = self._piece_cache.get(token)
        if piece is None:
            llama_cpp, buffer = self._llama_cpp, self._piece_buffer
            written = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
            if written < 0:
                buffer = ctypes.create_string_buffer(-written)
                written = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
            piece = buffer.raw[: max(written, 0)]
            self._piece_cache[token] = piece
        return piece

    # -- generation --------------------------------------------------------------------------

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """The prompt's tokens, refused when empty or longer than one sequence's context."""
        tokens = self.tokenize(prompt)
        self._check_prompt_length(len(tokens))
        return tokens

    def _check_prompt_length(self, length: int, note: str = "") -> None:
        """Refuse a prompt of no position or of more than one sequence's context (`note` qualifies
        the length in the message)."""
        if not length:
            raise RuntimeFailure("the prompt is empty")
        if length > self._n_ctx:
            raise ContextOverflow(
                f"the prompt is {length} tokens long{note}, "
                f"more than the context length of {self._n_ctx} tokens"
            )

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        llm = self._require_open()
        if self._embedding:
            raise RuntimeFailure("this model was loaded for embeddings; load it again to generate text")
        tokens = self._prompt_tokens(prompt)
        sampler = self._build_sampler(options, tokens)
        try:
            return self._run(llm, tokens, options, sampler, emit, cancel or Cancel())
        except RuntimeError as exc:  # llama_decode failures
            self._forget_cache(llm)
            raise RuntimeFailure(f"llama.cpp failed during generation: {exc}") from exc
        finally:
            sampler.close()

    def _run(
        self,
        llm: Any,
        tokens: list[int],
        options: SamplingOptions,
        sampler: Any,
        emit: EmitPiece,
        cancel: Cancel,
    ) -> GenerationStats:
        shift = options.shift and options.num_predict != -2  # -2 means "fill the context", then stop

        def has_room() -> bool:
            return llm.n_tokens < self._n_ctx or (shift and self._shift_context(llm, options.num_keep))

        return self._generate_from(
            llm,
            sampler,
            options,
            emit,
            cancel,
            feed_prompt=lambda: self._feed_prompt(llm, tokens, cancel),
            feed_token=lambda token: llm.eval([token]),
            has_room=has_room,
        )

    def _feed_prompt(self, llm: Any, tokens: list[int], cancel: Cancel) -> _FedPrompt:
        """Decode what the cache does not already hold of `tokens`, batch by batch until cancelled."""
        reused = self._reuse_or_restore(llm, tokens)
        pending = tokens[reused:]
        for start in range(0, len(pending), llm.n_batch):
            if cancel.is_set():
                break
            llm.eval(pending[start : start + llm.n_batch])
        return _FedPrompt(len(tokens), llm.n_tokens - reused, llm.n_tokens >= len(tokens), tokens)

    def _generate_from(
        self,
        llm: Any,
        sampler: Any,
        options: SamplingOptions,
        emit: EmitPiece,
        cancel: Cancel,
        *,
        feed_prompt: Callable[[], _FedPrompt],
        feed_token: Callable[[int], None],
        has_room: Callable[[], bool],
        unit: str = "tokens",
    ) -> GenerationStats:
        """Feed the prompt, then sample tokens until end of generation, the `num_predict` limit, a
        cancel or a full context, emitting their text (with logprobs when asked). `feed_token` decodes
        a sampled token so the next one can be sampled; `has_room` says whether one more fits (and may
        make room). Nothing is sampled after a prompt a cancel cut short. `unit` names the prompt's
        positions in the log line."""
        started = time.perf_counter_ns()
        prompt = feed_prompt()
        self._llama_cpp.llama_synchronize(llm.ctx)
        prompt_done = time.perf_counter_ns()

        generated: list[int] = []
        decoder = _PieceDecoder(self._token_bytes)
        top_logprobs = options.top_logprobs
        logprobs: list[TokenLogprob] = []  # entries of tokens not yet handed over with a piece
        limit = options.num_predict if options.num_predict >= 0 else self._n_ctx
        done_reason = DoneReason.LENGTH
        if not prompt.complete:
            done_reason, limit = DoneReason.ABORT, 0
        while len(generated) < limit:
            if cancel.is_set():
                done_reason = DoneReason.ABORT
                break
            token = sampler.sample(llm._ctx, -1)
            if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                done_reason = DoneReason.STOP
                break
            generated.append(token)
            piece = decoder.feed(token)
            if top_logprobs >= 0:
                logprobs.append(self._logprob_entry(llm, token, top_logprobs))
                if piece:
                    emit(piece, logprobs)
                    logprobs = []
            elif piece:
                emit(piece)
            if len(generated) >= limit or not has_room():
                break
            feed_token(token)
        tail = decoder.flush()
        if logprobs:
            emit(tail, logprobs)
        elif tail:
            emit(tail)
        finished = time.perf_counter_ns()

        stats = GenerationStats(
            done_reason=done_reason,
            prompt_tokens=prompt.length,
            prompt_eval_count=prompt.fed,
            prompt_eval_ns=prompt_done - started,
            eval_count=len(generated),
            eval_ns=finished - prompt_done,
            context=prompt.tokens + generated,
        )
        logger.info(
            "generated %d tokens (%s), prompt %d %s of which %d fed",
            stats.eval_count,
            done_reason,
            stats.prompt_tokens,
            unit,
            prompt.fed,
        )
        return stats

    def _logprob_entry(self, llm: Any, token: int, top: int) -> TokenLogprob:
        """The token's log-probability at the last decoded position."""
        return self._logprob_at_position(llm.ctx, -1, token, top)

    def _logprob_at_position(self, ctx: Any, index: int, token: int, top: int) -> TokenLogprob:
        """The token's log-probability under the model (log-softmax of the raw logits at batch position
        `index` of context `ctx`, before sampling settings), with the `top` likeliest tokens there."""
        import numpy as np  # a dependency of llama-cpp-python; only runners that compute logprobs use it

        n_vocab = int(self._require_open().n_vocab())
        pointer = self._llama_cpp.llama_get_logits_ith(ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
        peak = logits.max()
        log_total = peak + np.log(np.exp(logits - peak).sum())
        alternatives: tuple[TokenLogprob, ...] = ()
        if top > 0:
            best = np.argpartition(-logits, min(top, n_vocab) - 1)[:top]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = tuple(
                TokenLogprob(self._token_bytes(int(i)), float(logits[i] - log_total)) for i in best
            )
        return TokenLogprob(self._token_bytes(token), float(logits[token] - log_total), alternatives)

    def _shift_context(self, llm: Any, num_keep: int) -> bool:
        """Make room in a full context the way Ollama does: keep the first `num_keep` tokens, drop the
        older half of the rest, move the newer half down. False when the model cannot shift."""
        llama_cpp = self._llama_cpp
        if not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(llm.ctx)):
            return False
        filled = llm.n_tokens
        keep = max(0, min(num_keep, filled - 2))
        discard = (filled - keep) // 2
        llm._ctx.kv_cache_seq_rm(0, keep, keep + discard)
        llm._ctx.kv_cache_seq_shift(0, keep + discard, filled, -discard)
        llm.input_ids[keep : filled - discard] = llm.input_ids[keep + discard : filled]
        llm.n_tokens = filled - discard
        logger.info("context full at %d tokens: kept %d, dropped the %d after them", filled, keep, discard)
        return True

    def _reuse_or_restore(self, llm: Any, tokens: list[int]) -> int:
        """Keep or restore the longest cached prefix of `tokens`; the count kept. The live cache is saved
        as a conversation first when the prompt would discard a substantial part of it."""
        cached = llm.input_ids[: llm.n_tokens].tolist()
        here = min(common_prefix_length(cached, tokens), len(tokens) - 1)
        if self._conversations.enabled and len(cached) - here >= SAVE_MIN_TOKENS:
            self._save_conversation(llm, cached)
        entry, shared = self._conversations.best_match(tokens)
        restorable = entry is not None and min(shared, len(tokens) - 1) >= here + RESTORE_MIN_GAIN
        if restorable and entry is not None and self._restore_conversation(llm, entry):
            logger.info("conversation cache restored: %d of %d prompt tokens", shared, len(tokens))
        return self._reuse_prefix(llm, tokens)

    def _save_conversation(self, llm: Any, cached: list[int]) -> None:
        llama_cpp = self._llama_cpp
        llama_cpp.llama_synchronize(llm.ctx)
        size = int(llama_cpp.llama_state_seq_get_size(llm.ctx, _SEQUENCE))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, _SEQUENCE))
        if written <= 0:
            logger.warning("llama.cpp returned no state for the conversation in the cache")
            return
        self._conversations.add_state(cached, bytes(buffer)[:written])

    def _restore_conversation(self, llm: Any, entry: CachedConversation) -> bool:
        llama_cpp = self._llama_cpp
        try:
            data = self._conversations.read(entry)
        except OSError as exc:
            logger.warning("could not read a saved conversation state: %s", exc)
            self._conversations.forget(entry)
            return False
        self._forget_cache(llm)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if int(llama_cpp.llama_state_seq_set_data(llm.ctx, buffer, len(data), _SEQUENCE)) != len(data):
            logger.warning("llama.cpp refused a saved conversation state: dropping it")
            self._forget_cache(llm)
            self._conversations.forget(entry)
            return False
        count = len(entry.tokens)
        llm.input_ids[:count] = entry.tokens
        llm.n_tokens = count
        self._conversations.touch(entry)
        return True

    def _reuse_prefix(self, llm: Any, tokens: list[int]) -> int:
        """Keep the cached prefix shared with `tokens` (at least one token is re-fed for logits)."""
        cached = llm.input_ids[: llm.n_tokens].tolist()
        shared = 0
        for old, new in zip(cached, tokens, strict=False):
            if old != new:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)
        if shared > 0 and llm._ctx.kv_cache_seq_rm(-1, shared, -1):
            llm.n_tokens = shared
            return shared
        self._forget_cache(llm)
        return 0

    def _forget_cache(self, llm: Any) -> None:
        llm.n_tokens = 0
        llm._ctx.kv_cache_clear()

    def _build_sampler(self, options: SamplingOptions, prompt: list[int]) -> Any:
        """A llama.cpp sampler chain for one request (penalties, grammar, then the sampler proper)."""
        llama_cpp = self._llama_cpp
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        try:
            last_n = self._n_ctx if options.repeat_last_n < 0 else options.repeat_last_n
            penalties = (
                options.repeat_penalty != 1.0
                or options.frequency_penalty != 0.0
                or options.presence_penalty != 0.0
            )
            if penalties and last_n > 0:
                sampler.add_penalties(
                    n_vocab=self._require_open().n_vocab(),
                    penalty_last_n=last_n,
                    penalty_repeat=options.repeat_penalty,
                    penalty_freq=options.frequency_penalty,
                    penalty_present=options.presence_penalty,
                )
                # The penalties see the prompt's last tokens too (the grammar must not).
                penalty_sampler = llama_cpp.llama_sampler_chain_get(sampler.sampler, 0)
                for token in prompt[-last_n:]:
                    llama_cpp.llama_sampler_accept(penalty_sampler, token)
            gbnf = options.grammar or (_schema_grammar(options.json_schema) if options.json_schema else None)
            if gbnf:
                llama_cpp.llama_sampler_chain_add(sampler.sampler, self._grammar_sampler(gbnf, options))
            if options.temperature <= 0.0:
                sampler.add_greedy()
                return sampler
            if options.top_k > 0:
                sampler.add_top_k(options.top_k)
            if 0.0 < options.typical_p < 1.0:
                sampler.add_typical(options.typical_p, 1)
            if 0.0 < options.top_p < 1.0:
                sampler.add_top_p(options.top_p, 1)
            if options.min_p > 0.0:
                sampler.add_min_p(options.min_p, 1)
            sampler.add_temp(options.temperature)
            sampler.add_dist(_RANDOM_SEED if options.seed < 0 else options.seed & 0xFFFFFFFF)
            return sampler
        except BaseException:
            sampler.close()
            raise

    def _grammar_sampler(self, gbnf: str, options: SamplingOptions) -> Any:
        llama_cpp = self._llama_cpp
        if not options.think_close:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        else:
            answer = answer_after_thinking(gbnf, options.think_open, options.think_close)
            text, root = answer.gbnf.encode("utf-8"), answer.root.encode("utf-8")
            if answer.trigger_pattern is None:
                grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, text, root)
            else:
                # Triggered by the close tag's own token where it is one (thinking models have it as a
                # single token): the grammar then starts exactly at the tag. The pattern catches a tag
                # spelled out in several tokens.
                patterns = (ctypes.c_char_p * 1)(answer.trigger_pattern.encode("utf-8"))
                tag_tokens = self._require_open().tokenize(
                    options.think_close.encode("utf-8"), add_bos=False, special=True
                )
                trigger = (llama_cpp.llama_token * 1)(*tag_tokens) if len(tag_tokens) == 1 else None
                grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, text, root, patterns, 1, trigger, 1 if trigger is not None else 0
                )
        if not grammar:
            raise RuntimeFailure("the grammar could not be parsed (GBNF with a 'root' rule expected)")
        return grammar

    # -- embeddings --------------------------------------------------------------------------

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        llm = self._require_open()
        if not self._embedding:
            raise RuntimeFailure("this model was loaded for text generation; load it again with embeddings")
        token_lists = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in inputs]
        if not truncate and any(len(tokens) > self._n_ctx for tokens in token_lists):
            raise ContextOverflow("the input length exceeds the context length")
        counts = [min(len(tokens), self._n_ctx) for tokens in token_lists]
        texts = [text for text, count in zip(inputs, counts, strict=True) if count > 0]
        try:
            computed = llm.embed(texts, normalize=False, truncate=True) if texts else []
        except (RuntimeError, ValueError) as exc:
            llm.reset()
            raise RuntimeFailure(f"llama.cpp failed to embed the input: {exc}") from exc
        pooled = iter(self._pool(vector) for vector in computed)
        width = int(llm.n_embd())
        vectors = [next(pooled) if count > 0 else [0.0] * width for count in counts]
        logger.info("embedded %d inputs, %d tokens", len(inputs), sum(counts))
        return EmbedResult(vectors=vectors, prompt_tokens=sum(counts))

    @staticmethod
    def _pool(vector: list[Any]) -> list[float]:
        """Mean-pool per-token vectors (models without a pooling type); pass pooled ones through."""
        if not vector or not isinstance(vector[0], list):
            return [float(value) for value in vector]
        count = len(vector)
        return [sum(column) / count for column in zip(*vector, strict=True)]

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._llm is not None:
            self._conversations.clear()
            self._llm.close()
            self._llm = None
            self._piece_cache.clear()
            logger.info("model released")


def _without_empty_subschemas(schema: Any) -> Any:
    """`items: {}` / `additionalProperties: {}` mean "anything", exactly as if they were absent; the
    binding's converter fails on the first (KeyError 'prefixItems'), so they are dropped."""
    if isinstance(schema, list):
        return [_without_empty_subschemas(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: _without_empty_subschemas(value)
        for key, value in schema.items()
        if not (key in ("items", "additionalProperties") and value == {})
    }


def _schema_grammar(schema: str) -> str:
    """GBNF for a JSON schema (JSON text); the empty schema `{}` means any JSON object (`format: "json"`)."""
    from llama_cpp import llama_grammar

    try:
        if schema.strip() in ("{}", ""):
            return str(llama_grammar.JSON_GBNF)
        normalised = json.dumps(_without_empty_subschemas(json.loads(schema)))
        return str(llama_grammar.json_schema_to_gbnf(normalised))
    except Exception as exc:  # the converter raises bare exceptions on schemas it cannot express
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InvalidInput(f"this JSON schema cannot be enforced on a GGUF model ({reason})") from exc


class LlamaCppRuntime:
    """The `llamacpp` engine: loads GGUF files into `LlamaCppSession`s."""

    def load(self, spec: LoadSpec) -> LlamaCppSession:
        return LlamaCppSession(spec)
