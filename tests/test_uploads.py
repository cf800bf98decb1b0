"""Uploaded images through the API: a hostile corpus the tests make themselves, each refused
with its 4xx naming the field before anything is queued; the modes that are normalised
(CMYK, 16-bit, palette, RGBA, EXIF orientation); JSON base64 and multipart uploads."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.uploads import UploadLimits, decode
from service.validation import ApiError

MODEL = "slow-ldm"  # no worker serves it in these tests: nothing may reach its stream


def png(pixels: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", **save)
    return out.getvalue()


def scene(w: int = 64, h: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions with almost no data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def animated() -> bytes:
    frames = [Image.fromarray(scene()), Image.fromarray(scene()[::-1].copy())]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.fromarray(scene()).save(out, format="GIF")
    return out.getvalue()


HOSTILE = [  # (name, bytes of the image, status, words the message must hold)
    ("truncated", png(scene())[:300], 422, "cannot decode"),
    ("bomb header", png_header_only(100_000, 100_000), 413, "pixels"),
    ("huge dimensions", png(np.zeros((4200, 4200, 3), np.uint8)), 413, "pixels"),
    ("wrong magic (GIF)", gif(), 415, "PNG, JPEG or WebP"),
    ("wrong magic (text)", b"hello, this is not an image at all", 415, "PNG, JPEG or WebP"),
    ("polyglot (PNG magic, ZIP body)", b"\x89PNG\r\n\x1a\n" + b"PK\x03\x04" + b"\x00" * 200, 422, "cannot decode"),
    ("animated", animated(), 422, "animated"),
]


def post(api, files=None, **body):
    body = {"model": MODEL, "task": "img2img", "prompt": "a red circle", "steps": 10, **body}
    if files is not None:
        data = {k: str(v) for k, v in body.items()}
        return api.post("/v1/generate", data=data, files=files)
    return api.post("/v1/generate", json=body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("name,data,status,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_images_get_their_4xx_naming_the_field_and_queue_nothing(api, r, name, data, status, words):
    for response in (post(api, image=b64(data)), post(api, files={"image": ("x.png", data, "image/png")})):
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["field"] == "image" and words in error["message"], error
    assert r.xlen(f"latentserve:stream:{MODEL}") == 0


def test_the_other_input_rules_name_their_field(api, r):
    image = b64(png(scene()))
    cases = [
        (dict(image="%%% not base64 %%%"), 422, "image"),
        (dict(task="txt2img", image=image), 422, "image"),  # txt2img takes no image
        (dict(), 422, "image"),  # img2img needs one
        (dict(image=image, mask=b64(png(scene()[:, :, 0]))), 422, "mask"),  # img2img takes no mask
        (dict(image=image, strength=0.05), 422, "strength"),  # 10 steps x 0.05 runs no step
        (dict(image=image, strength=1.5), 422, "strength"),
        (dict(image=b64(png(scene(60, 60)))), 422, "image"),  # 60 is not a multiple of the model's 8
        (dict(image=image, width=96, height=96), 422, "image"),  # another size, without resize
        (dict(image=b64(png(scene(1024, 64)))), 422, "image"),  # over the model's max_size
        (dict(task="inpaint", image=image), 422, "mask"),  # inpaint needs a mask
        (dict(task="inpaint", image=image, mask=b64(png(scene(32, 32)[:, :, 0]))), 422, "mask"),  # another size
        (dict(task="inpaint", image=image, mask=b64(png(scene()[:, :, 0])), strength=0.5), 422, "strength"),
    ]
    for body, status, field in cases:
        response = post(api, **body)
        assert response.status_code == status, (body.keys(), response.text)
        assert response.json()["error"]["field"] == field, (body.keys(), response.text)
    assert r.xlen(f"latentserve:stream:{MODEL}") == 0


def test_an_upload_over_the_byte_limit_is_413():
    noisy = png(np.random.default_rng(1).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    with pytest.raises(ApiError) as caught:
        decode(noisy, "image", UploadLimits(max_bytes=len(noisy) - 1))
    assert caught.value.status == 413 and caught.value.field == "image"


def test_modes_are_normalised_to_8_bit_rgb():
    limits = UploadLimits()
    rgb = scene()
    out = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(out, format="JPEG", quality=95)
    cmyk = decode(out.getvalue(), "image", limits)
    assert cmyk.shape == (64, 64, 3) and np.abs(cmyk.astype(int) - rgb).mean() < 12
    sixteen = decode(png((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "image", limits)
    assert sixteen.dtype == np.uint8 and sixteen.shape == (64, 64, 3) and sixteen.max() > 200
    rgba = np.dstack([rgb, np.zeros((64, 64), np.uint8)])  # fully transparent: the white background
    assert (decode(png(rgba), "image", limits) == 255).all()
    palette = Image.fromarray(rgb).convert("P")
    out = io.BytesIO()
    palette.save(out, format="PNG")
    assert decode(out.getvalue(), "image", limits).shape == (64, 64, 3)
    mask = decode(png(rgb), "mask", limits, mask=True)
    assert mask.shape == (64, 64)


def test_exif_orientation_is_applied():
    tall = scene(32, 64)  # 32 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    Image.fromarray(tall).save(out, format="JPEG", exif=exif.tobytes())
    assert decode(out.getvalue(), "image", UploadLimits()).shape == (32, 64, 3)  # shown 64 wide, 32 high
