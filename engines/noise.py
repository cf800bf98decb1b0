"""Per-image seeded noise (EDM2's StackedRandomGenerator idea).

Each image draws from its own generator, so its noise depends on its own seed only, never on
which other requests shared its batch.
"""

from __future__ import annotations

import torch


class StackedGenerator:
    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A [len(seeds), *shape] tensor, row i drawn from generator i (on the CPU, so the
        same seed gives the same noise on every device)."""
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])
