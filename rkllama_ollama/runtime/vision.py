"""Images for a vision encoder, in the runner: decode (Pillow), then prepare per model family the way
the vendor's multimodal demo does (pad or not, resize to the encoder's input, normalise when the encoder
takes floats), with numpy. No torch.

Families (docs/vision.md): Qwen2-VL / Qwen2.5-VL and Qwen3-VL pad the picture to a square filled with
the mean colour, then resize; InternVL and MiniCPM-V resize directly. Encoders converted with their mean
and std inside (uint8 input, the vendor's way) get raw RGB bytes; float encoders get normalised values.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from rkllama_ollama.runtime.base import InvalidInput

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageRecipe:
    """How one model family prepares a picture for its encoder, and how its prompt marks an image."""

    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool
    image_start: str
    image_end: str
    image_content: str

    @property
    def background(self) -> tuple[int, int, int]:
        r, g, b = (int(round(m * 255)) for m in self.mean)
        return (r, g, b)


_QWEN_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
RECIPES: dict[str, ImageRecipe] = {
    "qwen2-vl": ImageRecipe("qwen2-vl", CLIP_MEAN, CLIP_STD, True, *_QWEN_MARKERS),
    "qwen3-vl": ImageRecipe("qwen3-vl", HALF, HALF, True, *_QWEN_MARKERS),
    "internvl": ImageRecipe(
        "internvl", IMAGENET_MEAN, IMAGENET_STD, False, "<img>", "</img>", "<IMG_CONTEXT>"
    ),
    "minicpm-v": ImageRecipe("minicpm-v", HALF, HALF, False, "<image>", "</image>", "<unk>"),
}
DEFAULT_FAMILY = "qwen2-vl"


def family_from_names(*names: str) -> str:
    """The recipe family a model's file names suggest (Qwen2-VL when nothing matches)."""
    text = " ".join(names).lower().replace("_", "-")
    if "qwen3-vl" in text or "qwen3vl" in text:
        return "qwen3-vl"
    if "internvl" in text:
        return "internvl"
    if "minicpm" in text:
        return "minicpm-v"
    return DEFAULT_FAMILY


def decode_rgb(data: bytes, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """The picture fully decoded as RGB (transparency flattened onto white). InvalidInput names the image
    (1-based) when it cannot be decoded: a truncated or corrupt file. With `draft`, a JPEG is decoded at
    the smallest 1/2, 1/4 or 1/8 scale that still covers that size (libjpeg does it while decoding)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)
            image.load()
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise InvalidInput(f"image {index + 1} cannot be decoded (truncated or corrupt): {exc}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def draft_size(recipe: ImageRecipe, size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The smallest decode size of a `size` picture that loses nothing `prepare` would keep."""
    if recipe.pad_to_square:
        scale = max(width, height) / max(size)
        return (max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale)))
    return (width, height)


def picture_for_encoder(data: bytes, index: int, recipe: ImageRecipe, width: int, height: int) -> Image.Image:
    """`data` decoded for an encoder of `width` x `height` (a big JPEG at a reduced scale)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            size = probe.size
    except Exception:  # noqa: BLE001 - decode_rgb below names the problem
        return decode_rgb(data, index)
    return decode_rgb(data, index, draft_size(recipe, size, width, height))


def prepare(
    image: Image.Image,
    recipe: ImageRecipe,
    width: int,
    height: int,
    *,
    dtype: type = np.uint8,
    channels_last: bool = True,
) -> np.ndarray:
    """The encoder's input array for one RGB picture: (H, W, 3) or (3, H, W), C-contiguous."""
    if recipe.pad_to_square and image.width != image.height:
        side = max(image.width, image.height)
        square = Image.new("RGB", (side, side), recipe.background)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    if dtype != np.uint8:
        mean = np.asarray(recipe.mean, dtype=np.float32) * 255.0
        scale = 1.0 / (np.asarray(recipe.std, dtype=np.float32) * 255.0)
        pixels = ((pixels.astype(np.float32) - mean) * scale).astype(dtype)
    if not channels_last:
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)
