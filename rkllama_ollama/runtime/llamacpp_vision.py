"""GGUF vision models on the CPU: a llama.cpp model plus its multimodal projector (`mmproj*.gguf`),
through llama-cpp-python's bindings of llama.cpp's multimodal library (libmtmd).

The projector is loaded once, with the model, and stays resident as long as the session: every
request's pictures go through the same mtmd context. A prompt given to `generate_multimodal` holds one
`<image>` tag per picture (chat/images.py puts them where the chat template placed the message); it is
cut at the tags into text and picture parts and handed to `mtmd_tokenize_from_parts`, which adds the
model's own image markers (none for LLaVA, `<start_of_image>` for Gemma 3, ...) around each picture's
tokens. Because the parts are given apart, a prompt that happens to contain the library's own media
marker is only text. Pictures are decoded by Pillow (runtime/vision.py: truncated, corrupt or
oversized files are a 400 naming the picture), never by the library's image decoder.

KV prefix reuse works across pictures. The session remembers what its KV cache holds as a list of
keys, one per cell: a text token's id, or for a picture's cells negative ids derived from a hash of the
picture's bytes. A new prompt keeps the longest shared run of keys (cut back to a picture's start, so
a picture is never half kept) and feeds only the rest, so a continuing chat with the same pictures does
not encode them again and a different picture does not reuse the old one's cells. Positions are kept
apart from cells (`_cut_pos`), which M-RoPE models (Qwen2-VL) need: their pictures use fewer positions
than cells. Text-only requests go through the same path, so they reuse a prefix that holds pictures.

Differences from the text session: no context shift when a reply fills the context (it ends with
"length", as llama.cpp's own server does with pictures), no conversation caches, one request at a time.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rkllama_ollama.runtime.base import (
    IMAGE_TAG,
    PICTURE_CELL,
    Cancel,
    EmitPiece,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.llamacpp import LlamaCppSession, _FedPrompt

logger = logging.getLogger(__name__)

_CHUNK_TEXT = 0
_CHUNK_IMAGE = 1
_GGUF_TYPE_UINT32 = 4
_GGUF_TYPE_INT32 = 5
# The probe picture's side when the projector does not name its encoder's input size.
FALLBACK_IMAGE_SIZE = 448


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def projector_image_size(path: str) -> int | None:
    """The projector's `clip.vision.image_size` (the side of its encoder's input), read with ggml's own
    GGUF reader (metadata only); None when the library or the file does not say."""
    try:
        from llama_cpp import _ggml

        lib = _ggml.libggml
        lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
        lib.gguf_init_from_file.restype = ctypes.c_void_p
        lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.gguf_find_key.restype = ctypes.c_int64
        lib.gguf_get_kv_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_kv_type.restype = ctypes.c_int
        lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_val_u32.restype = ctypes.c_uint32
        lib.gguf_get_val_i32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_val_i32.restype = ctypes.c_int32
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_free.restype = None
    except (ImportError, AttributeError, OSError):
        return None
    context = lib.gguf_init_from_file(path.encode("utf-8"), _GgufInitParams(True, None))
    if not context:
        return None
    try:
        key = lib.gguf_find_key(context, b"clip.vision.image_size")
        if key < 0:
            return None
        kind = lib.gguf_get_kv_type(context, key)
        if kind == _GGUF_TYPE_UINT32:
            size = int(lib.gguf_get_val_u32(context, key))
        elif kind == _GGUF_TYPE_INT32:
            size = int(lib.gguf_get_val_i32(context, key))
        else:
            return None
        return size if size > 0 else None
    finally:
        lib.gguf_free(context)


def blank_png(side: int) -> bytes:
    """A grey square picture of `side` pixels, as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def _import_mtmd() -> Any:
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError) as exc:  # OSError: the wheel was built without libmtmd
        raise RuntimeFailure(
            "this llama-cpp-python has no multimodal library (libmtmd): rebuild it with `make install` "
            f"(CMAKE_ARGS without -DLLAVA_BUILD=OFF) to serve GGUF vision models ({exc})"
        ) from exc
    return mtmd_cpp


