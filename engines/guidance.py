"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a denoiser, per row.

As in EDM2's generate_images.py, guidance is one lerp between two denoised estimates. The
conditional rows of every image and the unconditional rows of the images that need guidance
go through the network in one call; an image whose scale is <= 1 sends its conditional row
alone (as diffusers pipelines skip CFG there), so the call has fewer rows.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from engines.conditioning import Conditioning
from engines.sampling.rows import append_dims


def guided(
    denoiser: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """denoise(x, sigma, t) -> x0 with per-row guidance scales, sigmas and timesteps ([B] each)."""
    need = guidance_scale > 1
    if not bool(need.any()):
        return lambda x, sigma, t=None: denoiser(x, sigma, cond, t)
    both = Conditioning.cat([uncond.select(need), cond])
    w = guidance_scale[need]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        mask = need.to(x.device)
        t = None if t is None else torch.cat([t[mask], t])
        out = denoiser(torch.cat([x[mask], x]), torch.cat([sigma[mask], sigma]), both, t)
        x0_uncond, x0 = out[: len(w)], out[len(w):].clone()
        x0[mask] = x0_uncond.lerp(x0[mask], append_dims(w.to(x), x.dim()))
        return x0

    return denoise
