"""Export one component to ONNX and check the graph against torch.

The TorchScript-based exporter (`dynamo=False`) is used on purpose: it names dynamic axes
after ours and exports every component of both families with dynamic batch and spatial size
(a graph over 2 GB, like an SD-1.5 UNet, gets its weights as external files beside it, so each
graph has a directory of its own); the dynamo exporter has a known wrong
translation for the motion UNet (../shared/ENVIRONMENT.md). For TensorRT 11, which only
builds strongly typed networks, the reduced precision has to be in the graph itself, so an
fp16 / bf16 export is traced from the module in that precision.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from engines.backends.base import DTYPES
from engines.components import ComponentSpec, example_inputs

OPSET = 17


def export(module: torch.nn.Module, spec: ComponentSpec, layout, path: Path, precision: str = "fp32") -> dict:
    """Write `path` (an .onnx file, alone in its directory); returns what to record about it."""
    dtype = DTYPES[precision]
    example = example_inputs(spec, layout, batch=2)
    args = tuple(v.to(dtype) if v.is_floating_point() else v for v in example.values())
    module = module.to(dtype)
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
        )
    module.float()
    return {"file": path.name, "opset": OPSET, "precision": precision, "export_s": round(time.perf_counter() - started, 3),
            "bytes": sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())}


def check(module: torch.nn.Module, spec: ComponentSpec, layout, path: Path, threads: int = 0,
          cases: tuple[tuple[int, tuple[int, int]], ...] = ((1, (8, 8)), (3, (16, 16)))) -> dict:
    """Max abs difference between onnxruntime (CPU, fp32 graph) and torch fp32, at batch
    sizes and latent sizes other than the traced ones (so the dynamic axes are exercised)."""
    from engines.backends.onnxruntime_backend import OrtEngine

    engine = OrtEngine(path, spec, threads=threads)
    worst, scale = 0.0, 0.0
    spatial = any(isinstance(d, str) and "height" in d for t in spec.inputs for d in t.dims)
    for batch, hw in cases:
        inputs = example_inputs(spec, layout, batch=batch, latent_hw=hw if spatial else (8, 8), seed=batch)
        with torch.no_grad():
            ref = dict(zip(spec.output_names, module(*inputs.values())))
        got = engine(**inputs)
        for name in spec.output_names:
            worst = max(worst, (got[name] - ref[name].float()).abs().max().item())
            scale = max(scale, ref[name].abs().max().item())
    return {"max_abs_diff": worst, "ref_max_abs": scale, "cases": [list(c) for c in cases]}


def tolerance(ref_max_abs: float) -> float:
    """The bound a graph must meet: 1e-3 on outputs of order 1, relative beyond."""
    return 1e-3 * max(1.0, ref_max_abs)
