"""Encoding generated pixels into the image formats a client asked for (Pillow)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}


def encode_image(pixels: np.ndarray, output_format: str) -> tuple[bytes, str]:
    """uint8 [H, W, 3] -> (file bytes, mime type). WebP is lossless so it keeps every pixel."""
    pil_format, mime = FORMATS[output_format]
    options = {"lossless": True} if output_format == "webp" else {}
    if output_format == "jpeg":
        options = {"quality": 95}
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=pil_format, **options)
    return buf.getvalue(), mime
