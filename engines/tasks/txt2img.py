"""Text to image over a batch of images of one size; each image its own prompt, seed,
guidance, sampler, schedule and step count (rows share each denoiser call regardless)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engines.guidance import guided
from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import Row, sample, start
from engines.schedules import make_schedule


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


@dataclass(frozen=True)
class Txt2ImgBatch:
    width: int
    height: int
    sampler: str
    steps: int
    images: list[ImageRequest]


StepCallback = Callable[[int, int], None]  # (steps done, total); may raise to abort


def initial_noise(model: LoadedModel, batch: Txt2ImgBatch, generators: StackedGenerator | None = None) -> torch.Tensor:
    """Standard-normal latents, one seeded generator per image (so batch-mates don't matter)."""
    f = model.vae_scale_factor
    shape = (model.latent_channels, batch.height // f, batch.width // f)
    return (generators or StackedGenerator([image.seed for image in batch.images])).randn(shape)


def start_rows(model: LoadedModel, batch: Txt2ImgBatch, noise: torch.Tensor | None = None) -> list[Row]:
    """Each image's row at step 0. Its generator drew its initial noise and goes on to draw
    any noise its sampler needs, in diffusers' order (one generator per image)."""
    generators = StackedGenerator([image.seed for image in batch.images])
    noise = initial_noise(model, batch, generators) if noise is None else noise
    rows = []
    for k, image in enumerate(batch.images):
        sampler = image.sampler or batch.sampler
        schedule = make_schedule(model.scheduler_config, sampler, image.steps or batch.steps, image.schedule)
        rows.append(start(noise[k].to(model.device), schedule, sampler, generators.generators[k], image.eta))
    return rows


@torch.inference_mode()
def run(
    model: LoadedModel,
    batch: Txt2ImgBatch,
    on_step: StepCallback | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate the batch; returns uint8 images [B, H, W, 3]."""
    # 1. Conditions: every prompt and negative prompt, once for the batch.
    cond = model.encode_prompts([image.prompt for image in batch.images])
    uncond = model.encode_prompts([image.negative_prompt for image in batch.images])
    scales = torch.tensor([image.guidance_scale for image in batch.images], device=model.device)

    # 2. Initial latents from each image's own seed, scaled to its schedule's first sigma.
    rows = start_rows(model, batch, noise)
    total = max(row.steps for row in rows)

    # 3. Sample: one engine call per iteration for every unfinished row (guidance rows included).
    denoise = guided(model.denoiser, cond, uncond, scales)
    reported = [0]

    def on_call(rows: list[Row], _x0: torch.Tensor) -> None:
        done = min(row.step for row in rows)
        if on_step is not None and done > reported[0]:
            reported[0] = done
            on_step(done, total)

    rows = sample(denoise, rows, on_call)

    # 4. Decode latents to pixels.
    x = torch.stack([row.x for row in rows])
    end = torch.tensor([float(row.schedule.sigmas[-1]) for row in rows], device=x.device)
    images = model.decode_latents(model.denoiser.x_to_latents(x, end))
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
