"""Guidance as small functions around a denoiser, per row: each row carries its own mode,
scale, interval and conditioning (engines.sampling.rows.Row), so rows guided differently
share a call.

As in EDM2's generate_images.py, guidance is one lerp between two denoised estimates:
- cfg: the unconditional estimate towards the conditional one (Ho & Salimans 2022);
- autoguidance: a weaker guide model's conditional estimate towards the main model's
  (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself");
- apg: CFG's update with its component parallel to the conditional estimate removed,
  a negative-momentum running average and a norm threshold (Sadat et al. 2024, "Eliminating
  oversaturation and artifacts of high guidance scales", Alg. 1);
- none: the conditional estimate alone.
A guidance interval (Kynkaanniemi et al. 2024) is an `if` on sigma: outside (lo, hi] a row
sends only its conditional half, so the engine call has fewer rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from engines.conditioning import Conditioning
from engines.sampling.rows import Row, append_dims

MODES = ("cfg", "autoguidance", "apg", "none")
Net = Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor | None], torch.Tensor]  # (x, sigma, cond, t) -> x0


@dataclass(frozen=True)
class Guidance:
    mode: str = "cfg"
    scale: float = 1.0
    sigma_lo: float = 0.0  # guided for sigma in (sigma_lo, sigma_hi]
    sigma_hi: float = math.inf
    apg_momentum: float = -0.5  # APG's beta (the paper's negative momentum)
    apg_norm_threshold: float = 0.0  # APG's r; 0: no threshold
    apg_eta: float = 0.0  # weight of the parallel component APG keeps

    def active(self, sigma: float) -> bool:
        if self.mode == "none" or self.scale == 1 or (self.mode in ("cfg", "apg") and self.scale < 1):
            return False
        return self.sigma_lo < sigma <= self.sigma_hi


def interval_from_fraction(sigmas: torch.Tensor, start: float, end: float) -> tuple[float, float]:
    """(sigma_lo, sigma_hi) that guide the steps i with start <= i / N < end."""
    n = len(sigmas) - 1
    first, stop = math.ceil(start * n), math.ceil(end * n)
    if first >= stop:
        return 0.0, 0.0  # no step: never guided
    return float(sigmas[stop]) if stop <= n else 0.0, float(sigmas[first])


def apg_update(cond: torch.Tensor, uncond: torch.Tensor, scale: float, g: Guidance,
               average: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's APG estimate and its new running average (Sadat et al. 2024, Alg. 1)."""
    diff = cond - uncond
    average = diff if average is None else diff + g.apg_momentum * average
    diff = average
    if g.apg_norm_threshold > 0:
        diff = diff * torch.clamp(g.apg_norm_threshold / diff.norm().clamp(min=1e-12), max=1.0)
    unit = cond / cond.norm().clamp(min=1e-12)
    parallel = (diff * unit).sum() * unit
    return cond + (scale - 1) * (diff - parallel + g.apg_eta * parallel), average


def evaluator(net: Net, guide: Net | None = None, counter: list[int] | None = None):
    """evaluate(rows) -> (x0 [B], rows): one call of `net` over every row's conditional half
    and the unconditional half of the rows CFG/APG guide at their sigma, plus one call of the
    `guide` network over the rows autoguidance guides. APG's running average comes back in
    the rows. `counter[0]` accumulates the network rows computed (guidance's cost)."""

    def evaluate(rows: list[Row]) -> tuple[torch.Tensor, list[Row]]:
        from engines.sampling import call_inputs

        x = torch.stack([r.x for r in rows])
        sigma, t = call_inputs(rows, x.device)
        active = [r.guidance is not None and r.guidance.active(r.sigma) for r in rows]
        unc = [i for i, r in enumerate(rows) if active[i] and r.guidance.mode in ("cfg", "apg")]
        auto = [i for i, r in enumerate(rows) if active[i] and r.guidance.mode == "autoguidance"]
        cond = Conditioning.stack([r.cond for r in rows])
        if unc:
            both = Conditioning.cat([Conditioning.stack([rows[i].uncond for i in unc]), cond])
            out = net(torch.cat([x[unc], x]), torch.cat([sigma[unc], sigma]), both,
                      None if t is None else torch.cat([t[unc], t]))
            x0_uncond, x0 = out[: len(unc)], out[len(unc):].clone()
        else:
            x0_uncond, x0 = None, net(x, sigma, cond, t)
        rows = list(rows)
        for j, i in enumerate(unc):
            g = rows[i].guidance
            if g.mode == "cfg":
                x0[i] = x0_uncond[j].lerp(x0[i], g.scale)
            else:
                x0[i], average = apg_update(x0[i], x0_uncond[j], g.scale, g, rows[i].apg)
                rows[i] = replace(rows[i], apg=average)
        if auto:
            guide_cond = Conditioning.stack([rows[i].guide_cond for i in auto])
            x0_guide = guide(x[auto], sigma[auto], guide_cond, None if t is None else t[auto])
            w = torch.tensor([rows[i].guidance.scale for i in auto], dtype=x.dtype, device=x.device)
            x0[auto] = x0_guide.lerp(x0[auto], append_dims(w, x.dim()))
        if counter is not None:
            counter[0] += len(rows) + len(unc) + len(auto)
        return x0, rows

    return evaluate


def plain(denoise: Callable[..., torch.Tensor]):
    """An evaluator for an unconditioned denoise(x, sigma, t) (tests, analytic denoisers)."""

    def evaluate(rows: list[Row]) -> tuple[torch.Tensor, list[Row]]:
        from engines.sampling import call_inputs

        x = torch.stack([r.x for r in rows])
        return denoise(x, *call_inputs(rows, x.device)), rows

    return evaluate
