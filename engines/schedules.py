"""Noise schedules: the sigmas each sampler walks, as the diffusers scheduler of that name does.

Sigmas are in the k-diffusion convention (x = x0 + sigma * eps for VP models, where
sigma = sqrt((1 - alpha_bar) / alpha_bar); x = (1 - sigma) * x0 + sigma * noise for rectified
flow). A `Schedule` is plain data: what a row needs to walk from noise to its sample.

Why the diffusers schedulers compute them: `steps` must mean what diffusers'
`num_inference_steps` means for each scheduler, and every scheduler has its own rules
(DDIM's prev_timestep, DPM-Solver's linspace over n + 1 points, Euler's interpolation in t,
Heun's interleaving, SD3's shift), and users compare our images with diffusers' seed for
seed. A scheduler object is built once per (config, sampler, schedule, steps), asked for its
timesteps and sigmas, and never stepped: the sampling itself is engines.sampling's pure
functions over per-row state, which is what lets rows of one batch sit at different steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from engines.sampler_catalog import CATALOG, SCHEDULE_OPTIONS

ZERO_SNR_ALPHA = 2.0**-24


class ScheduleError(ValueError):
    """A sampler and schedule combination diffusers does not define."""


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # [steps + 1]: where each step starts, then where the last one ends
    # Where each step lands, when the scheduler lands somewhere else than the next step's start
    # (DDIM steps to t - num_train_timesteps // steps, which the next listed timestep need not be).
    targets: torch.Tensor
    noise_scale: float  # the first sample is noise * noise_scale (diffusers' init_noise_sigma, in our space)
    # The network's timestep at each of `sigmas[:-1]`, as the scheduler feeds it (DPM-Solver with
    # Karras sigmas rounds it, so it is not always a function of sigma); None: derived from sigma.
    timesteps: torch.Tensor | None = None

    def tail(self, start: int) -> "Schedule":
        """The schedule from step `start` on: where an image-to-image row begins (diffusers'
        `timesteps[t_start * order:]`; our Heun lists one entry per step, so no order factor)."""
        return Schedule(self.sigmas[start:], self.targets[start:], self.noise_scale,
                        None if self.timesteps is None else self.timesteps[start:])


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
    if config.get("rescale_betas_zero_snr"):
        from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

        alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
        # Zero terminal SNR (Lin et al. 2024) puts the top sigma at infinity; clamp it as
        # diffusers' Euler, DPM-Solver and UniPC schedulers do.
        alphas_cumprod[-1] = ZERO_SNR_ALPHA
        return alphas_cumprod
    return torch.cumprod(1.0 - betas, dim=0)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def scheduler_class(sampler: str):
    """The diffusers scheduler class `sampler` follows, and the options it implies."""
    import diffusers

    info = CATALOG[sampler]
    return getattr(diffusers, info.scheduler), dict(info.fixed)


def make_schedule(config: dict, sampler: str, steps: int, schedule: str = "default") -> Schedule:
    """The schedule of `sampler` with `steps` steps for a model whose scheduler config is `config`."""
    if schedule not in CATALOG[sampler].schedules:
        raise ScheduleError(f"sampler {sampler} has no {schedule!r} schedule (it has: "
                            f"{', '.join(CATALOG[sampler].schedules)})")
    return _cached(json.dumps(config, sort_keys=True, default=str), sampler, steps, schedule)


@lru_cache(maxsize=256)
def _cached(config_json: str, sampler: str, steps: int, schedule: str) -> Schedule:
    cls, fixed = scheduler_class(sampler)
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    scheduler = cls.from_config(config, **fixed, **SCHEDULE_OPTIONS[schedule])
    if schedule == "turbo":
        scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)])
    else:
        scheduler.set_timesteps(steps)
    if sampler == "ddim":
        return _ddim(scheduler, steps)
    sigmas = scheduler.sigmas.float().cpu()
    timesteps = torch.as_tensor(scheduler.timesteps).float().cpu()
    if sampler in ("heun", "flow_heun"):  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0] -> one per step
        sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
        timesteps = torch.cat([timesteps[:1], timesteps[1::2]])
    if sampler.startswith("flow_"):
        noise_scale = 1.0
    elif sampler.startswith("dpmpp") or sampler == "unipc":  # their sample space is VP: x_vp = noise
        noise_scale = float((sigmas[0] ** 2 + 1) ** 0.5)
    else:
        noise_scale = float(scheduler.init_noise_sigma)
    return Schedule(sigmas, sigmas[1:].clone(), noise_scale, None if sampler.startswith("flow_") else timesteps)


def _ddim(scheduler, steps: int) -> Schedule:
    alphas = scheduler.alphas_cumprod.float().clamp(min=ZERO_SNR_ALPHA)  # zero terminal SNR: as Euler clamps
    ts = scheduler.timesteps.long()
    prev = ts - scheduler.config.num_train_timesteps // steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    a_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    starts = vp_sigmas(alphas[ts])
    targets = vp_sigmas(a_prev)
    sigmas = torch.cat([starts, targets[-1:]])
    return Schedule(sigmas, targets, float((starts[0] ** 2 + 1) ** 0.5), ts.float())  # VP space: x_vp = noise
