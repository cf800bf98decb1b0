"""Super-resolution x4 in the SD x4 upscaler design (LDM-SR, Rombach et al. 2022, sec. 4.4):
the low-resolution image, noised to `noise_level` by the model's low-res DDPM schedule, is
concatenated to the latents (which have its size: the VAE is f4) at every call, with the noise
level as the UNet's class label; the latents then decode to 4x the input's size.

The same computation as diffusers' StableDiffusionUpscalePipeline: from each image's generator
the low-res image's noise is drawn first, then the latents'; rows share calls with any other
rows of the upscaler of their size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import Row, start
from engines.schedules import vp_alphas_cumprod
from engines.tasks.txt2img import Txt2ImgBatch, conditions_of, guidance_of, schedule_of


@dataclass(frozen=True)
class SuperresBatch:
    batch: Txt2ImgBatch  # the OUTPUT size (4x the input's), default sampler and steps, each image's prompt, seed, guidance
    images: torch.Tensor  # [B, 3, h, w] low-res inputs in [-1, 1]
    noise_levels: list[int]


def is_upscaler(model: LoadedModel) -> bool:
    """The x4 design: the latent and the low-res image's 3 channels in."""
    return model.in_channels == model.latent_channels + 3


def low_res_alphas(model: LoadedModel) -> torch.Tensor:
    """alpha_bar of the model's `low_res_scheduler` (the noise augmentation's DDPM schedule)."""
    return _low_res_alphas(model.spec.path)


def max_noise_level(model: LoadedModel) -> int:
    return _max_noise_level(model.spec.path)


@lru_cache(maxsize=16)  # read once per model directory, not per admitted job
def _low_res_alphas(path: Path) -> torch.Tensor:
    return vp_alphas_cumprod(json.loads((path / "low_res_scheduler" / "scheduler_config.json").read_text()))


@lru_cache(maxsize=16)
def _max_noise_level(path: Path) -> int:
    return int(json.loads((path / "model_index.json").read_text()).get("max_noise_level", 350))


@torch.inference_mode()
def start_rows(model: LoadedModel, job: SuperresBatch) -> list[Row]:
    requests = job.batch.images
    generators = StackedGenerator([image.seed for image in requests])
    image_noise = generators.randn(tuple(job.images.shape[1:]))
    alphas = low_res_alphas(model)
    levels = torch.tensor(job.noise_levels, dtype=torch.long)
    a = alphas[levels].view(-1, 1, 1, 1)
    low = (a.sqrt() * job.images + (1 - a).sqrt() * image_noise).to(model.device)  # DDPMScheduler.add_noise
    noise = generators.randn((model.latent_channels, *job.images.shape[-2:])).to(model.device)
    rows = []
    for k, (image, conditions) in enumerate(zip(requests, conditions_of(model, requests))):
        label = levels[k].to(model.device)
        conditions = {name: (c.with_concat(low[k], label) if c is not None and name != "guide_cond" else c)
                      for name, c in conditions.items()}
        schedule = schedule_of(model, image, job.batch)
        rows.append(start(noise[k], schedule, image.sampler or job.batch.sampler, generators.generators[k],
                          image.eta, **conditions, guidance=guidance_of(model, image, schedule)))
    return rows


BACK_PROJECTION_ROUNDS = 3


@torch.inference_mode()
def back_project(pixels: np.ndarray, low: np.ndarray, rounds: int = BACK_PROJECTION_ROUNDS) -> np.ndarray:
    """Iterative back-projection (Irani & Peleg 1991): uint8 [B, H, W, 3] outputs corrected
    `rounds` times by the bilinearly upsampled difference between the uint8 [B, h, w, 3] inputs
    and the outputs' box averages over each input pixel's footprint, so that they average back
    to the input, as a render at the low size is the box average of one at the high size. The
    upscaler's sharp edges stay; what it cannot pin down from the input (a background one or
    two levels off, an edge a pixel astray) is the input's again. Hand-written: diffusers'
    pipelines have no such step (StableSR's and ComfyUI's color fixes match statistics only)."""
    factor = pixels.shape[1] // low.shape[1]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    target = torch.from_numpy(low).permute(0, 3, 1, 2).float()
    for _ in range(rounds):
        error = target - F.avg_pool2d(x, factor)
        x = x + F.interpolate(error, scale_factor=factor, mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def run(model: LoadedModel, job: SuperresBatch) -> torch.Tensor:
    """The whole batch in one go (tests, evaluation): uint8 [B, 4h, 4w, 3]."""
    from engines.sampling import sample
    from engines.tasks.txt2img import evaluator_of, finish

    return finish(model, sample(evaluator_of(model), start_rows(model, job)))
