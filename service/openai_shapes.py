"""OpenAI's Images API shapes, translated to and from ours (no routes here: service.openai_api).

A call's body (JSON for generations, form fields for edits) is split into OpenAI's own
parameters (`n`, `size`, `response_format`, `stream`, `partial_images`), the ones we accept
and ignore (`quality`, `style`, `background`...), and everything else, which is our own
GenerateRequest and is validated by it: the SDK's `extra_body` puts our options (seed, steps,
sampler...) in the same body, and a misspelt one is a 400 naming it.
"""

from __future__ import annotations

import base64
import io
import re
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from pydantic import ValidationError

from engines.registry import ModelSpec
from service.media import encode_image
from service.queue import Job, StoredImage
from service.schemas import GenerateRequest
from service.uploads import UploadLimits, decode, to_png
from service.validation import ApiError

# Accepted so that SDK calls written for OpenAI run unchanged; they change nothing here.
IGNORED = ("background", "moderation", "output_compression", "quality", "style", "complexity",
           "input_fidelity", "safety_identifier", "user")
# OpenAI features with no meaning here: refused by name rather than silently dropped.
UNSUPPORTED = ("frame_count", "frame_duration_ms", "svg", "markup")
MAX_IMAGES = next(m.le for m in GenerateRequest.model_fields["num_images"].metadata if hasattr(m, "le"))
MAX_PARTIAL_IMAGES = 3  # as OpenAI
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Statuses of bad input, answered 400 so that the SDK raises BadRequestError for all of them.
AS_BAD_REQUEST = {413, 415, 422}
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
               429: "rate_limit_error"}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param)


@dataclass(frozen=True)
class ImagesCall:
    """One OpenAI Images call: our request, and how to answer it."""

    request: GenerateRequest
    response_format: str = "b64_json"  # or url
    stream: bool = False
    partial_images: int = 0
    user: str | None = None
    # Our field names -> the OpenAI parameter the caller actually sent (num_images -> n...),
    # so that an error names what the caller wrote.
    params: dict[str, str] = field(default_factory=dict)


def _int(name: str, value, lo: int, hi: int, what: str = "") -> int | None:
    if value is None:
        return None
    try:
        number = None if isinstance(value, (bool, float)) else int(value)  # a form sends "2"
    except (TypeError, ValueError):
        number = None
    if number is None or not lo <= number <= hi:
        raise bad(name, f"{name} must be an integer between {lo} and {hi}{what}, got {value!r}")
    return number


def _bool(name: str, value) -> bool:
    if isinstance(value, str):  # a form field
        value = {"true": True, "false": False}.get(value.lower(), value)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise bad(name, f"{name} must be true or false, got {value!r}")


def parse_call(fields: dict, task: str, resize: str | None = None) -> ImagesCall:
    """The body's fields -> an ImagesCall; the route sets `task` (and a default `resize`)."""
    ours = {k: v for k, v in fields.items() if k not in IGNORED}
    for name in UNSUPPORTED:
        if ours.pop(name, None) is not None:
            raise bad(name, f"{name} is not supported by this server")
    params: dict[str, str] = {}
    n = _int("n", ours.pop("n", None), 1, MAX_IMAGES, " (the most images one request takes)")
    if n is not None:
        if ours.get("num_images") is not None:
            raise bad("n", "give n or num_images, not both")
        ours["num_images"], params["num_images"] = n, "n"
    size = ours.pop("size", None)
    if size not in (None, "auto"):
        match = SIZE.match(str(size))
        if match is None:
            raise bad("size", f"size must be 'auto' or WIDTHxHEIGHT in pixels, like 64x64, got {size!r}")
        if ours.get("width") is not None or ours.get("height") is not None:
            raise bad("size", "give size or width and height, not both")
        ours["width"], ours["height"] = int(match[1]), int(match[2])
        params.update(width="size", height="size")
    if resize is not None:
        ours.setdefault("resize", resize)
    response_format = ours.pop("response_format", None) or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise bad("response_format", f"response_format must be b64_json or url, got {response_format!r}")
    stream = _bool("stream", ours.pop("stream", None))
    partial = _int("partial_images", ours.pop("partial_images", None), 0, MAX_PARTIAL_IMAGES) or 0
    if stream and partial:
        ours["preview"] = True  # the worker then sends a small image with each progress event
    if ours.get("output_format") is None:  # the SDK may send null
        ours.pop("output_format", None)
    if ours.get("task") not in (None, task):
        raise bad("task", f"this route runs task {task}, got task {ours['task']!r}")
    ours["task"] = task
    try:
        request = GenerateRequest.model_validate(ours)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        name = params.get(name, name)
        raise bad(name, f"{name}: {first['msg']}") from None
    if stream and request.num_images > 1:
        name = params.get("num_images", "num_images")
        raise bad(name, f"stream: true takes {name} = 1 (one image per stream); without stream, up to {MAX_IMAGES}")
    user = fields.get("user") or fields.get("safety_identifier")
    return ImagesCall(request, response_format, stream, partial if stream else 0, user, params)


