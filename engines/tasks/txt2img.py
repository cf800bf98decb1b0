"""Text to image over a batch of images of one size; each image its own prompt, seed,
guidance, sampler, schedule and step count (rows share each denoiser call regardless)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from engines.guidance import Guidance, evaluator, interval_from_fraction
from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import Row, sample, start, step_rows
from engines.schedules import Schedule, make_schedule
from engines.tiling import Tiling, tiled


@dataclass(frozen=True)
class ImageRequest:
    """One image of a batch: its own prompt, seed, guidance and sampling."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float
    sampler: str = ""  # canonical name; "" means the batch's
    steps: int = 0  # 0 means the batch's
    schedule: str = "default"
    eta: float = 0.0  # DDIM's eta
    guidance: str = "cfg"  # cfg | autoguidance | apg | none (engines.guidance)
    guidance_interval: tuple[float, float] | None = None  # guided for sigma in (lo, hi]
    guidance_interval_fraction: tuple[float, float] | None = None  # steps i with start <= i/N < end


@dataclass(frozen=True)
class Txt2ImgBatch:
    width: int
    height: int
    sampler: str
    steps: int
    images: list[ImageRequest]


StepCallback = Callable[[int, int], None]  # (steps done, total); may raise to abort


@dataclass
class RunStats:
    denoiser_rows: int = 0  # network rows computed (guidance halves and guide calls included)


def initial_noise(model: LoadedModel, batch: Txt2ImgBatch, generators: StackedGenerator | None = None) -> torch.Tensor:
    """Standard-normal latents, one seeded generator per image (so batch-mates don't matter)."""
    f = model.vae_scale_factor
    shape = (model.latent_channels, batch.height // f, batch.width // f)
    return (generators or StackedGenerator([image.seed for image in batch.images])).randn(shape)


def guidance_of(model: LoadedModel, image: ImageRequest, schedule: Schedule) -> Guidance:
    lo, hi = 0.0, math.inf
    if image.guidance_interval is not None:
        lo, hi = image.guidance_interval
    elif image.guidance_interval_fraction is not None:
        lo, hi = interval_from_fraction(schedule.sigmas, *image.guidance_interval_fraction)
    apg = {k: float(v) for k, v in model.spec.options.items() if k.startswith("apg_")}
    return Guidance(image.guidance, image.guidance_scale, lo, hi, **apg)


def start_rows(model: LoadedModel, batch: Txt2ImgBatch, noise: torch.Tensor | None = None,
               generators: StackedGenerator | None = None) -> list[Row]:
    """Each image's row at step 0, with its conditioning and guidance. Its generator drew its
    initial noise and goes on to draw any noise its sampler needs, in diffusers' order (one
    generator per image). A task that drew `noise` its own way passes the `generators` it
    drew it from (a video's [C, F, h, w] noise)."""
    generators = generators or StackedGenerator([image.seed for image in batch.images])
    noise = initial_noise(model, batch, generators) if noise is None else noise
    rows = []
    for k, (image, conditions) in enumerate(zip(batch.images, conditions_of(model, batch.images))):
        schedule = schedule_of(model, image, batch)
        rows.append(start(noise[k].to(model.device), schedule, image.sampler or batch.sampler,
                          generators.generators[k], image.eta, **conditions,
                          guidance=guidance_of(model, image, schedule)))
    return rows


def schedule_of(model: LoadedModel, image: ImageRequest, batch: Txt2ImgBatch) -> Schedule:
    return make_schedule(model.scheduler_config, image.sampler or batch.sampler, image.steps or batch.steps,
                         image.schedule)


def conditions_of(model: LoadedModel, images: list[ImageRequest]) -> list[dict]:
    """Each image's cond, uncond and guide_cond (Row fields): every prompt and negative
    prompt encoded once for the batch."""
    cond = model.encode_prompts([image.prompt for image in images]).rows()
    uncond = model.encode_prompts([image.negative_prompt for image in images]).rows()
    guide_cond: list = [None] * len(images)
    if any(image.guidance == "autoguidance" for image in images):
        if model.guide is None:
            raise ValueError(f"model {model.spec.id} has no guide model for autoguidance")
        guide_cond = model.guide.encode_prompts([image.prompt for image in images]).rows()
    return [dict(cond=c, uncond=u, guide_cond=g) for c, u, g in zip(cond, uncond, guide_cond)]


def evaluator_of(model: LoadedModel, counter: list[int] | None = None):
    """evaluate(rows) -> (x0, rows): the model's denoiser (and guide) under each row's guidance,
    window by window for images larger than the model's tile (engines.tiling)."""
    evaluate = evaluator(model.denoiser, None if model.guide is None else model.guide.denoiser, counter)
    if model.spec.tile:
        cells = model.spec.tile // model.vae_scale_factor
        evaluate = tiled(evaluate, Tiling(cells, cells // 4))
    return evaluate


@torch.inference_mode()
def step(evaluate, rows: list[Row]) -> list[Row]:
    """One engine call over `rows` (each at its own step, sigma and guidance), then each row's
    sampler step: what a step-level scheduler runs for one group."""
    x0, evaluated = evaluate(rows)
    return step_rows(evaluated, x0)


@torch.inference_mode()
def finish(model: LoadedModel, rows: list[Row]) -> torch.Tensor:
    """Finished rows (of one size) to uint8 images [B, H, W, 3]."""
    x = torch.stack([row.x for row in rows])
    end = torch.tensor([float(row.schedule.sigmas[-1]) for row in rows], device=x.device)
    images = model.decode_latents(model.denoiser.x_to_latents(x, end))
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.inference_mode()
def run(
    model: LoadedModel,
    batch: Txt2ImgBatch,
    on_step: StepCallback | None = None,
    noise: torch.Tensor | None = None,
    stats: RunStats | None = None,
) -> torch.Tensor:
    """Generate the whole batch in one go (benchmarks, evaluation, warm-up; the worker steps
    rows itself); returns uint8 images [B, H, W, 3]."""
    # 1-2. Conditions, and initial latents from each image's own seed at its first sigma.
    rows = start_rows(model, batch, noise)
    total = max(row.steps for row in rows)

    # 3. Sample: one engine call per iteration for every unfinished row (guidance rows included).
    counter = [0]
    reported = [0]

    def on_call(rows: list[Row], _x0: torch.Tensor) -> None:
        done = min((row.step for row in rows if not row.done), default=total)
        if on_step is not None and done > reported[0]:
            reported[0] = done
            on_step(done, total)

    rows = sample(evaluator_of(model, counter), rows, on_call)
    if stats is not None:
        stats.denoiser_rows += counter[0]
    # 4. Decode latents to pixels.
    return finish(model, rows)