def picture_keys(digest: str, serial: int, count: int) -> list[int]:
    """The cache keys of the `count` cells of a picture's chunk: negative (never a token id), a function
    of the picture's sha256 `digest` and of `serial`, the chunk's rank among the chunks of pictures with
    that digest in the prompt (a picture cut into slices gives several chunks)."""
    mixed = hashlib.sha256(f"{digest}:{serial}".encode()).digest()
    base = int.from_bytes(mixed[:6], "big") << 20
    return [-1 - (base + index) for index in range(count)]


@dataclass
class _Part:
    """One piece of a tokenized prompt: text tokens, or a picture's cells."""

    keys: list[int]
    n_pos: int
    chunk: Any = None  # the mtmd chunk of a picture (owned by the chunk list)

    @property
    def image(self) -> bool:
        return self.chunk is not None


class LlamaCppVisionSession(LlamaCppSession):
    """A GGUF model with its resident multimodal projector. See the module docstring."""

    def __init__(self, spec: LoadSpec) -> None:
        projector = str(spec.vision.get("encoder") or "")
        if not Path(projector).is_file():
            raise RuntimeFailure(f"projector file not found: {projector}")
        mtmd = _import_mtmd()
        # Conversation caches save token-described states; a cache holding pictures is not one.
        super().__init__(replace(spec, kv_cache_slots=0, parallel=1))
        self._mtmd = mtmd
        from llama_cpp import _logger as llama_logger

        # The library's own log lines go where llama.cpp's go (errors only, on the runner's stderr).
        mtmd.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        llm = self._require_open()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = int(llm.n_threads)
        params.warmup = False
        started = time.perf_counter()
        context = mtmd.mtmd_init_from_file(projector.encode("utf-8"), llm.model, params)
        if not context:
            super().close()
            raise RuntimeFailure(
                f"could not load the projector {projector}: not a multimodal projector for this model "
                "(its output width must match the model's embedding width)"
            )
        self._ctx_mtmd: Any = context
        if not mtmd.mtmd_support_vision(context):
            self.close()
            raise RuntimeFailure(f"the projector {projector} has no vision encoder")
        self._non_causal_images = False
        self._keys: list[int] = []  # what the KV cache holds, one key per cell
        self._cut_pos: list[int | None] = []  # the position of each cell; None: inside a picture
        self._n_past = 0  # the next position
        projector_bytes = Path(projector).stat().st_size
        self.info = replace(self.info, memory_bytes=self.info.memory_bytes + projector_bytes)
        try:
            side = projector_image_size(projector) or FALLBACK_IMAGE_SIZE
            self._picture_cells = self._cells_of_a_picture(side)
        except BaseException:
            self.close()
            raise
        logger.info(
            "projector loaded: %s (%d MiB) in %.3f s, resident with the model%s; "
            "a %dx%d picture takes %d tokens",
            projector,
            projector_bytes >> 20,
            time.perf_counter() - started,
            " (M-RoPE)" if mtmd.mtmd_decode_use_mrope(context) else "",
            side,
            side,
            self._picture_cells,
        )

    def _cells_of_a_picture(self, side: int) -> int:
        """The KV cells one picture of `side`×`side` pixels takes in a prompt, the model's image markers
        included: the probe picture is prepared for the encoder (not encoded) and its chunks counted."""
        mtmd = self._mtmd
        chunks = self._tokenize(["", ""], [blank_png(side)])
        try:
            cells = sum(
                int(mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, index)))
                for index in range(mtmd.mtmd_input_chunks_size(chunks))
            )
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return max(1, cells - len(super().tokenize("")))  # less the BOS the library may have added

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens as the context will hold them: each `<image>` tag counts as the cells of
        one picture at the encoder's input size (PICTURE_CELL ids in its place; see `_picture_cells`).
        Projectors that cut a picture by its size (tiles, dynamic resolution) may take more for a
        bigger one; the session still refuses a prompt that does not fit."""
        if IMAGE_TAG not in text:
            return super().tokenize(text)
        llm = self._require_open()
        texts = text.split(IMAGE_TAG)
        tokens = super().tokenize(texts[0])
        for piece in texts[1:]:
            tokens.extend([PICTURE_CELL] * self._picture_cells)
            if piece:
                tokens.extend(llm.tokenize(piece.encode("utf-8"), add_bos=False, special=True))
        return tokens

    # -- generation --------------------------------------------------------------------------

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        return self.generate_multimodal(prompt, [], options, emit, cancel)

    def generate_multimodal(
        self,
        prompt: str,
        pictures: list[bytes],
        options: SamplingOptions,
        emit: EmitPiece,
        cancel: Cancel | None = None,
    ) -> GenerationStats:
        """Generate from a prompt with one `<image>` tag per picture (file bytes), in order."""
        llm = self._require_open()
        chunks = None
        if pictures:  # without pictures, an `<image>` in the prompt is only text
            texts = prompt.split(IMAGE_TAG)
            if len(texts) - 1 != len(pictures):
                raise InvalidInput(
                    f"the prompt has {len(texts) - 1} {IMAGE_TAG} tags but the request has "
                    f"{len(pictures)} images"
                )
            if not texts[-1].strip():
                # Nothing after the last picture: its cells give no logits to sample from, and
                # llama.cpp's sampler aborts the runner (GGML_ASSERT(logits != nullptr)).
                raise InvalidInput("the prompt ends with an image: a prompt needs text after its last image")
            chunks = self._tokenize(texts, pictures)
        try:
            parts = self._parts(chunks) if chunks is not None else self._text_parts(prompt)
            keys = [key for part in parts for key in part.keys]
            self._check_prompt_length(len(keys), " (images included)")
            tokens = [key for key in keys if key >= 0]
            sampler = self._build_sampler(options, tokens)
            try:
                stop = cancel or Cancel()
                return self._generate_from(
                    llm,
                    sampler,
                    options,
                    emit,
                    stop,
                    feed_prompt=lambda: self._feed_parts(llm, parts, keys, stop),
                    feed_token=lambda token: self._feed_text(llm, [token]),
                    has_room=lambda: len(self._keys) < self._n_ctx,
                    unit="cells",
                )
            except RuntimeError as exc:
                self._forget(llm)
                raise RuntimeFailure(f"llama.cpp failed during generation: {exc}") from exc
            finally:
                sampler.close()
        finally:
            if chunks is not None:
                self._mtmd.mtmd_input_chunks_free(chunks)

    def _text_parts(self, prompt: str) -> list[_Part]:
        tokens = super().tokenize(prompt)  # no pictures: an `<image>` here is only text
        return [_Part(tokens, len(tokens))]

    def _tokenize(self, texts: list[str], pictures: list[bytes]) -> Any:
        """The mtmd chunks of the prompt: text parts and pictures alternating (pictures decoded here)."""
        from rkllama_ollama.runtime.vision import decode_rgb  # Pillow loads with the first picture

        mtmd = self._mtmd
        bitmaps = []
        keep: list[Any] = []  # ctypes objects that must outlive the tokenize call
        parts: list[Any] = []
        try:
            for index, data in enumerate(pictures):
                picture = decode_rgb(data, index)
                pixels = picture.tobytes()
                buffer = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
                bitmap = mtmd.mtmd_bitmap_init(picture.width, picture.height, buffer)
                if not bitmap:
                    raise RuntimeFailure(f"image {index + 1}: the multimodal library refused the picture")
                bitmaps.append(bitmap)
                # The id travels with every chunk made from the picture: the cache keys come from it.
                mtmd.mtmd_bitmap_set_id(bitmap, hashlib.sha256(data).hexdigest().encode("ascii"))
            for index, text in enumerate(texts):
                if text:
                    raw = text.encode("utf-8")
                    entry = mtmd.mtmd_input_text(raw, len(raw), True, True)
                    keep.append(entry)
                    parts.append(mtmd.mtmd_input_part(ctypes.pointer(entry), None))
                if index < len(bitmaps):
                    parts.append(mtmd.mtmd_input_part(None, bitmaps[index]))
            array = (ctypes.POINTER(mtmd.mtmd_input_part) * len(parts))(*(ctypes.pointer(p) for p in parts))
            chunks = mtmd.mtmd_input_chunks_init()
            status = mtmd.mtmd_tokenize_from_parts(self._ctx_mtmd, chunks, array, len(parts), self._add_bos)
            if status != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise InvalidInput(f"the images could not be prepared for this model (mtmd status {status})")
            return chunks
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _parts(self, chunks: Any) -> list[_Part]:
        """Keys and positions of each chunk; a picture's keys come from its bytes (the bitmap's id)."""
        mtmd = self._mtmd
        parts: list[_Part] = []
        serials: dict[str, int] = {}
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == _CHUNK_TEXT:
                count = ctypes.c_size_t(0)
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens = [int(pointer[i]) for i in range(count.value)]
                parts.append(_Part(tokens, len(tokens)))
                continue
            if kind != _CHUNK_IMAGE:
                raise InvalidInput("the prompt holds media this model cannot take")
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            if self._non_causal_images or mtmd.mtmd_decode_use_non_causal(self._ctx_mtmd, chunk):
                self._non_causal_images = True
                n_batch = self._require_open().n_batch
                if n_tokens > n_batch:
                    raise InvalidInput(
                        f"a picture needs {n_tokens} tokens in one batch; this model's batch holds {n_batch}"
                    )
            digest = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode("ascii", errors="replace")
            serial = serials.get(digest, 0)
            serials[digest] = serial + 1
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            parts.append(_Part(picture_keys(digest, serial, n_tokens), n_pos, chunk))
        return parts

    def _reuse(self, keys: list[int]) -> int:
        """Keep the longest cached prefix of `keys` that ends at a cell boundary outside a picture (the
        last key is always fed again, for its logits); the cells kept. The rest of the cache goes."""
        llm = self._require_open()
        shared = 0
        for old, new in zip(self._keys, keys, strict=False):
            if old != new:
                break
            shared += 1
        shared = min(shared, len(keys) - 1)
        while 0 < shared < len(self._cut_pos) and self._cut_pos[shared] is None:
            shared -= 1
        if shared == 0:
            self._forget(llm)
            return 0
        position = self._cut_pos[shared] if shared < len(self._cut_pos) else self._n_past
        assert position is not None
        if not llm._ctx.kv_cache_seq_rm(-1, position, -1):
            self._forget(llm)
            return 0
        del self._keys[shared:], self._cut_pos[shared:]
        self._n_past = position
        return shared

    def _forget(self, llm: Any) -> None:
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        self._keys.clear()
        self._cut_pos.clear()
        self._n_past = 0

    def _feed_text(self, llm: Any, tokens: list[int]) -> None:
        for start in range(0, len(tokens), llm.n_batch):
            batch = tokens[start : start + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=self._n_past, logits_all=False)
            llm._ctx.decode(llm._batch)
            self._keys.extend(batch)
            self._cut_pos.extend(range(self._n_past, self._n_past + len(batch)))
            self._n_past += len(batch)

    def _feed_picture(self, llm: Any, part: _Part) -> None:
        mtmd = self._mtmd
        new_n_past = self._mtmd_pos(self._n_past)
        started = time.perf_counter()
        status = mtmd.mtmd_helper_eval_chunk_single(
            self._ctx_mtmd, llm.ctx, part.chunk, self._n_past, 0, llm.n_batch, False, ctypes.byref(new_n_past)
        )
        if status != 0:
            raise RuntimeError(f"the picture could not be encoded and decoded (status {status})")
        logger.info(
            "picture encoded: %d tokens, %d positions in %.1f ms",
            len(part.keys),
            part.n_pos,
            (time.perf_counter() - started) * 1e3,
        )
        self._keys.extend(part.keys)
        self._cut_pos.append(self._n_past)
        self._cut_pos.extend([None] * (len(part.keys) - 1))
        self._n_past = int(new_n_past.value)

    def _mtmd_pos(self, value: int) -> Any:
        from llama_cpp import llama_pos

        return llama_pos(value)

    def _feed_parts(self, llm: Any, parts: list[_Part], keys: list[int], cancel: Cancel) -> _FedPrompt:
        """Decode the parts past the cached prefix of `keys`, part by part until cancelled."""
        reused = self._reuse(keys)
        offset = 0
        for part in parts:
            end = offset + len(part.keys)
            if end > reused and not cancel.is_set():
                if part.image:
                    self._feed_picture(llm, part)
                else:
                    self._feed_text(llm, part.keys[max(0, reused - offset) :])
            offset = end
        fed = len(self._keys) - reused
        return _FedPrompt(len(keys), fed, len(self._keys) >= len(keys), [key for key in keys if key >= 0])

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        context, self._ctx_mtmd = getattr(self, "_ctx_mtmd", None), None
        if context:
            self._mtmd.mtmd_free(context)
        super().close()


class LlamaCppVisionRuntime:
    """The `llamacpp` engine for a GGUF model with a projector."""

    def load(self, spec: LoadSpec) -> LlamaCppVisionSession:
        return LlamaCppVisionSession(spec)