def error_body(exc: ApiError, params: dict[str, str] | None = None) -> tuple[int, dict]:
    """Our ApiError -> (status, OpenAI's error body); `param` names the field."""
    status = 400 if exc.status in AS_BAD_REQUEST else exc.status
    param = (params or {}).get(exc.field, exc.field)
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}


# ---------------------------------------------------------------------------- answers


def delivered(job: Job) -> dict:
    """The request of the stage whose images the caller gets: a chained job's last one
    (`upscale: true`: the upscaler's, 4x the asked size), even while it is in its first."""
    return job.request.get("then", {}).get("request", job.request)


def size_of(job: Job) -> str:
    r = delivered(job)
    return f"{r['width']}x{r['height']}"


def images_response(job: Job, images: list[StoredImage], response_format: str, url_of) -> dict:
    """OpenAI's ImagesResponse, plus our job id, model, warnings and each image's seed."""
    if response_format == "url":
        data = [{"url": url_of(k), "seed": image.seed} for k, image in enumerate(images)]
    else:
        data = [{"b64_json": base64.b64encode(image.data).decode(), "seed": image.seed} for image in images]
    return {"created": int(job.finished_at or time.time()), "data": data, "background": "opaque",
            "output_format": job.request["output_format"], "size": size_of(job),
            "id": job.id, "model": job.model, "warnings": job.warnings}


def _event(kind: str, job: Job, b64: str) -> dict:
    return {"type": kind, "b64_json": b64, "background": "opaque", "created_at": int(time.time()),
            "output_format": job.request["output_format"], "quality": "auto", "size": size_of(job)}


def partial_event(prefix: str, job: Job, index: int, b64: str) -> dict:
    return {**_event(f"{prefix}.partial_image", job, b64), "partial_image_index": index}


def completed_event(prefix: str, job: Job, image: StoredImage) -> dict:
    # The event type requires usage; nothing here is metered in tokens, so every count is 0.
    usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
             "output_tokens": 0, "total_tokens": 0}
    return {**_event(f"{prefix}.completed", job, base64.b64encode(image.data).decode()), "usage": usage,
            "id": job.id, "seed": image.seed}


def partial_steps(total: int, count: int) -> list[int]:
    """The steps whose previews become the partial images: evenly spaced, the last before the
    end (the final image follows anyway). Fewer than `count` when the job has fewer steps."""
    steps = sorted({-(-total * (i + 1) // (count + 1)) for i in range(count)})  # ceil
    return [s for s in steps if 1 <= s < total] or ([total] if count and total else [])


def preview_image(preview: dict, width: int, height: int, output_format: str) -> str:
    """A worker's preview (a small PNG at latent resolution) at the job's size and format, base64."""
    small = Image.open(io.BytesIO(base64.b64decode(preview["data"])), formats=["PNG"]).convert("RGB")
    big = small.resize((width, height), Image.Resampling.BILINEAR)
    data, _ = encode_image(np.asarray(big), output_format)
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- edits


def our_mask(data: bytes, limits: UploadLimits) -> bytes:
    """OpenAI's mask (fully transparent pixels, alpha 0, are repainted; any other alpha is kept)
    -> ours (white = repaint), as PNG."""
    decode(data, "mask", limits, mask=True)  # every upload rule (bytes, format, bomb, frames) first
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=["PNG", "WEBP", "JPEG"]))
    if not img.has_transparency_data:
        raise bad("mask", "mask: needs an alpha channel (OpenAI's convention: fully transparent pixels mark "
                          "the area to repaint); send a PNG or WebP with transparency")
    alpha = np.asarray(img.convert("RGBA").getchannel("A"))
    return to_png(np.where(alpha == 0, 255, 0).astype(np.uint8))


# ---------------------------------------------------------------------------- models


def model_object(spec: ModelSpec) -> dict:
    """OpenAI's Model (`created`: when the model's files were written)."""
    created = int((spec.path / "model_index.json").stat().st_mtime)
    return {"id": spec.id, "object": "model", "created": created, "owned_by": "latentserve"}
