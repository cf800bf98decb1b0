"""The task table: a job's task name -> the runner that serves it, and nothing else.

A runner has two halves. `parse` reads a job's request (a JSON dict in its Redis record) into
typed parameters; an error there is caused by the job's own input (`JobInputError`), so that
job fails alone, at once, and never reaches an engine. `run` computes a batch of parsed jobs
as one engine batch and returns uint8 pixels, row after row in the order given.

Records are normally written by the API after validation, but anything that can write to
Redis can write a record, so `parse` checks everything the engine relies on for its types and
names; the registry limits (sizes, steps) stay the API's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from engines.guidance import MODES
from engines.model import LoadedModel
from engines.sampler_catalog import CATALOG
from engines.tasks import txt2img

OUTPUT_FORMATS = ("png", "webp", "jpeg")
StepCallback = Callable[[int, int], None]  # (steps done, total); may raise to stop the batch


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

    def compatibility_key(self) -> Hashable:
        """What must agree for jobs to share a batch (prompts, seeds, scales, eta may differ).
        Rows of any sampler or schedule could share calls (engines.sampling is per row);
        they are kept apart until the step-level scheduler lets rows leave at their own end."""
        return (self.width, self.height, self.sampler, self.schedule, self.steps)

    @property
    def denoiser_calls(self) -> int:
        """Network evaluations per image (Heun's N steps are 2N - 1; guidance rows not counted)."""
        return CATALOG[self.sampler].calls(self.steps)

    def seeds(self) -> list[int]:
        """Image k uses seed + k (wrapping at 2**32), as the API documents."""
        return [(self.seed + k) % 2**32 for k in range(self.num_images)]


def _get(request: dict, name: str, kind: type, default: Any = None) -> Any:
    value = request.get(name, default)
    if value is None:
        raise JobInputError(name, "missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JobInputError(name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _pair(request: dict, name: str) -> tuple[float, float] | None:
    value = request.get(name)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise JobInputError(name, "expected two numbers")
    return float(value[0]), float(value[1])


def parse_txt2img(request: Any, model: LoadedModel) -> Txt2ImgParams:
    if not isinstance(request, dict):
        raise JobInputError("request", f"expected an object, got {type(request).__name__}")
    params = Txt2ImgParams(
        prompt=_get(request, "prompt", str), negative_prompt=_get(request, "negative_prompt", str, ""),
        width=_get(request, "width", int), height=_get(request, "height", int),
        num_images=_get(request, "num_images", int, 1), steps=_get(request, "steps", int),
        sampler=_get(request, "sampler", str), guidance_scale=_get(request, "guidance_scale", float),
        seed=_get(request, "seed", int), output_format=_get(request, "output_format", str, "png"),
        schedule=_get(request, "schedule", str, "default"), eta=_get(request, "eta", float, 0.0),
        guidance=_get(request, "guidance", str, "cfg"),
        guidance_interval=_pair(request, "guidance_interval"),
        guidance_interval_fraction=_pair(request, "guidance_interval_fraction"),
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
        ("output_format", params.output_format in OUTPUT_FORMATS, f"must be one of {', '.join(OUTPUT_FORMATS)}"),
    ]
    for field, ok, message in checks:
        if not ok:
            raise JobInputError(field, message)
    return params


def run_txt2img(model: LoadedModel, jobs: list[Txt2ImgParams], on_step: StepCallback | None,
                stats: txt2img.RunStats | None = None) -> torch.Tensor:
    first = jobs[0]
    rows = [txt2img.ImageRequest(p.prompt, p.negative_prompt, seed, p.guidance_scale, p.sampler, p.steps,
                                 p.schedule, p.eta, p.guidance, p.guidance_interval, p.guidance_interval_fraction)
            for p in jobs for seed in p.seeds()]
    batch = txt2img.Txt2ImgBatch(first.width, first.height, first.sampler, first.steps, rows)
    return txt2img.run(model, batch, on_step, stats=stats)


@dataclass(frozen=True)
class Runner:
    parse: Callable[[Any, LoadedModel], Any]
    run: Callable[..., torch.Tensor]  # (model, params, on_step, stats: RunStats) -> uint8 pixels


# task name -> runner. A job whose task is missing here fails at once (never retried).
RUNNERS: dict[str, Runner] = {
    "txt2img": Runner(parse_txt2img, run_txt2img),
}
