"""Parameterisations -> one convention: `denoiser(x, sigma, cond) -> x0`.

Like k-diffusion's `external.py`: a network predicting eps, v or a flow velocity at a
discrete or continuous time is wrapped so samplers only ever see sigmas and clean estimates.
`sigma` is a [B] tensor: each row at its own noise level. Each wrapper also says how sampler
space relates to the model's latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from engines.sampling.rows import append_dims
from engines.schedules import vp_alphas_cumprod, vp_sigmas

# (model input, model timestep, conditioning) -> raw network output
Net = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class DiscreteVPDenoiser:
    """An eps- or v-predicting network trained on discrete DDPM timesteps (LDM, SD 1.x/2.x).

    Sampler space is x = x_vp / sqrt(alpha_bar) = x0 + sigma * eps.
    """

    net: Net
    sigmas: torch.Tensor  # sigma for each training timestep, ascending
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler_config(cls, net: Net, config: dict) -> "DiscreteVPDenoiser":
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction!r}")
        return cls(net, vp_sigmas(vp_alphas_cumprod(config)), prediction)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log sigma (k-diffusion's sigma_to_t)."""
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma.reshape(-1) - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).reshape(sigma.shape)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        if t is None:
            t = self.sigma_to_t(sigma.to(self.sigmas.device)).to(x.device)
        t = t.expand(x.shape[0])
        sigma = append_dims(sigma, x.dim())
        c_in = (sigma**2 + 1) ** -0.5
        out = self.net(x * c_in, t, cond)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1) - out * sigma * c_in  # v-prediction (Salimans & Ho 2022)

    def x_to_latents(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * append_dims((sigma**2 + 1) ** -0.5, x.dim())

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Clean latents noised to `sigma`, in sampler space (the VP schedulers' add_noise)."""
        return x0 + sigma * noise


@dataclass
class FlowDenoiser:
    """A rectified-flow velocity network, x_t = (1 - t) x0 + t noise (SD3, Esser et al. 2024)."""

    net: Net
    num_train_timesteps: int = 1000

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        t = (sigma * self.num_train_timesteps).expand(x.shape[0])  # what the flow schedulers feed
        velocity = self.net(x, t, cond)
        return x - append_dims(sigma, x.dim()) * velocity

    def x_to_latents(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Clean latents noised to `sigma` (the flow schedulers' scale_noise)."""
        return (1 - sigma) * x0 + sigma * noise
