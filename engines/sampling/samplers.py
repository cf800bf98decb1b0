"""Sampler name -> step function (engines.sampling.steps); the names, aliases and schedules
are engines.sampler_catalog's (torch-free, for the API)."""

from __future__ import annotations

from typing import Callable

import torch

from engines.sampler_catalog import CATALOG, SamplerInfo, canonical, family_samplers
from engines.sampling import steps
from engines.sampling.rows import Group, Row

StepFn = Callable[[Group, torch.Tensor], list[Row]]

STEPS: dict[str, StepFn] = {
    "ddim": steps.ddim,
    "euler": steps.euler,
    "euler_ancestral": steps.euler_ancestral,
    "heun": steps.heun,
    "dpmpp_2m": steps.dpmpp_2m,
    "dpmpp_2m_sde": steps.dpmpp_2m_sde,
    "unipc": steps.unipc,
    "flow_euler": steps.euler,
    "flow_heun": steps.heun,
    "flow_lcm": steps.flow_lcm,
}
assert set(STEPS) == set(CATALOG), "every catalogued sampler has a step function"
SAMPLERS: dict[str, SamplerInfo] = CATALOG
__all__ = ["STEPS", "SAMPLERS", "canonical", "family_samplers", "step_rows"]


def step_rows(rows: list[Row], x0: torch.Tensor) -> list[Row]:
    """Every row one denoiser call on (x0[i] is row i's estimate): rows are grouped by
    sampler, each group stepped in one vectorised call, and returned in their order."""
    out: list[Row | None] = [None] * len(rows)
    by_sampler: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_sampler.setdefault(row.sampler, []).append(i)
    for name, index in by_sampler.items():
        stepped = STEPS[name](Group.of([rows[i] for i in index]), x0[index])
        for i, row in zip(index, stepped):
            out[i] = row if row.known is None else row.known.blend(row)
    return out
