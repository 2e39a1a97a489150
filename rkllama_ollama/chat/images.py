"""Images in requests: checked at the door (before any model work), and placed in the prompt.

`checked_image` turns one request image (base64, with or without a `data:` URL prefix) into canonical
base64 after reading only its header with Pillow: not base64, not an image, an unsupported format and
an oversized picture are refused with a message naming the image. The full decode happens in the
runner process (runtime/vision.py), so a decoder that crashes costs one request, not the daemon; a
truncated file, or bad base64 past the header, is refused there.

In the prompt, every image is an `<image>` tag, which the vision runtime replaces with the image's
embeddings. A message's images go before its text, in order, unless the text already holds exactly as
many tags (then they stay where the user put them).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from typing import Any

from rkllama_ollama.runtime.base import IMAGE_TAG

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
HEADER_CHARS = 64 * 1024  # base64 characters decoded at the door: 48 KiB of picture, header included
FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
_EXPECTED = "PNG, JPEG, WebP, GIF or BMP"
_DATA_URL = re.compile(r"data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class ImageError(ValueError):
    """A request image that cannot be used; the message names it and says why."""


def checked_image(text: str, where: str) -> str:
    """Canonical base64 of a request image; ImageError (naming `where`) when it is unusable.

    Only the beginning is decoded here (the picture's header lives there): the event loop must not spend
    milliseconds per image. The runner decodes the whole text strictly (runtime/vision.py).
    """
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    if not text.isascii() or _WHITESPACE.search(text, 0, HEADER_CHARS) or len(text) % 4:
        text = "".join(text.split())  # base64 wrapped in lines (or junk, which the decode refuses)
    if not text:
        raise ImageError(f"{where} is empty")
    if len(text) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise ImageError(f"{where} is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit for an image")
    if len(text) % 4:
        raise ImageError(f"{where} is not valid base64")
    kind, width, height = _header(text[:HEADER_CHARS], where)
    if kind is None and len(text) > HEADER_CHARS:
        kind, width, height = _header(text, where)  # a header past the first bytes (long EXIF data)
    if kind is None:
        raise ImageError(f"{where} is not an image ({_EXPECTED} expected)")
    if kind not in FORMATS:
        raise ImageError(f"{where} is a {kind or 'unknown'} image; {_EXPECTED} expected")
    if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{where} is {width}x{height} pixels, "
            f"more than the {MAX_IMAGE_PIXELS // 1_000_000} megapixel limit"
        )
    return text


def _header(text: str, where: str) -> tuple[str | None, int, int]:
    """(format, width, height) read from the picture's first bytes; (None, 0, 0) when they are not an
    image's header."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where} is not valid base64") from None
    # Pillow loads with the first picture, not with the server: most daemons never see one.
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "", image.size[0], image.size[1]
    except Image.DecompressionBombError:
        raise ImageError(
            f"{where} has too many pixels (the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        return None, 0, 0


def checked_message_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their images checked (canonical base64) and their `<image>` tags consistent."""
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        images = message.get("images") or []
        tags = str(message.get("content") or "").count(IMAGE_TAG)
        if tags and tags != len(images):
            raise ImageError(
                f"messages[{index}] has {tags} {IMAGE_TAG} tags for {len(images)} images; "
                f"leave the tags out or give one per image"
            )
        if images:
            message = {
                **message,
                "images": [
                    checked_image(image, f"messages[{index}].images[{i}]") for i, image in enumerate(images)
                ],
            }
        checked.append(message)
    return checked


def with_image_tags(text: str, count: int) -> str:
    """`text` with `count` image tags in front, unless it already holds them."""
    if count == 0 or text.count(IMAGE_TAG) == count:
        return text
    return IMAGE_TAG * count + "\n" + text


def tagged_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their images as `<image>` tags in their content."""
    return [
        {**m, "content": with_image_tags(str(m.get("content") or ""), len(m["images"]))}
        if m.get("images")
        else m
        for m in messages
    ]


def images_in_order(messages: list[dict[str, Any]]) -> list[str]:
    return [image for m in messages for image in m.get("images") or []]
