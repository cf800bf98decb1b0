"""Text to image over a batch of images that share size, sampler and step count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engines.guidance import guided
from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import SAMPLERS
from engines.schedules import SCHEDULES


@dataclass(frozen=True)
class ImageRequest:
    """One image of a batch: its own prompt, seed and guidance."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float


@dataclass(frozen=True)
class Txt2ImgBatch:
    width: int
    height: int
    sampler: str
    steps: int
    images: list[ImageRequest]


StepCallback = Callable[[int, int], None]  # (steps done, total); may raise to abort


def initial_noise(model: LoadedModel, batch: Txt2ImgBatch) -> torch.Tensor:
    """Standard-normal latents, one seeded generator per image (so batch-mates don't matter)."""
    f = model.vae_scale_factor
    shape = (model.latent_channels, batch.height // f, batch.width // f)
    return StackedGenerator([image.seed for image in batch.images]).randn(shape)


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

    # 2. Initial latents from each image's own seed, scaled to the first sigma.
    sigmas = SCHEDULES[batch.sampler](model.scheduler_config, batch.steps)
    noise = (initial_noise(model, batch) if noise is None else noise).to(model.device)
    x = model.denoiser.noise_to_x(noise, sigmas[0])

    # 3. Sample: one engine call per step for the whole batch (both guidance rows included).
    denoise = guided(model.denoiser, cond, uncond, scales)
    step_done = None if on_step is None else (lambda i, _x0: on_step(i + 1, batch.steps))
    x = SAMPLERS[batch.sampler](denoise, x, sigmas, on_step=step_done)

    # 4. Decode latents to pixels.
    images = model.decode_latents(model.denoiser.x_to_latents(x, sigmas[-1]))
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
