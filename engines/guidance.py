"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a denoiser.

As in EDM2's generate_images.py, guidance is one lerp between two denoised estimates; the
unconditional and conditional rows go through the network in one call. Autoguidance and the
guidance interval (Karras et al. 2024; Kynkäänniemi et al. 2024) will be the same formula with
another guide or an `if` on sigma.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from engines.conditioning import Conditioning


def guided(
    denoiser: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """denoise(x, sigma) -> x0 with per-row guidance scales (shape [B]).

    Rows with a scale <= 1 get the conditional estimate alone, as diffusers pipelines do; if
    no row needs guidance the unconditional rows are not computed at all.
    """
    w = guidance_scale.clamp(min=1.0).view(-1, 1, 1, 1)
    if bool((guidance_scale <= 1).all()):
        return lambda x, sigma: denoiser(x, sigma, cond)
    both = Conditioning.cat([uncond, cond])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), sigma, both).chunk(2)
        return x0_uncond.lerp(x0_cond, w.to(x.dtype))

    return denoise
