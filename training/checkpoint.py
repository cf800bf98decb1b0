"""Resumable training state: model(s), optimizer, step and RNG, saved atomically.

Training runs span sessions: a trainer saves every few minutes and on exit, and picks up
where it stopped when started again with the same output directory.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def save(path: Path, step: int, modules: dict, optimizer, extra: dict | None = None) -> None:
    state = {
        "step": step,
        "modules": {name: m.state_dict() for name, m in modules.items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)  # our own file, read back only by load() below
    os.replace(tmp, path)


def load(path: Path, modules: dict, optimizer=None) -> tuple[int, dict]:
    """Restore into modules (and the optimizer, if given); returns (step, extra). (0, {}) if
    there is no checkpoint."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, weights_only=False, map_location="cpu")  # also a checkpoint saved on a GPU
    partial = state["extra"].get("partial", False)  # training.slim --keep: over the built net's own weights
    for name, module in modules.items():
        unexpected = module.load_state_dict(state["modules"][name], strict=not partial).unexpected_keys
        if unexpected:
            raise KeyError(f"{path}: {name} has no {unexpected[:3]}")
    if optimizer is None or "optimizer" not in state:  # a slim checkpoint (training.slim): fresh optimizer
        return state["step"], state["extra"]
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["extra"]
