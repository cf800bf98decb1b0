"""Inpainting: repaint where the mask is white, keep the rest. Two paths, chosen by the model:

- a dedicated inpainting UNet (SD-inpainting's 9 input channels): every call gets, beside the
  noisy latent, the mask at latent size and the latents of the masked image (carried in each
  row's conditioning, `Conditioning.concat`). As StableDiffusionInpaintPipeline: the noise is
  drawn first, then the masked image's VAE posterior sample, from each image's generator.
- any other model, both families (training-free, as diffusers' inpaint pipelines run plain
  weights): rows start from noise and, after every step, the region to keep is replaced by the
  input's latents noised to the row's new sigma (`sampling.rows.Known`); the image's posterior
  sample is drawn first, then the noise, then the masked image's sample the pipeline draws.

Both produce the pipeline's output before compositing; `composite` then puts the input's own
pixels back outside the (optionally blurred) mask, so they come back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from engines.denoisers import FlowDenoiser
from engines.model import LoadedModel
from engines.noise import StackedGenerator
from engines.sampling import Row, start
from engines.sampling.rows import Known
from engines.tasks.txt2img import Txt2ImgBatch, conditions_of, guidance_of, schedule_of


@dataclass(frozen=True)
class InpaintBatch:
    batch: Txt2ImgBatch  # size, default sampler and steps, each image's prompt, seed, guidance
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    masks: torch.Tensor  # [B, 1, H, W] in [0, 1]: 1 (white) = repaint


def dedicated(model: LoadedModel) -> bool:
    """An inpainting UNet: the latent, a mask channel and the masked image's latents (SD's 9)."""
    return model.in_channels == 2 * model.latent_channels + 1


@torch.inference_mode()
def start_rows(model: LoadedModel, job: InpaintBatch) -> list[Row]:
    requests = job.batch.images
    generators = StackedGenerator([image.seed for image in requests])
    condition = (job.masks >= 0.5).float()  # diffusers' mask processor binarises
    f = model.vae_scale_factor
    small = F.interpolate(condition, size=(job.images.shape[2] // f, job.images.shape[3] // f)).to(model.device)
    shape = (model.latent_channels, *small.shape[-2:])
    if dedicated(model):
        noise = generators.randn(shape).to(model.device)
        masked = model.encode_images((job.images * (condition < 0.5)).to(model.device), generators)
        extra = [dict(concat=c) for c in torch.cat([small, masked], 1)]
    else:
        x0 = model.encode_images(job.images.to(model.device), generators)
        noise = generators.randn(shape).to(x0)
        generators.randn(shape)  # the masked image's posterior sample the pipeline draws (unused here)
        flow = isinstance(model.denoiser, FlowDenoiser)
        extra = [dict(known=Known(x0[k], noise[k], small[k], flow)) for k in range(len(requests))]
    rows = []
    for k, (image, conditions) in enumerate(zip(requests, conditions_of(model, requests))):
        schedule = schedule_of(model, image, job.batch)
        concat = extra[k].get("concat")
        if concat is not None:
            conditions = {name: (c.with_concat(concat) if c is not None and name != "guide_cond" else c)
                          for name, c in conditions.items()}
        rows.append(start(noise[k], schedule, image.sampler or job.batch.sampler, generators.generators[k],
                          image.eta, **conditions, guidance=guidance_of(model, image, schedule),
                          known=extra[k].get("known")))
    return rows


@torch.inference_mode()
def run(model: LoadedModel, job: InpaintBatch) -> torch.Tensor:
    """The whole batch in one go (tests, evaluation): uint8 [B, H, W, 3], before compositing."""
    from engines.sampling import sample
    from engines.tasks.txt2img import evaluator_of, finish

    return finish(model, sample(evaluator_of(model), start_rows(model, job)))


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, blur: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] images and a uint8 [H, W] mask: the input's pixels where the binarised
    mask (blurred by `blur` pixels) is 0, the generated ones where it is 1, mixed in between."""
    binary = Image.fromarray(np.where(mask >= 128, 255, 0).astype(np.uint8))
    if blur > 0:
        binary = binary.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(binary, dtype=np.float32)[..., None] / 255.0
    out = original.astype(np.float32) * (1 - a) + generated.astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def mask_to_tensor(masks) -> torch.Tensor:
    """uint8 [B, H, W] -> [B, 1, H, W] in [0, 1]."""
    return torch.as_tensor(np.asarray(masks)).float().unsqueeze(1) / 255.0
