"""Per-row sampler state: everything one image needs to take its next step, alone or in any
batch, at any step. Plain data; step functions return new rows and never mutate them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from engines.schedules import Schedule

if TYPE_CHECKING:
    from engines.conditioning import Conditioning
    from engines.guidance import Guidance


@dataclass(frozen=True)
class Known:
    """A training-free inpainting row's known region (diffusers' inpaint pipelines with a
    plain denoiser): after every step, where `mask` is 0 the sample is replaced by the input's
    latents noised to the row's new sigma with the row's initial noise; after the last step,
    by the clean latents."""

    x0: torch.Tensor  # [C, h, w] the input image's latents (its posterior sample)
    noise: torch.Tensor  # [C, h, w] the row's initial noise
    mask: torch.Tensor  # [1, h, w] 1 = generate, 0 = keep
    flow: bool = False  # rectified flow: x = (1 - s) x0 + s noise; else VP: x = x0 + s noise

    def at(self, sigma: float, last: bool) -> torch.Tensor:
        """The known latents where a row at `sigma` keeps them, in sampler space."""
        if self.flow:
            return self.x0 if last else (1 - sigma) * self.x0 + sigma * self.noise
        # VP: sampler space is x_vp / sqrt(alpha_bar); the pipelines blend clean latents into
        # the VP sample after the last step, which sits at the schedule's final sigma.
        return self.x0 * (1 + sigma**2) ** 0.5 if last else self.x0 + sigma * self.noise

    def blend(self, row: "Row") -> "Row":
        keep = self.at(row.sigma, row.done)
        return replace(row, x=(1 - self.mask) * keep + self.mask * row.x)


@dataclass(frozen=True)
class Row:
    x: torch.Tensor  # [C, H, W]: the sample the next denoiser call evaluates
    sigma: float  # the sigma x sits at for that call
    t: float | None  # the network timestep for that call (None: the denoiser derives it from sigma)
    schedule: Schedule
    sampler: str  # canonical sampler name
    step: int = 0  # steps completed (progress counts these; Heun's corrector is inside a step)
    memory: Any = None  # the sampler's own per-row memory (Heun's start point, DPM++'s last x0)
    generator: torch.Generator | None = None  # stochastic samplers draw this row's noise from it
    eta: float = 0.0  # DDIM's eta (0: deterministic)
    calls: int = 0  # denoiser calls so far
    # What the denoiser is conditioned on, and how it is guided (engines.guidance): one row's
    # embeddings each, so any set of rows can be assembled into a call.
    cond: "Conditioning | None" = None
    uncond: "Conditioning | None" = None
    guide_cond: "Conditioning | None" = None  # the guide model's own encoding (autoguidance)
    guidance: "Guidance | None" = None
    apg: torch.Tensor | None = None  # APG's running average of the guidance update
    known: Known | None = None  # training-free inpainting: the region kept from the input
    # The denoiser's x0 estimate of the call that produced this row (None before the first):
    # what live previews show. Kept, never read by a step, so it cannot change the numerics.
    denoised: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.schedule.sigmas) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def t_at(self, index: int) -> float | None:
        """The network timestep at schedule position `index` (None past the end or if derived)."""
        ts = self.schedule.timesteps
        return None if ts is None or index >= len(ts) else float(ts[index])


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in all, to broadcast over samples (k-diffusion)."""
    return v.reshape(v.shape + (1,) * (ndim - v.dim()))


def start(noise: torch.Tensor, schedule: Schedule, sampler: str, generator: torch.Generator | None = None,
          eta: float = 0.0, **conditioning: Any) -> Row:
    """A row at step 0: its noise scaled to the schedule's first sigma, as diffusers starts.
    `conditioning`: cond, uncond, guide_cond, guidance (Row fields)."""
    return start_at(noise * schedule.noise_scale, schedule, sampler, generator, eta, **conditioning)


def start_at(x: torch.Tensor, schedule: Schedule, sampler: str, generator: torch.Generator | None = None,
             eta: float = 0.0, **conditioning: Any) -> Row:
    """A row at step 0 of `schedule` whose sample is `x` already (image-to-image: the input's
    latents noised to the schedule's first sigma)."""
    t = None if schedule.timesteps is None else float(schedule.timesteps[0])
    return Row(x, float(schedule.sigmas[0]), t, schedule, sampler, generator=generator, eta=eta, **conditioning)


@dataclass(frozen=True)
class Group:
    """Rows of one sampler stacked for a vectorised step: per-row values as [B] tensors."""

    rows: Sequence[Row]
    x: torch.Tensor  # [B, C, H, W]
    sigma: torch.Tensor  # [B] where x is
    target: torch.Tensor  # [B] where this step lands
    sigma_next: torch.Tensor  # [B] where the next step starts (== target except DDIM's quirk)
    last: torch.Tensor  # [B] bool: this is the row's final step

    @classmethod
    def of(cls, rows: Sequence[Row]) -> "Group":
        x = torch.stack([r.x for r in rows])
        return cls(
            rows, x,
            torch.tensor([r.sigma for r in rows], dtype=torch.float32, device=x.device),
            torch.stack([r.schedule.targets[r.step] for r in rows]).to(x.device),
            torch.stack([r.schedule.sigmas[r.step + 1] for r in rows]).to(x.device),
            torch.tensor([r.step + 1 >= r.steps for r in rows], device=x.device),
        )

    def d(self, v: torch.Tensor) -> torch.Tensor:
        return append_dims(v, self.x.dim())

    def noise(self) -> torch.Tensor:
        """One draw of standard noise per row, each from its own generator (on the CPU, as
        diffusers' randn_tensor draws with a list of generators)."""
        shape = self.x.shape[1:]
        return torch.stack([torch.randn(shape, generator=r.generator, dtype=torch.float32) for r in self.rows]).to(self.x)

    def advance(self, x: torch.Tensor, x0: torch.Tensor, memory: Sequence[Any] | None = None) -> list[Row]:
        """Every row one step on, at `x` (which sits at its target); `x0`: this call's estimates."""
        out = []
        for i, r in enumerate(self.rows):
            xi = x[i]
            target, nxt = float(self.target[i]), float(self.sigma_next[i])
            if target != nxt:  # DDIM: the next step reads the same VP sample at its own sigma
                xi = xi * ((nxt**2 + 1) / (target**2 + 1)) ** 0.5
            out.append(replace(r, x=xi, sigma=nxt, t=r.t_at(r.step + 1), step=r.step + 1, calls=r.calls + 1,
                               memory=None if memory is None else memory[i], denoised=x0[i]))
        return out
