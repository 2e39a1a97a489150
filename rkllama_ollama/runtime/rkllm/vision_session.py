"""An RKLLM session with a resident vision encoder: the .rkllm model plus its .rknn image encoder.

The encoder is initialised once, before the LLM (as the vendor's multimodal demo does), and lives as
long as the session: every request's images go through the same rknn context. The LLM gets its own NPU
memory domain (RKLLMParam.extend_param.base_domain_id = 1 unless the load says otherwise), the encoder
stays in domain 0.

A request with images renders to a prompt with one `<image>` tag per image (chat/images.py); each image
is decoded and prepared for the model family (runtime/vision.py), encoded (embeddings of the last few
distinct images are kept, so a conversation that re-sends its pictures does not re-encode them), and
the prompt and embeddings go to rkllm_run as RKLLM_INPUT_MULTIMODAL. Such a run starts from an empty KV
cache and leaves one that token-based prefix reuse cannot describe, so the next text turn clears it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np

from rkllama_ollama.runtime.base import (
    IMAGE_TAG,
    PICTURE_CELL,
    Cancel,
    ContextOverflow,
    EmitPiece,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary
from rkllama_ollama.runtime.rkllm.multimodal import (
    ImageMarkers,
    markers_in_param,
    max_images_per_run,
    multimodal_input,
    set_param_markers,
)
from rkllama_ollama.runtime.rkllm.session import RkllmSession, _Run
from rkllama_ollama.runtime.rknn.encoder import RknnEncoder
from rkllama_ollama.runtime.vision import (
    RECIPES,
    ImageRecipe,
    family_from_names,
    picture_for_encoder,
    prepare,
)

log = logging.getLogger(__name__)

EMBEDDING_CACHE_IMAGES = 8
DEFAULT_LLM_DOMAIN = 1


def recipe_for(spec: LoadSpec) -> ImageRecipe:
    """The family recipe (named in the load, or guessed from the file names), with marker overrides."""
    vision = spec.vision
    family = str(vision.get("family") or family_from_names(spec.model_path, str(vision.get("encoder", ""))))
    if family not in RECIPES:
        raise RuntimeFailure(f"unknown vision model family {family!r}; known: {', '.join(sorted(RECIPES))}")
    base = RECIPES[family]
    return replace(
        base,
        image_start=str(vision.get("img_start") or base.image_start),
        image_end=str(vision.get("img_end") or base.image_end),
        image_content=str(vision.get("img_content") or base.image_content),
    )


class VisionRkllmSession(RkllmSession):
    def __init__(self, library: RkllmLibrary, spec: LoadSpec) -> None:
        self._recipe = recipe_for(spec)
        self._markers = ImageMarkers(
            self._recipe.image_start.encode(),
            self._recipe.image_end.encode(),
            self._recipe.image_content.encode(),
        )
        self._llm_domain = int(spec.vision.get("llm_domain", DEFAULT_LLM_DOMAIN))
        self._embedded: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoder = RknnEncoder(
            str(spec.vision["encoder"]), core_mask=int(spec.vision.get("core_mask", 0))
        )
        try:
            super().__init__(library, spec)
        except BaseException:
            self.encoder.close()
            raise
        log.info(
            "vision model ready: family=%s markers=%s|%s|%s llm domain=%d",
            self._recipe.family,
            self._recipe.image_start,
            self._recipe.image_content,
            self._recipe.image_end,
            self._llm_domain,
        )

    def _build_param(self, sampling: SamplingOptions) -> Any:
        param = super()._build_param(sampling)
        param.extend_param.base_domain_id = self._llm_domain
        if markers_in_param(self._family):
            set_param_markers(param, self._markers)
        return param

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.encoder.close()

    def tokenize(self, text: str) -> list[int]:
        """The prompt as the context will hold it: the text without its `<image>` tags, then for each
        tag the encoder's output tokens (PICTURE_CELL ids), the count `generate_multimodal` checks
        against the context."""
        tags = text.count(IMAGE_TAG)
        if not tags:
            return super().tokenize(text)
        tokens = self._tokenizer.encode(text.replace(IMAGE_TAG, ""))
        return tokens + [PICTURE_CELL] * (tags * self.encoder.shape.n_tokens)

    # ------------------------------------------------------------------ images

    def image_embeddings(self, data: bytes, index: int) -> np.ndarray:
        """The encoder's output for one image (bytes of a picture file); cached by content."""
        key = hashlib.sha256(data).hexdigest()
        cached = self._embedded.get(key)
        if cached is not None:
            self._embedded.move_to_end(key)
            log.info("image %d: embeddings reused (same picture as before)", index + 1)
            return cached
        shape = self.encoder.shape
        started = time.perf_counter()
        picture = picture_for_encoder(data, index, self._recipe, shape.width, shape.height)
        pixels = prepare(
            picture,
            self._recipe,
            shape.width,
            shape.height,
            dtype=shape.dtype,
            channels_last=shape.channels_last,
        )
        prepared = time.perf_counter()
        embeddings = self.encoder.encode(pixels)
        ended = time.perf_counter()
        log.info(
            "image %d encoded: %dx%d -> %d tokens, decode+prepare %.1f ms, encoder %.1f ms",
            index + 1,
            picture.width,
            picture.height,
            shape.n_tokens,
            (prepared - started) * 1e3,
            (ended - prepared) * 1e3,
        )
        self._embedded[key] = embeddings
        while len(self._embedded) > EMBEDDING_CACHE_IMAGES:
            self._embedded.popitem(last=False)
        return embeddings

    def generate_multimodal(
        self,
        prompt: str,
        images: list[bytes],
        options: SamplingOptions,
        emit: EmitPiece,
        cancel: Cancel | None = None,
    ) -> GenerationStats:
        tags = prompt.count(IMAGE_TAG)
        if tags != len(images):
            raise InvalidInput(f"the prompt has {tags} {IMAGE_TAG} tags for {len(images)} images")
        limit = max_images_per_run(self._family)
        if limit is not None and len(images) > limit:
            raise InvalidInput(
                f"the RKLLM runtime {self._version} takes {limit} image per request; "
                f"this one has {len(images)}"
            )
        shape = self.encoder.shape
        text_tokens = self._tokenizer.encode(prompt.replace(IMAGE_TAG, ""))
        image_tokens = len(images) * shape.n_tokens
        context = self._context_limit
        if len(text_tokens) + image_tokens >= context:
            raise ContextOverflow(
                f"too many images for the context: {len(images)} images take {image_tokens} tokens "
                f"({shape.n_tokens} each) and the text {len(text_tokens)}, more than the context window of "
                f"{context} tokens (num_ctx); send fewer images or raise num_ctx"
            )
        if cancel is not None and cancel.is_set():
            return self._cancelled_before_start(text_tokens)
        self._ensure_sampling(options)
        blocks = [self.image_embeddings(data, index) for index, data in enumerate(images)]
        embeddings = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
        if self._cached or self._kv_dirty:
            self._clear_cache()
        num_predict = self._request_limit(options)
        run = _Run(emit=emit, num_predict=num_predict, abort_on_limit=self._family != Family.F)
        keepalive: list[Any] = []
        rkllm_input = multimodal_input(
            self._layout,
            prompt.encode("utf-8"),
            embeddings,
            n_images=len(images),
            width=shape.width,
            height=shape.height,
            markers=self._markers,
            keepalive=keepalive,
        )
        infer = self._make_infer(abi.INFER_GENERATE, False, options, num_predict)
        started = time.perf_counter()
        try:
            rc = self._execute(run, rkllm_input, infer, cancel)
        finally:
            # What a multimodal run leaves in the KV cache is not a token sequence we can match.
            self._cached = []
            self._kv_dirty = self._family >= Family.D
        ended = time.perf_counter()
        tail = run.decoder.decode(b"", final=True)
        if tail and not run.aborted and run.emit_error is None:
            emit(tail)
        if run.emit_error is not None:
            raise run.emit_error
        if run.failed or (rc != 0 and not run.aborted and not run.limit_reached):
            raise RuntimeFailure(self._run_error_message(rc, len(text_tokens) + image_tokens, context))
        fed = len(text_tokens) + image_tokens  # a multimodal run feeds the whole prompt
        stats = self._stats(text_tokens, fed, run, started, ended, context)
        return replace(stats, prompt_tokens=fed, context=[])
