"""RKLLM_INPUT_MULTIMODAL per ABI family (docs/rknn-runtime-abi.md, "RKLLM multimodal input").

- C (1.1.x) and D (1.2.0): {prompt, image_embed, n_image_tokens}; the image marker strings live in
  RKLLMParam.img_start/img_end/img_content, set once at init. One image per run.
- D' (1.2.1b1) and E (1.2.1-1.2.3): + n_image (the number of `<image>` tags), image_width/height.
- F (1.3.0): an `image` sub-struct with the same counts plus the marker strings, per run.

`image_embed` holds n_image x n_image_tokens x embedding-width float32 values, image after image in the
order of the prompt's `<image>` tags.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family, Layout


@dataclass(frozen=True)
class ImageMarkers:
    start: bytes
    end: bytes
    content: bytes


def max_images_per_run(family: Family) -> int | None:
    """C and D have no image count in their input: one image per run. None = no fixed limit."""
    return 1 if family < Family.D_PRIME else None


def markers_in_param(family: Family) -> bool:
    """Whether the marker strings are init-time (RKLLMParam.img_*) rather than per-run."""
    return family < Family.F


def set_param_markers(param: Any, markers: ImageMarkers) -> None:
    """RKLLMParam.img_start/img_end/img_content (families C-E). The caller keeps `markers` alive."""
    param.img_start = markers.start
    param.img_end = markers.end
    param.img_content = markers.content


def multimodal_input(
    layout: Layout,
    prompt: bytes,
    embeddings: np.ndarray,
    *,
    n_images: int,
    width: int,
    height: int,
    markers: ImageMarkers,
    keepalive: list[Any],
) -> Any:
    """An RKLLMInput of type MULTIMODAL for `prompt` (with one `<image>` tag per image) and the images'
    embeddings (float32, C-contiguous, n_images x tokens rows). `keepalive` holds what the struct
    points to until rkllm_run returns."""
    if embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous or embeddings.ndim != 2:
        raise ValueError("image embeddings must be a C-contiguous float32 (tokens, width) array")
    if n_images <= 0 or embeddings.shape[0] % n_images:
        raise ValueError(f"{embeddings.shape[0]} embedding rows cannot be split into {n_images} images")
    n_tokens = embeddings.shape[0] // n_images
    keepalive += [prompt, embeddings, markers]
    pointer = embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    rkllm_input = layout.Input()
    if layout.has_role:
        rkllm_input.role = b"user"
        rkllm_input.enable_thinking = False
    rkllm_input.input_type = abi.INPUT_MULTIMODAL
    mm = rkllm_input.multimodal_input
    mm.prompt = prompt
    if layout.family == Family.F:
        image = mm.image
        image.image_embed = pointer
        image.n_image_tokens = n_tokens
        image.n_image = n_images
        image.image_start = markers.start
        image.image_end = markers.end
        image.image_content = markers.content
        image.image_width = width
        image.image_height = height
    else:
        mm.image_embed = pointer
        mm.n_image_tokens = n_tokens
        if layout.family >= Family.D_PRIME:
            mm.n_image = n_images
            mm.image_width = width
            mm.image_height = height
    return rkllm_input
