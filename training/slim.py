"""Shrink a training checkpoint to what exporting needs: the EMA weights in fp16, the step and
the run's extra fields (no optimizer state, no live weights, no RNG). How a run trained on a
lent GPU comes back within the transfer limits; export reads it like a full checkpoint.

    python -m training.slim runs/shapes-ldm-v/checkpoint.pt /tmp/out/shapes-ldm-v.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def slim(source: Path, target: Path) -> int:
    state = torch.load(source, weights_only=False, map_location="cpu")  # training.checkpoint's file
    ema = {k: (v.half() if v.is_floating_point() else v) for k, v in state["modules"]["ema"].items()}
    # Exporters read "ema"; the shared trainers' load_ema also restores "net": the same tensors
    # (torch.save stores a shared tensor once).
    modules = {"ema": ema, **({"net": ema} if "net" in state["modules"] else {})}
    target.parent.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in state["extra"].items() if isinstance(v, (int, float, str, bool))}  # no optimizer
    torch.save({"step": state["step"], "modules": modules, "extra": {**extra, "slim": True}}, target)
    return state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    step = slim(args.source, args.target)
    print(f"{args.target}: step {step}, {args.target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
