"""An image task's inputs, from the request to what is stored with the job.

`gather` takes the uploads (multipart files, or base64 fields of the JSON body), `decode`s
each with service.uploads' rules, and after `resolve` has fixed the job's size, `complete`
checks what the task needs (the mask's size equals the image's; strength leaves a step to
run), resizes when the request asks (`resize: "fit"`), adds the task's own fields to the
request and returns the normalised PNGs stored beside the job (service.queue: their own key,
the job's TTL), never inside the request JSON every load reads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engines.registry import DEFAULT_NOISE_LEVEL
from service.schemas import GenerateRequest
from service.uploads import UploadLimits, decode, from_base64, to_png
from service.validation import Resolved, invalid

# The uploads each task takes, all required.
TASK_INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "superres": ("image",)}
UPSCALE = {"superres": 4}  # output pixels per input pixel, per side
DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image default


def gather(req: GenerateRequest, files: dict[str, bytes]) -> dict[str, bytes]:
    """The raw bytes of each upload: multipart files, or the JSON body's base64 fields."""
    raw = dict(files)
    for field in ("image", "mask"):
        value = getattr(req, field)
        if value is not None:
            if field in raw:
                raise invalid(field, f"{field} given twice: as a file and as base64")
            raw[field] = from_base64(value, field)
    needed = TASK_INPUTS.get(req.task, ())
    for field in needed:
        if field not in raw:
            raise invalid(field, f"task {req.task} needs an {field}")
    for field in raw:
        if field not in needed:
            raise invalid(field, f"task {req.task} takes no {field}")
    for field in ("strength", "mask_blur", "noise_level", "back_projection"):
        takes = {"strength": ("img2img",), "mask_blur": ("inpaint",), "noise_level": ("superres",),
                 "back_projection": ("superres",)}[field]
        upscaled = field in ("noise_level", "back_projection") and req.upscale  # the second stage's
        if getattr(req, field) is not None and req.task not in takes and not upscaled:
            raise invalid(field, f"{field} is for task {' / '.join(takes)}, not {req.task}")
    return raw


def decode_all(raw: dict[str, bytes], limits: UploadLimits) -> dict[str, np.ndarray]:
    return {field: decode(data, field, limits, mask=field == "mask") for field, data in raw.items()}


def image_size(pixels: dict[str, np.ndarray], task: str = "img2img") -> tuple[int, int] | None:
    """The job's (output) size an input image implies: its own, or 4x it for superres."""
    image = pixels.get("image")
    f = UPSCALE.get(task, 1)
    return None if image is None else (image.shape[1] * f, image.shape[0] * f)


def superres_fields(req: GenerateRequest) -> dict:
    """A superres job's fields with their defaults (a superres request's, or an upscale chain's
    second stage)."""
    return {"noise_level": DEFAULT_NOISE_LEVEL if req.noise_level is None else req.noise_level,
            "back_projection": req.back_projection is not False}


def complete(req: GenerateRequest, resolved: Resolved, pixels: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Check and fit the inputs to the resolved job; fill the task's fields; the PNGs to store."""
    if not pixels:
        return {}
    r = resolved.request
    image, mask = pixels["image"], pixels.get("mask")
    if mask is not None and mask.shape != image.shape[:2]:
        raise invalid("mask", f"the mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                              f"{image.shape[1]}x{image.shape[0]}: they must be the same size")
    f = UPSCALE.get(req.task, 1)
    size = (r["width"] // f, r["height"] // f)
    if (image.shape[1], image.shape[0]) != size:
        if req.resize != "fit":
            raise invalid("image", f"the image is {image.shape[1]}x{image.shape[0]} but the job needs "
                                   f"{size[0]}x{size[1]}: send an image of that size, or resize: 'fit'")
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.BILINEAR))
    if req.task == "img2img":
        strength = DEFAULT_STRENGTH if req.strength is None else req.strength
        if int(r["steps"] * strength) < 1:
            raise invalid("strength", f"strength {strength} of {r['steps']} steps runs no step "
                                      "(steps * strength must be at least 1)")
        r["strength"] = strength
    if req.task == "inpaint":
        r["mask_blur"] = req.mask_blur or 0
    if req.task == "superres":
        r.update(superres_fields(req))
    stored = {"image": to_png(image)}
    if mask is not None:
        stored["mask"] = to_png(mask)
    r["inputs"] = sorted(stored)
    return stored
