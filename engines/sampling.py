"""Samplers as pure functions over a denoiser `denoise(x, sigma) -> x0` (k-diffusion style).

A sampler never sees eps / v / flow parameterisations or discrete timesteps: the wrappers in
engines.denoisers translate. State lives in the arguments, never between calls, so one
sampler serves any number of concurrent batches.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class Denoise(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


OnStep = Callable[[int, torch.Tensor], None]  # (step index, x0 estimate) after each step


def sample_euler(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, on_step: OnStep | None = None
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn).

    With DDIM's sigmas this is deterministic DDIM; with rectified-flow times it is the
    flow-matching Euler sampler of SD3, since (x - x0) / sigma is then the velocity.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if on_step is not None:
            on_step(i, x0)
    return x


# sampler name -> the function that runs it; the schedule comes from engines.schedules.
SAMPLERS = {"ddim": sample_euler, "euler": sample_euler, "flow_euler": sample_euler}
