"""Which engine and precision a worker uses for a model: pure rules, torch-free.

The registry names each model's engine and precision; LATENTSERVE_ENGINE and
LATENTSERVE_PRECISION override them for one worker. `auto` picks, among the engines this host
can run at that precision, the one whose denoiser call measured fastest when it was built.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

from engines.registry import ENGINES, PRECISIONS, ModelSpec


class SelectionError(ValueError):
    pass


# The 2026-11-26 H100 check (bench/reports/gpu-2026-11-26): torch engines on CUDA matched
# diffusers at >= 80 dB in fp32 but gave wrong images in bf16 (4-29 dB; bf16 on a CPU matches
# at 26-50 dB). Until bench/gpu/bf16_diagnose.py finds and clears the cause on a GPU host,
# half precision on CUDA is refused unless a benchmark that ignores the pixels opts in.
UNVERIFIED_CUDA_HALF = "LATENTSERVE_UNVERIFIED_CUDA_HALF"
CUDA_HALF_WHY = ("torch bf16/fp16 on CUDA gave wrong images in the last GPU check (bench/reports/gpu-2026-11-26); "
                 f"use fp32, or set {UNVERIFIED_CUDA_HALF}=1 where the pixels don't matter")


def requested(spec: ModelSpec, engine: str = "", precision: str = "") -> tuple[str, str]:
    """(engine, precision) for a model: the override where given, else the registry's."""
    engine, precision = engine or spec.engine, precision or spec.precision
    if engine not in (*ENGINES, "auto"):
        raise SelectionError(f"engine must be one of {[*ENGINES, 'auto']}, got {engine!r}")
    if precision not in PRECISIONS:
        raise SelectionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return engine, precision


def runnable(engine: str, precision: str, device: str) -> str | None:
    """None if this host can run `engine` at `precision`, else why not."""
    cuda = device.startswith("cuda")
    if engine == "torch":
        if precision == "fp16" and not cuda:
            return "torch fp16 needs CUDA"
        if cuda and precision in ("bf16", "fp16") and not os.environ.get(UNVERIFIED_CUDA_HALF):
            return CUDA_HALF_WHY
        return None
    if engine == "onnxruntime":
        if find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        return None if precision == "fp32" or (precision == "fp16" and cuda) else f"onnxruntime {precision} on {device}"
    if engine == "tensorrt":
        if not cuda:
            return "TensorRT needs a CUDA device"
        return None if find_spec("tensorrt") is not None else "tensorrt is not installed"
    return f"unknown engine {engine!r}"


def candidates(precision: str, device: str) -> list[str]:
    return [e for e in ENGINES if runnable(e, precision, device) is None]


def fastest(seconds: dict[str, float]) -> str:
    """The engine with the smallest measured denoiser time (ties: the earlier in ENGINES)."""
    if not seconds:
        raise SelectionError("no engine could be measured")
    return min(seconds, key=lambda e: (seconds[e], ENGINES.index(e)))
