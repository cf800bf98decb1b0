"""Shrink a training checkpoint to what exporting needs: the EMA weights in fp16, the step and
the run's extra fields (no optimizer state, no live weights, no RNG). How a run trained on a
lent GPU comes back within the transfer limits; export reads it like a full checkpoint.

    python -m training.slim runs/shapes-ldm-v/checkpoint.pt /tmp/out/shapes-ldm-v.pt
    python -m training.slim runs/shapes-video/checkpoint.pt /tmp/out/video.pt --keep motion_modules added

`--keep` stores only the tensors whose names hold one of the words (what trained: frozen
weights are the image model's, which the exporter builds the net from); the file says it is
partial, and training.checkpoint then loads it over the built net.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def slim(source: Path, target: Path, keep: tuple[str, ...] = ()) -> int:
    state = torch.load(source, weights_only=False, map_location="cpu")  # training.checkpoint's file
    ema = {k: (v.half() if v.is_floating_point() else v) for k, v in state["modules"]["ema"].items()
           if not keep or any(word in k for word in keep)}
    # Exporters read "ema"; the shared trainers' load_ema also restores "net": the same tensors
    # (torch.save stores a shared tensor once).
    modules = {"ema": ema, **({"net": ema} if "net" in state["modules"] else {})}
    target.parent.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in state["extra"].items() if isinstance(v, (int, float, str, bool))}  # no optimizer
    torch.save({"step": state["step"], "modules": modules, "extra": {**extra, "slim": True, "partial": bool(keep)}},
               target)
    return state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--keep", nargs="*", default=[], help="only tensors whose names hold one of these")
    args = parser.parse_args()
    step = slim(args.source, args.target, tuple(args.keep))
    print(f"{args.target}: step {step}, {args.target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
