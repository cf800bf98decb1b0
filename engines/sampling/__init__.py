"""Samplers as pure step functions over per-row state (k-diffusion's convention).

A denoiser is `denoise(x, sigma) -> x0` with `sigma` a [B] tensor, one per row, so rows at
different steps share one call. A row (rows.Row) carries its sample, schedule, position,
sampler memory, generator, conditioning and guidance; an `Evaluate` (engines.guidance) turns
rows into x0; `step_rows` moves rows one denoiser call on; `sample` is the plain loop that
runs whole schedules. Nothing keeps state between calls.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from engines.sampling.rows import Row, append_dims, start
from engines.sampling.samplers import SAMPLERS, STEPS, canonical, family_samplers, step_rows

__all__ = ["Row", "append_dims", "start", "SAMPLERS", "STEPS", "canonical", "family_samplers", "step_rows",
           "Denoise", "Evaluate", "call_inputs", "sample"]


class Denoise(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """x0 for x at per-row sigma [B]; t [B], when given, is the network timestep the
        scheduler would feed (otherwise derived from sigma)."""


OnCall = Callable[[list[Row], torch.Tensor], None]  # (rows after the call, x0 of the call)
# rows -> (x0 of each, the rows with any guidance memory updated): engines.guidance.evaluator
Evaluate = Callable[[list[Row]], tuple[torch.Tensor, list[Row]]]


def call_inputs(rows: list[Row], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-row sigma [B] and network timestep [B] (None unless every row has one) of a call."""
    sigma = torch.tensor([r.sigma for r in rows], dtype=torch.float32, device=device)
    if any(r.t is None for r in rows):
        return sigma, None
    return sigma, torch.tensor([r.t for r in rows], dtype=torch.float32, device=device)


def sample(evaluate: Evaluate, rows: list[Row], on_call: OnCall | None = None) -> list[Row]:
    """Run every row to the end of its schedule: one evaluation per iteration over every
    unfinished row, each at its own sigma, then each row's sampler step."""
    while live := [i for i, r in enumerate(rows) if not r.done]:
        x0, evaluated = evaluate([rows[i] for i in live])
        for i, row in zip(live, step_rows(evaluated, x0)):
            rows[i] = row
        if on_call is not None:
            on_call(rows, x0)
    return rows
