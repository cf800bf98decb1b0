"""A request, checked against the model it names and completed with that model's defaults."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from engines.prompts import check_prompt
from engines.sampler_catalog import CATALOG, canonical
from engines.registry import ModelSpec, Registry
from service.schemas import GenerateRequest


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field)


# The files a task's job makes, default first: images (service.media) or videos (service.video_media).
# A video defaults to MP4 (H.264): what browsers, phones and players all play, and the
# smallest; animated WebP keeps every pixel (lossless), GIF is for where only GIF goes.
IMAGE_FORMATS = ("png", "webp", "jpeg")
VIDEO_FORMATS = ("mp4", "webp", "gif")
DEFAULT_FPS = 8  # AnimateDiff's examples write their 16-frame clips at 8 fps


def outputs(req: GenerateRequest, spec: ModelSpec) -> dict:
    """The request's output fields: its file format, and a video's frames and fps."""
    video = req.task == "txt2video"
    formats = VIDEO_FORMATS if video else IMAGE_FORMATS
    fmt = req.output_format or formats[0]
    if fmt not in formats:
        raise invalid("output_format", f"task {req.task} makes {'videos' if video else 'images'}: output_format "
                                       f"must be one of {', '.join(formats)}, got {fmt!r}")
    if not video:
        for name in ("num_frames", "fps", "free_init_iterations"):
            if getattr(req, name) is not None:
                raise invalid(name, f"{name} is for task txt2video, not {req.task}")
        return {"output_format": fmt}
    if req.preview:
        raise invalid("preview", "previews are for image tasks, not txt2video")
    frames = req.num_frames or spec.defaults.num_frames
    if not spec.limits.min_frames <= frames <= spec.limits.max_frames:
        raise invalid("num_frames", f"num_frames must be in {spec.limits.min_frames}..{spec.limits.max_frames} "
                                    f"for model {spec.id}, got {frames}")
    return {"output_format": fmt, "num_frames": frames, "fps": req.fps or DEFAULT_FPS,
            "free_init_iterations": req.free_init_iterations or 1}


def model_for(req: GenerateRequest, registry: Registry) -> ModelSpec:
    """The request's model, which must serve its task (404 / 422 before anything else is read)."""
    try:
        spec = registry.get(req.model)
    except KeyError:
        raise ApiError(404, "model_not_found", f"unknown model {req.model!r}; see GET /v1/models", "model")
    if req.task not in spec.tasks:
        raise invalid("task", f"model {spec.id} does not support task {req.task!r} (supports: {', '.join(spec.tasks)})")
    return spec


