"""The one interface every backend implements: a component engine.

    engine(**named_tensors) -> {output_name: tensor}

Inputs are torch tensors of any batch size (the engine splits or pads when it must); float
outputs come back as float32 on the caller's device whatever precision ran inside, so
samplers and guidance always do their arithmetic in fp32.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engines.components import ComponentSpec
from engines.registry import ENGINES, PRECISIONS  # noqa: F401  (re-exported for the backends)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    kind: str  # one of ENGINES
    precision: str  # one of PRECISIONS
    spec: ComponentSpec

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


class EngineError(RuntimeError):
    """An engine cannot be built or run on this host (missing library, unsupported precision)."""


def split_batches(run, inputs: dict[str, torch.Tensor], max_batch: int) -> dict[str, torch.Tensor]:
    """Run `run(**chunk)` over batch chunks of at most max_batch and concatenate the outputs."""
    n = next(iter(inputs.values())).shape[0]
    if n <= max_batch:
        return run(**inputs)
    parts = [run(**{k: v[i:i + max_batch] for k, v in inputs.items()}) for i in range(0, n, max_batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
