"""Input images: only real PNG, JPEG or WebP files, within byte and pixel limits (no decompression bombs)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
# The Klein pipeline's limits on a reference (diffusers' Flux2ImageProcessor.check_image_input defaults;
# tests/unit/test_models.py checks them against the installed diffusers).
MIN_SIDE = 64
MAX_ASPECT_RATIO = 8


class BadImage(ValueError):
    """The bytes are not an acceptable image; the message says why, for the client."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def inspect(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check that `data` is a whole PNG/JPEG/WebP image within the limits, decoding it once."""
    if len(data) > max_bytes:
        raise BadImage(f"image is {len(data)} bytes; the limit is {max_bytes}")
    image = _open(data, max_pixels)
    try:
        image.load()  # decode fully: truncated or corrupt files fail here, not in the worker
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BadImage("image is truncated or corrupt: it could not be decoded") from None
    if min(image.size) < MIN_SIDE:
        raise BadImage(f"image is {image.width}×{image.height}; each side must be at least {MIN_SIDE} px")
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise BadImage(
            f"image is {image.width}×{image.height}; its longer side may be at most {MAX_ASPECT_RATIO}× the shorter"
        )
    return ImageInfo(str(image.format), image.width, image.height)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from bytes that `inspect` accepted."""
    image = _open(data, max_pixels)
    return image.convert("RGB")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImage(f"image has more pixels than the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise BadImage("not a PNG, JPEG or WebP image") from None
    if image.width * image.height > max_pixels:  # checked from the header, before any pixel is decoded
        raise BadImage(f"image is {image.width}×{image.height} pixels; the limit is {max_pixels} pixels")
    return image
