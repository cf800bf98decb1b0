"""Parameterisations -> one convention: `denoiser(x, sigma, cond) -> x0`.

Like k-diffusion's `external.py`: a network predicting eps, v or a flow velocity at a
discrete or continuous time is wrapped so samplers only ever see sigmas and clean estimates.
Each wrapper also says how sampler space relates to the model's latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

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

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        c_in = (sigma**2 + 1) ** -0.5
        t = self.sigma_to_t(sigma).expand(x.shape[0])
        out = self.net(x * c_in, t, cond)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1) - out * sigma * c_in  # v-prediction (Salimans & Ho 2022)

    def noise_to_x(self, noise: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
        return noise * (sigma_max**2 + 1) ** 0.5

    def x_to_latents(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * (sigma**2 + 1) ** -0.5


@dataclass
class FlowDenoiser:
    """A rectified-flow velocity network, x_t = (1 - t) x0 + t noise (SD3, Esser et al. 2024)."""

    net: Net
    num_train_timesteps: int = 1000

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        t = (sigma * self.num_train_timesteps).expand(x.shape[0])
        velocity = self.net(x, t, cond)
        return x - sigma * velocity

    def noise_to_x(self, noise: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
        return noise

    def x_to_latents(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x
