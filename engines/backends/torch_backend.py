"""The torch backend: diffusers / transformers modules loaded offline from safetensors.

fp32, bf16 or fp16 weights; on CUDA each component can be captured as CUDA graphs, one per
static shape bucket (batch padded up to the bucket), which removes the per-kernel launch
cost that dominates small-batch diffusion steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import torch

from engines.backends.base import DTYPES, EngineError
from engines.components import ComponentSpec, component_precision, component_spec, wrap
from engines.layout import ModelLayout
from engines.registry import ModelSpec


def load_pipeline(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    # diffusers pipelines are used only as loaders: they resolve each component's class from
    # model_index.json. Sampling never goes through them (their schedulers are stateful).
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    common = dict(use_safetensors=True, local_files_only=True, dtype=dtype)
    if spec.family == "ldm":
        return StableDiffusionPipeline.from_pretrained(
            spec.path, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **common,
        )
    return StableDiffusion3Pipeline.from_pretrained(
        spec.path, text_encoder_3=None, tokenizer_3=None, **common
    )


def check_precision(precision: str, device: str) -> None:
    if precision == "fp16" and not device.startswith("cuda"):
        raise EngineError("torch fp16 is for CUDA devices; on CPU use bf16 (AMX) or fp32")


class TorchEngine:
    """A component module behind the named-tensor interface."""

    kind = "torch"

    def __init__(self, module: torch.nn.Module, spec: ComponentSpec, precision: str = "fp32",
                 device: str = "cpu", channels_last: bool = False):
        check_precision(precision, device)
        self.spec, self.precision, self.device = spec, precision, torch.device(device)
        self.dtype = DTYPES[precision]
        # NHWC lets oneDNN / cuDNN run convolutions without reordering activations each call.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.to(self.device, self.dtype, memory_format=self.memory_format).eval()

    def prepare(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for t in self.spec.inputs:
            x = inputs[t.name].to(self.device, self.dtype if t.dtype == "float" else torch.int64)
            out.append(x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x)
        return out

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.module(*self.prepare(inputs))
        return {t.name: o.float() for t, o in zip(self.spec.outputs, outputs)}


class CudaGraphEngine:
    """A TorchEngine replayed from CUDA graphs captured per static shape bucket.

    The batch is padded up to the next bucket size, so a handful of graphs cover every batch;
    other dims must repeat exactly (each new shape captures a new graph once).
    """

    kind = "torch"

    def __init__(self, engine: TorchEngine, batch_buckets: tuple[int, ...]):
        self.engine, self.spec, self.precision = engine, engine.spec, engine.precision
        self.buckets = tuple(sorted(batch_buckets))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}
        self.pool = None

    def _capture(self, args: list[torch.Tensor]):
        static = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                self.engine.module(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's delivery thread (decoding on its own stream) may allocate
        # and synchronise while this thread captures; the default "global" mode would fail it.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), torch.inference_mode():
            outputs = self.engine.module(*static)
        self.pool = graph.pool()
        return graph, static, outputs

    def capture_all(self, upto: int | None = None, **inputs: torch.Tensor) -> int:
        """Capture each bucket's graph (up to `upto` rows) for these inputs' shapes now (a
        worker's warm-up), so no request pays a capture. Returns how many were captured."""
        before = len(self.graphs)
        for bucket in (b for b in self.buckets if upto is None or b <= upto):
            self(**{k: v[:1].expand(bucket, *v.shape[1:]).contiguous() for k, v in inputs.items()})
        return len(self.graphs) - before

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = self.engine.prepare(inputs)
        n = args[0].shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:  # beyond the largest bucket: run eagerly
            return self.engine(**inputs)
        padded = [torch.cat([a, a[-1:].expand(bucket - n, *a.shape[1:])]) if bucket > n else a for a in args]
        key = tuple((tuple(a.shape), a.dtype) for a in padded)
        if key not in self.graphs:
            self.graphs[key] = self._capture(padded)
        graph, static, outputs = self.graphs[key]
        for dst, src in zip(static, padded):
            dst.copy_(src)
        graph.replay()
        # A copy: the static output buffers are overwritten by the next replay.
        return {t.name: o[:n].to(torch.float32, copy=True) for t, o in zip(self.spec.outputs, outputs)}


def convolutional(name: str, family: str) -> bool:
    """Components whose time is mostly convolutions (where channels-last pays)."""
    return name.startswith("vae_") or (name == "denoiser" and family == "ldm")


def load_engines(spec: ModelSpec, layout: ModelLayout, names: tuple[str, ...], precision: str = "fp32",
                 device: str = "cpu", cuda_graph_buckets: tuple[int, ...] = (),
                 channels_last: bool = True) -> dict[str, TorchEngine]:
    """Torch engines for components `names` of the model."""
    check_precision(precision, device)
    pipe = load_pipeline(spec)  # fp32 weights, each component cast to its own precision
    engines = {}
    for name in names:
        engine = TorchEngine(wrap(name, spec.family, pipe), component_spec(name, spec.family, layout),
                             component_precision(name, precision), device,
                             channels_last and convolutional(name, spec.family))
        engines[name] = CudaGraphEngine(engine, cuda_graph_buckets) if cuda_graph_buckets else engine
    return engines


def load_modules(spec: ModelSpec, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """fp32 CPU modules of components `names`: what the exporters trace."""
    pipe = load_pipeline(spec)
    return {name: wrap(name, spec.family, pipe).eval() for name in names}
