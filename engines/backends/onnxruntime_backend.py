"""The onnxruntime backend: one InferenceSession per component graph.

CPU: the thread count is set explicitly (onnxruntime's default oversubscribes small hosts:
measured 4.1-5.2 s vs 3.6 s per SD-1.5 UNet call with 2 threads, ../shared/ENVIRONMENT.md).
GPU hosts: the CUDA (and TensorRT) execution providers of onnxruntime-gpu, from the `gpu` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.backends.base import EngineError
from engines.components import ComponentSpec

NUMPY = {"fp32": np.float32, "fp16": np.float16}


def supports(precision: str, device: str) -> bool:
    return precision == "fp32" or (precision == "fp16" and device.startswith("cuda"))


class OrtEngine:
    kind = "onnxruntime"

    def __init__(self, path: Path, spec: ComponentSpec, precision: str = "fp32", device: str = "cpu",
                 threads: int = 0):
        import onnxruntime as ort

        if not supports(precision, device):
            raise EngineError(f"onnxruntime runs fp32 on CPU (fp16 on CUDA), not {precision} on {device}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise EngineError(f"onnxruntime has no CUDA provider here ({available}); install the gpu extra")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.spec, self.precision = spec, precision
        self.float_type = NUMPY[precision]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {}
        for t in self.spec.inputs:
            x = inputs[t.name].detach().cpu()
            feeds[t.name] = x.numpy().astype(self.float_type if t.dtype == "float" else np.int64, copy=False)
        outputs = self.session.run(self.spec.output_names, feeds)
        return {name: torch.from_numpy(o).float() for name, o in zip(self.spec.output_names, outputs)}
