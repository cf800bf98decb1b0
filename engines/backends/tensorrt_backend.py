"""The TensorRT backend: a deserialised plan with one execution context per optimisation
profile, inputs and outputs bound by name to torch CUDA tensors (no extra CUDA library).

Written from the TensorRT Python API documentation (the name-based tensor API of 10.x, kept in
11.x); it has NOT yet run on a TensorRT host (README). Its profile selection is
engines.profiles.select_profile, tested on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.backends.base import split_batches
from engines.components import ComponentSpec
from engines.profiles import Profile, select_profile


def torch_dtype(trt, dtype):
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32}[dtype]


class TrtEngine:
    kind = "tensorrt"

    def __init__(self, plan: Path, spec: ComponentSpec, precision: str, device: str = "cuda"):
        import tensorrt as trt

        self.spec, self.precision, self.device = spec, precision, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialise TensorRT plan {plan}")
        self.dtypes = {t.name: torch_dtype(trt, self.engine.get_tensor_dtype(t.name))
                       for t in (*spec.inputs, *spec.outputs)}
        # The engine's own profile ranges decide which context serves a call.
        self.profiles = [
            Profile({t.name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(t.name, i))
                     for t in spec.inputs})
            for i in range(self.engine.num_optimization_profiles)
        ]
        self.max_rows = max(p.shapes[spec.inputs[0].name][2][0] for p in self.profiles)
        stream = torch.cuda.current_stream(self.device)
        self.contexts = []
        for i in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(i, stream.cuda_stream)
            self.contexts.append(context)
        stream.synchronize()

    def _run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        bound = {t.name: inputs[t.name].to(self.device, self.dtypes[t.name]).contiguous() for t in self.spec.inputs}
        context = self.contexts[select_profile(self.profiles, {k: tuple(v.shape) for k, v in bound.items()})]
        for name, x in bound.items():
            context.set_input_shape(name, tuple(x.shape))
            context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            out = torch.empty(tuple(context.get_tensor_shape(t.name)), dtype=self.dtypes[t.name], device=self.device)
            context.set_tensor_address(t.name, out.data_ptr())
            outputs[t.name] = out
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
        return {name: out.float() for name, out in outputs.items()}  # same stream: ordered after

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return split_batches(self._run, inputs, self.max_rows)
