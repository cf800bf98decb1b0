"""Image to image (SDEdit, Meng et al. 2022): each input image's latents, noised to where
`strength` of its schedule begins, then denoised like txt2img over the schedule's tail.

The same computation as diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusion3Img2ImgPipeline: t_start = steps - int(steps * strength); each image's
generator first samples its VAE posterior, then draws the noise (the pipelines' order); the
noised latents start the rows, which then share denoiser calls with any other rows of their
shape (txt2img included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import Row
from engines.sampling.rows import start_at
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, conditions_of, guidance_of, schedule_of


@dataclass(frozen=True)
class Img2ImgBatch:
    """Images of one size, each with its input image and strength."""

    batch: Txt2ImgBatch  # size, default sampler and steps, each image's prompt, seed, guidance
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    strengths: list[float]


def first_step(steps: int, strength: float) -> int:
    """Where the tail starts (diffusers' get_timesteps); strength must leave >= 1 step."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run (needs steps * strength >= 1)")
    return steps - kept


def encode_inputs(model: LoadedModel, images: torch.Tensor, generators: StackedGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean latents sampled from each image's posterior, then each image's noise)."""
    x0 = model.encode_images(images.to(model.device), generators)
    noise = generators.randn(tuple(x0.shape[1:])).to(x0)
    return x0, noise


@torch.inference_mode()
def start_rows(model: LoadedModel, job: Img2ImgBatch) -> list[Row]:
    requests: list[ImageRequest] = job.batch.images
    generators = StackedGenerator([image.seed for image in requests])
    x0, noise = encode_inputs(model, job.images, generators)
    rows = []
    for k, (image, conditions) in enumerate(zip(requests, conditions_of(model, requests))):
        full = schedule_of(model, image, job.batch)
        schedule = full.tail(first_step(len(full.sigmas) - 1, job.strengths[k]))
        x = model.denoiser.noised(x0[k], noise[k], float(schedule.sigmas[0]))
        rows.append(start_at(x, schedule, image.sampler or job.batch.sampler, generators.generators[k], image.eta,
                             **conditions, guidance=guidance_of(model, image, full)))
    return rows


@torch.inference_mode()
def run(model: LoadedModel, job: Img2ImgBatch) -> torch.Tensor:
    """The whole batch in one go (tests, evaluation; the worker steps rows itself): uint8 [B, H, W, 3]."""
    from engines.sampling import sample
    from engines.tasks.txt2img import evaluator_of, finish

    return finish(model, sample(evaluator_of(model), start_rows(model, job)))


def pixels_to_tensor(images) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> [B, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1
