"""Images and masks that users upload, decoded defensively in the API process.

Every rule is checked before anything is queued, and a violation is a 4xx naming the field:
- at most `max_bytes` encoded (413), only PNG, JPEG and WebP, recognised by their content
  (their magic bytes and Pillow's decoder agree), never by a name or a declared type;
- at most `max_pixels` (checked from the header, before decoding); Pillow's decompression-bomb
  guard is on and its warning is an error;
- animated files are refused (which frame would be meant?); truncated or corrupt files are
  refused (Pillow's LOAD_TRUNCATED_IMAGES stays off);
- EXIF orientation is applied; modes are normalised to 8-bit RGB (images) or L (masks):
  transparency is composited on white (BACKGROUND), palettes expanded, CMYK converted, 16-bit
  scaled to 8 bits, grayscale replicated.
Workers receive the normalised pixels as PNG, so they never decode what a user sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from service.validation import ApiError

FORMATS = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF"}
BACKGROUND = (255, 255, 255)  # where uploads are transparent


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def from_base64(value: str, field: str) -> bytes:
    """Plain base64 or a data: URL."""
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", f"{field}: not valid base64", field) from None


def _refuse(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_image", f"{field}: {message}", field)


def _format_of(data: bytes) -> str | None:
    for name, magic in FORMATS.items():
        if data.startswith(magic) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    return None


def decode(data: bytes, field: str, limits: UploadLimits, mask: bool = False) -> np.ndarray:
    """An upload -> uint8 [H, W, 3] (image) or [H, W] (mask)."""
    if len(data) > limits.max_bytes:
        raise _refuse(field, f"{len(data)} bytes is over the limit of {limits.max_bytes}", 413)
    declared = _format_of(data)
    if declared is None:
        raise _refuse(field, "not a PNG, JPEG or WebP file", 415)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[declared])
            w, h = img.size
            if w * h > limits.max_pixels:
                raise _refuse(field, f"{w}x{h} is over the limit of {limits.max_pixels} pixels", 413)
            if getattr(img, "n_frames", 1) > 1:
                raise _refuse(field, "animated images are not accepted")
            img.load()
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _refuse(field, "decompression bomb: too many pixels", 413) from None
        except Exception as exc:  # truncated, corrupt, a polyglot Pillow can't read as its magic says
            raise _refuse(field, f"cannot decode as {declared}: {type(exc).__name__}") from None
    img = ImageOps.exif_transpose(img)
    return _normalise(img, mask)


def _normalise(img: Image.Image, mask: bool) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grayscale
        a = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or a.max() > 255 else 255
        gray = np.clip(a * 255 // top, 0, 255).astype(np.uint8)
        return gray if mask else np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        img = flat
    img = img.convert("L" if mask else "RGB")  # CMYK, YCbCr, L, 1, F ...
    return np.asarray(img, dtype=np.uint8).copy()


def to_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """What the worker reads: the API's own normalised PNG."""
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]), dtype=np.uint8).copy()
