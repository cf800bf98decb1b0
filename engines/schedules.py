"""Noise schedules as pure functions: each returns the sigmas a sampler walks, last entry last.

Sigmas are in the k-diffusion convention (x = x0 + sigma * eps for VP models, where
sigma = sqrt((1 - alpha_bar) / alpha_bar); x = (1 - sigma) * x0 + sigma * noise for rectified
flow). The spacing rules follow the diffusers schedulers of the same names, read from the
model's own `scheduler_config.json`, so a checkpoint samples here as it does in diffusers.
"""

from __future__ import annotations

import numpy as np
import torch


def vp_alphas_cumprod(config: dict) -> torch.Tensor:
    """alpha_bar_t for t = 0..N-1 from a DDPM beta schedule (Ho et al. 2020; LDM's "scaled_linear")."""
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _spaced_timesteps(config: dict, steps: int, integer: bool) -> np.ndarray:
    """Training timesteps visited by `steps` sampling steps, highest first (diffusers' spacings)."""
    n = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float64)
        ts += config.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps)[::-1]
        ts = ts.round() if integer else ts
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    return ts.copy()


def ddim_sigmas(config: dict, steps: int) -> torch.Tensor:
    """The sigmas DDIM (eta = 0) visits, ending where diffusers' DDIMScheduler ends.

    Deterministic DDIM is Euler's method on the probability-flow ODE in x / sqrt(alpha_bar)
    (Song et al. 2021; Karras et al. 2022, sec. 3), so it needs only this schedule. Its last
    step lands on alpha_bar = 1 (sigma 0) or, with set_alpha_to_one=False as in SD 1.x, on
    alpha_bar_0 (a small positive sigma).
    """
    table = vp_sigmas(vp_alphas_cumprod(config))
    ts = torch.from_numpy(_spaced_timesteps(config, steps, integer=True)).long()
    last = 0.0 if config.get("set_alpha_to_one", True) else float(table[0])
    return torch.cat([table[ts], torch.tensor([last])])


def euler_sigmas(config: dict, steps: int) -> torch.Tensor:
    """The sigmas of diffusers' EulerDiscreteScheduler (interpolated in t), with a trailing zero."""
    table = vp_sigmas(vp_alphas_cumprod(config)).numpy()
    ts = _spaced_timesteps(config, steps, integer=False)
    sigmas = np.interp(ts, np.arange(len(table)), table).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def flow_sigmas(config: dict, steps: int) -> torch.Tensor:
    """Shifted rectified-flow times (SD3, Esser et al. 2024, eq. 23), as FlowMatchEulerDiscreteScheduler.

    t' = shift * t / (1 + (shift - 1) * t), on a linear grid from 1 to the scheduler's smallest
    training sigma; a trailing zero.
    """
    unsupported = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                   "use_beta_sigmas", "invert_sigmas", "stochastic_sampling", "shift_terminal")
    for key in unsupported:
        if config.get(key):
            raise ValueError(f"flow scheduler option {key} is not supported")
    n = config.get("num_train_timesteps", 1000)
    shift = config.get("shift", 1.0)

    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    sigma_min = shifted(1.0 / n)  # the smallest of the shifted training sigmas
    ts = np.linspace(1.0, sigma_min, steps)
    return torch.cat([torch.from_numpy(shifted(ts).astype(np.float32)), torch.zeros(1)])


SCHEDULES = {"ddim": ddim_sigmas, "euler": euler_sigmas, "flow_euler": flow_sigmas}