def nearest_size(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """The size a model serves nearest to an image's: one of its `sizes` (closest aspect, then
    area), else each side rounded to the multiple within the limits."""
    lim = spec.limits
    if lim.sizes:
        return min(lim.sizes, key=lambda s: (abs(s[0] / s[1] - width / height), abs(s[0] * s[1] - width * height)))
    m = lim.size_multiple
    return tuple(min(lim.max_size, max(lim.min_size, round(v / m) * m)) for v in (width, height))


@dataclass(frozen=True)
class Resolved:
    spec: ModelSpec
    request: dict  # every parameter filled in: what the worker runs
    warnings: list[str]


def resolve(req: GenerateRequest, registry: Registry, image_size: tuple[int, int] | None = None) -> Resolved:
    """The request checked against its model and completed with its defaults. `image_size`:
    an image task's input (width, height), the job's size unless width/height say otherwise."""
    spec = model_for(req, registry)

    d, lim = spec.defaults, spec.limits
    size = image_size if image_size and not (req.width or req.height) else None
    if size and req.resize == "fit":
        size = nearest_size(spec, *size)
    width, height = size or (req.width or d.width, req.height or d.height)
    hint = " (the image's size; send width and height, or resize: 'fit')" if size else ""
    for name, value in (("width", width), ("height", height)):
        if not lim.min_size <= value <= lim.max_size or value % lim.size_multiple:
            raise invalid("image" if size else name, f"{name} must be a multiple of {lim.size_multiple} between "
                          f"{lim.min_size} and {lim.max_size} for model {spec.id}, got {value}{hint}")
    if lim.sizes and (width, height) not in lim.sizes:
        sizes = ", ".join(f"{w}x{h}" for w, h in lim.sizes)
        raise invalid("image" if size else "width",
                      f"model {spec.id} serves the sizes {sizes} (width x height), got {width}x{height}{hint}")
    steps = req.steps or d.steps
    if steps > lim.max_steps:
        raise invalid("steps", f"steps must be at most {lim.max_steps} for model {spec.id}, got {steps}")
    sampler = canonical(req.sampler, spec.family) if req.sampler else d.sampler
    if sampler not in spec.samplers:
        raise invalid("sampler", f"sampler must be one of {', '.join(spec.samplers)} (or an alias) for model "
                                 f"{spec.id}, got {req.sampler!r}")
    schedule = req.schedule or (d.schedule if sampler == d.sampler else "default")
    if schedule not in CATALOG[sampler].schedules:
        raise invalid("schedule", f"sampler {sampler} takes schedule {', '.join(CATALOG[sampler].schedules)}, "
                                  f"got {schedule!r}")
    if req.eta is not None and sampler != "ddim":
        raise invalid("eta", f"eta is DDIM's; sampler {sampler} does not take it")
    guidance = d.guidance_scale if req.guidance_scale is None else req.guidance_scale
    if guidance > lim.max_guidance_scale:
        raise invalid("guidance_scale", f"guidance_scale must be at most {lim.max_guidance_scale}, got {guidance}")
    mode = req.guidance or d.guidance
    if mode not in lim.guidance_modes:
        raise invalid("guidance", f"model {spec.id} takes guidance {', '.join(lim.guidance_modes)}, got {mode!r}")
    if mode == "autoguidance" and spec.guide is None:
        raise invalid("guidance", f"model {spec.id} has no guide model for autoguidance")
    interval, fraction = req.guidance_interval, req.guidance_interval_fraction
    if interval is not None and fraction is not None:
        raise invalid("guidance_interval_fraction", "give guidance_interval or guidance_interval_fraction, not both")
    if interval is not None and not 0 <= interval[0] < interval[1]:
        raise invalid("guidance_interval", f"guidance_interval must be [lo, hi] with 0 <= lo < hi, got {interval}")
    if fraction is not None and not 0 <= fraction[0] < fraction[1] <= 1:
        raise invalid("guidance_interval_fraction",
                      f"guidance_interval_fraction must be [start, end] with 0 <= start < end <= 1, got {fraction}")
    if not req.prompt.strip():
        raise invalid("prompt", "prompt must not be blank")

    warnings = []
    for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        unknown, truncated = [], False
        for tokenizer_dir in spec.tokenizer_dirs():
            check = check_prompt(tokenizer_dir, text)
            unknown += [w for w in check.unknown_words if w not in unknown]
            truncated |= check.truncated
        if unknown:
            warnings.append(f"{field}: words unknown to {spec.id}'s tokenizer, read as its unknown "
                            f"token: {', '.join(unknown)}")
        if truncated:
            warnings.append(f"{field}: longer than {spec.id}'s text encoder reads; the end is cut off")

    request = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": width,
        "height": height,
        "num_images": req.num_images,
        "steps": steps,
        "sampler": sampler,
        "schedule": schedule,
        "eta": req.eta or 0.0,
        "guidance_scale": guidance,
        "guidance": mode,
        "guidance_interval": interval,
        "guidance_interval_fraction": fraction,
        "seed": secrets.randbelow(2**32) if req.seed is None else req.seed,
        **outputs(req, spec),
        "priority": req.priority,
        "timeout_s": req.timeout_s,
        "preview": req.preview,
    }
    return Resolved(spec, request, warnings)
