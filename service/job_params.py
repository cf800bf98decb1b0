"""A job's parameters as the worker reads them from its Redis record: the txt2img ones every
task shares (Txt2ImgParams, parse_txt2img) and the helpers each task's parse uses to read its
own fields. A record may come from anything that can write to Redis, so every read checks its
type and names the field (JobInputError): that job fails alone and never reaches an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Hashable

import numpy as np

from engines.guidance import MODES
from engines.model import LoadedModel
from engines.sampler_catalog import CATALOG
from engines.tasks import txt2img
from service.cost import network_rows
from service.scheduler import PRIORITIES
from service.uploads import from_png

OUTPUT_FORMATS = ("png", "webp", "jpeg")


class JobInputError(ValueError):
    """The job's own request can't be run; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Txt2ImgParams:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    seed: int
    output_format: str
    schedule: str = "default"
    eta: float = 0.0
    guidance: str = "cfg"
    guidance_interval: tuple[float, float] | None = None
    guidance_interval_fraction: tuple[float, float] | None = None
    priority: str = "normal"  # high | normal | low (service.scheduler)
    timeout_s: float | None = None  # from the job's creation; past it the job fails

    def shape_key(self) -> Hashable:
        """What rows must agree on to share a step (one engine call): the latent shape. Step
        counts, samplers, schedules, guidance and prompts may all differ row by row."""
        return ("txt2img", self.width, self.height)

    def request_key(self) -> Hashable:
        """The whole-request baseline's key: jobs that start together end together."""
        return (*self.shape_key(), self.sampler, self.schedule, self.steps)

    @property
    def rows_per_step(self) -> int:
        """Network rows a step of this job computes (guidance's second half included)."""
        return network_rows(self.num_images, self.guidance, self.guidance_scale)

    @property
    def images_per_row(self) -> int:
        """Images one row denoises: 1 here, a video row's frames (VideoParams)."""
        return 1

    @property
    def passes(self) -> int:
        """Times the rows run their schedule (txt2video's FreeInit restarts them)."""
        return 1

    @property
    def denoiser_calls(self) -> int:
        """Network evaluations per image (Heun's N steps are 2N - 1; guidance rows not counted)."""
        return CATALOG[self.sampler].calls(self.steps) * self.passes

    def seeds(self) -> list[int]:
        """Image k uses seed + k (wrapping at 2**32), as the API documents."""
        return [(self.seed + k) % 2**32 for k in range(self.num_images)]

    def batch(self) -> txt2img.Txt2ImgBatch:
        """The job's images as the engines' tasks take them: one per seed, the job's settings."""
        images = [txt2img.ImageRequest(self.prompt, self.negative_prompt, seed, self.guidance_scale, self.sampler,
                                       self.steps, self.schedule, self.eta, self.guidance, self.guidance_interval,
                                       self.guidance_interval_fraction) for seed in self.seeds()]
        return txt2img.Txt2ImgBatch(self.width, self.height, self.sampler, self.steps, images)

    def repeated(self, pixels: np.ndarray):
        """An input (image or mask) once per image of the job."""
        return np.repeat(pixels[None], self.num_images, axis=0)


def get_field(request: dict, name: str, kind: type, default: Any = None) -> Any:
    value = request.get(name, default)
    if value is None:
        raise JobInputError(name, "missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JobInputError(name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def get_timeout(request: dict) -> float | None:
    value = request.get("timeout_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobInputError("timeout_s", f"expected a number, got {type(value).__name__}")
    return float(value)


def get_pair(request: dict, name: str) -> tuple[float, float] | None:
    value = request.get(name)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise JobInputError(name, "expected two numbers")
    return float(value[0]), float(value[1])


def parse_txt2img(request: Any, model: LoadedModel, inputs: dict[str, bytes] | None = None,
                  formats: tuple[str, ...] = OUTPUT_FORMATS) -> Txt2ImgParams:
    if not isinstance(request, dict):
        raise JobInputError("request", f"expected an object, got {type(request).__name__}")
    params = Txt2ImgParams(
        prompt=get_field(request, "prompt", str), negative_prompt=get_field(request, "negative_prompt", str, ""),
        width=get_field(request, "width", int), height=get_field(request, "height", int),
        num_images=get_field(request, "num_images", int, 1), steps=get_field(request, "steps", int),
        sampler=get_field(request, "sampler", str), guidance_scale=get_field(request, "guidance_scale", float),
        seed=get_field(request, "seed", int), output_format=get_field(request, "output_format", str, "png"),
        schedule=get_field(request, "schedule", str, "default"), eta=get_field(request, "eta", float, 0.0),
        guidance=get_field(request, "guidance", str, "cfg"),
        guidance_interval=get_pair(request, "guidance_interval"),
        guidance_interval_fraction=get_pair(request, "guidance_interval_fraction"),
        priority=get_field(request, "priority", str, "normal"),
        timeout_s=get_timeout(request),
    )
    checks = [
        ("width", params.width > 0, "must be positive"),
        ("height", params.height > 0, "must be positive"),
        ("num_images", params.num_images >= 1, "must be at least 1"),
        ("steps", params.steps >= 1, "must be at least 1"),
        ("sampler", params.sampler in model.spec.samplers,
         f"{params.sampler!r} is not one of {', '.join(model.spec.samplers)}"),
        ("schedule", params.sampler not in CATALOG or params.schedule in CATALOG[params.sampler].schedules,
         f"{params.schedule!r} is not a schedule of {params.sampler}"),
        ("eta", 0 <= params.eta <= 1, "must be in 0..1"),
        ("guidance", params.guidance in MODES, f"must be one of {', '.join(MODES)}"),
        ("guidance", params.guidance != "autoguidance" or model.guide is not None, "this model has no guide model"),
        ("guidance_scale", math.isfinite(params.guidance_scale) and params.guidance_scale >= 0,
         "must be a finite number >= 0"),
        ("seed", 0 <= params.seed < 2**32, "must be in 0..2**32-1"),
        ("output_format", params.output_format in formats, f"must be one of {', '.join(formats)}"),
        ("priority", params.priority in PRIORITIES, f"must be one of {', '.join(PRIORITIES)}"),
        ("timeout_s", params.timeout_s is None or params.timeout_s > 0, "must be positive"),
    ]
    for name, ok, message in checks:
        if not ok:
            raise JobInputError(name, message)
    return params


def extend(cls, base: Txt2ImgParams, **task_fields):
    """An image task's params: the txt2img ones it shares, parsed once, plus its own."""
    return cls(**{f.name: getattr(base, f.name) for f in fields(Txt2ImgParams)}, **task_fields)


def stored_image(inputs: dict[str, bytes] | None, name: str) -> np.ndarray:
    data = (inputs or {}).get(name)
    if data is None:
        raise JobInputError(name, "missing from the job's stored inputs")
    try:
        return from_png(data)
    except Exception as exc:
        raise JobInputError(name, f"stored input does not decode: {type(exc).__name__}") from None
