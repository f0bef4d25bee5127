"""Image encoding for outputs."""

from __future__ import annotations

from io import BytesIO

from PIL.Image import Image

from models.klein import CONTENT_TYPES


def encode(image: Image, output_format: str, quality: int) -> tuple[bytes, str]:
    """Encode to png, jpg or webp; returns (bytes, content type). Deterministic for equal pixels."""
    buffer = BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=3)  # lossless; level 3 is ~3x faster than 6 for ~5 % more bytes
    elif output_format == "jpg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue(), CONTENT_TYPES[output_format]
