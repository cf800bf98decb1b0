"""Load a registry model on an engine: find or build every component's artefact in the cache,
open it in its backend, and assemble the model the tasks run.

    model = load(spec)                                        # torch: the weights themselves
    model = load(spec, engine="onnxruntime", artefacts=ExportArtefacts(), cache=EngineCache(dir))
    model = export.artefacts.load(spec, engine="auto")        # the same, with export's builders

Building artefacts (ONNX export, TensorRT plans) is export/'s business: a caller that wants
them passes `artefacts` (export.artefacts.ExportArtefacts), so engines never import export.

Every cache lookup is reported to `on_event` as a plain CacheEvent (the worker counts them
in its metrics and logs build times).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from engines import selection
from engines.backends.base import EngineError
from engines.cache import CacheEvent, CacheResult, EngineCache, EngineKey, canonical, device_fingerprint, library_versions
from engines.components import (FAMILY_COMPONENTS, TXT2IMG_COMPONENTS, component_precision, component_spec,
                                example_inputs)
from engines.layout import ModelLayout
from engines.model import LoadedModel, assemble, load_tokenizers
from engines.registry import ModelSpec

log = logging.getLogger("latentserve.engines")


class Artefacts(Protocol):
    """Builds a component's artefact into the cache through `builder` (its key, get, module)."""

    def onnx(self, builder: "Builder", component: str, precision: str) -> Path: ...

    def tensorrt(self, builder: "Builder", component: str, precision: str) -> Path: ...


class Builder:
    """Finds or builds the artefacts of one model; loads torch modules only on a miss."""

    def __init__(self, spec: ModelSpec, layout: ModelLayout, cache: EngineCache, device: str,
                 on_event: Callable[[CacheEvent], None] | None = None, artefacts: Artefacts | None = None):
        self.spec, self.layout, self.cache, self.device = spec, layout, cache, device
        self.artefacts = artefacts
        self.on_event = on_event or (lambda _e: None)
        self._modules: dict[str, torch.nn.Module] = {}
        self._weights: dict[str, str] = {}  # subfolder -> hash, once per load

    def key(self, component: str, kind: str, precision: str, profile, versions: str, device: str) -> EngineKey:
        subfolder = component_spec(component, self.spec.family, self.layout).subfolder
        if subfolder not in self._weights:
            self._weights[subfolder] = self.cache.weights_hash(self.spec.path / subfolder)
        return EngineKey(
            model=self.spec.id, component=component, kind=kind, precision=precision,
            weights=self._weights[subfolder],
            profile=canonical(profile), versions=versions, device=device,
        )

    def get(self, key: EngineKey, build: Callable[[Path], dict]) -> CacheResult:
        result = self.cache.get_or_build(key, build)
        if not result.hit:
            log.info("built %s %s %s for %s in %.1fs", key.component, key.kind, key.precision,
                     key.model, result.build_s)
        self.on_event(CacheEvent(key.model, key.component, key.kind, key.precision, result.hit, result.build_s))
        return result

    def module(self, component: str) -> torch.nn.Module:
        if component not in self._modules:
            from engines.backends.torch_backend import load_modules

            # One pipeline load gives every component (they share the VAE): load them all once.
            self._modules.update(load_modules(self.spec, FAMILY_COMPONENTS[self.spec.family]))
        return self._modules[component]

    def onnx(self, component: str, precision: str = "fp32") -> Path:
        """The component's ONNX graph (dynamic batch and size), found or built by `artefacts`."""
        return self._artefacts(component, "ONNX graphs").onnx(self, component, precision)

    def tensorrt(self, component: str, precision: str) -> Path:
        """The component's TensorRT plan for this device, found or built by `artefacts`."""
        return self._artefacts(component, "TensorRT plans").tensorrt(self, component, precision)

    def _artefacts(self, component: str, what: str) -> "Artefacts":
        if self.artefacts is None:
            raise EngineError(f"{self.spec.id}/{component}: no builder of {what} was passed in; "
                              "load through export.artefacts.load (engines never import export)")
        return self.artefacts


def _engines(builder: Builder, engine: str, precision: str, device: str, names, threads: int,
             cuda_graphs: bool) -> dict:
    spec, layout = builder.spec, builder.layout
    if engine == "torch":
        from engines.backends.torch_backend import load_engines
        from engines.profiles import batch_buckets

        buckets = tuple(hi for _lo, hi in batch_buckets(2 * spec.max_batch)) if cuda_graphs and device.startswith("cuda") else ()
        return load_engines(spec, layout, tuple(names), precision, device, buckets)
    engines = {}
    for n in names:
        cspec, p = component_spec(n, spec.family, layout), component_precision(n, precision)
        if engine == "onnxruntime":
            from engines.backends.onnxruntime_backend import OrtEngine

            engines[n] = OrtEngine(builder.onnx(n, p), cspec, p, device, threads)
        elif engine == "tensorrt":
            from engines.backends.tensorrt_backend import TrtEngine

            engines[n] = TrtEngine(builder.tensorrt(n, p), cspec, p, device)
        else:
            raise EngineError(f"unknown engine {engine!r}")
    return engines


def measure_denoiser(model: LoadedModel, layout: ModelLayout, repeats: int = 5) -> float:
    """Median seconds of one guided denoiser call (cond + uncond rows) at the default size."""
    d = model.spec.defaults
    f = layout.vae_scale_factor
    cspec = component_spec("denoiser", model.spec.family, layout)
    inputs = example_inputs(cspec, layout, batch=2, latent_hw=(d.height // f, d.width // f))
    denoiser = model.components["denoiser"]
    times = []
    with torch.inference_mode():
        denoiser(**inputs)
        for _ in range(repeats):
            started = time.perf_counter()
            out = denoiser(**inputs)["out_sample"]
            if out.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def load(spec: ModelSpec, *, engine: str = "", precision: str = "", device: str = "cpu",
         cache: EngineCache | None = None, on_event: Callable[[CacheEvent], None] | None = None,
         threads: int = 0, cuda_graphs: bool = True, components: tuple[str, ...] | None = None,
         artefacts: Artefacts | None = None) -> LoadedModel:
    engine, precision = selection.requested(spec, engine, precision)
    layout = ModelLayout.read(spec)
    cache = cache or EngineCache()
    builder = Builder(spec, layout, cache, device, on_event, artefacts)
    # The VAE encoder only for models that serve an image-conditioned task.
    image_tasks = set(spec.tasks) - {"txt2img"}
    names = components or (FAMILY_COMPONENTS if image_tasks else TXT2IMG_COMPONENTS)[spec.family]
    tokenizers = load_tokenizers(spec)

    def build_model(kind: str) -> LoadedModel:
        why = selection.runnable(kind, precision, device)
        if why:
            raise EngineError(f"{spec.id}: cannot run {kind} {precision} here: {why}")
        engines = _engines(builder, kind, precision, device, names, threads, cuda_graphs)
        return assemble(spec, layout, tokenizers, engines, kind, precision, device)

    if engine != "auto":
        return build_model(engine)

    # auto: the measurement made when each candidate was first built on this host is cached
    # like any artefact; a candidate is loaded only to measure it, and only the fastest kept.
    seconds, kept = {}, None
    for kind in selection.candidates(precision, device):
        key = builder.key("denoiser", f"timing-{kind}", precision, {"defaults": [spec.defaults.width, spec.defaults.height]},
                          library_versions("torch", "onnxruntime", "tensorrt"), device_fingerprint(device))
        measured = []

        def measure(_tmp: Path, kind=kind, measured=measured) -> dict:
            measured.append(build_model(kind))
            return {"seconds": measure_denoiser(measured[0], layout)}

        seconds[kind] = builder.get(key, measure).info["seconds"]
        if measured and (kept is None or seconds[kind] < seconds[kept.engine]):
            kept = measured[0]
    best = selection.fastest(seconds)
    log.info("%s: auto picked %s (denoiser call, seconds: %s)", spec.id, best,
             {k: round(v, 4) for k, v in seconds.items()})
    return kept if kept is not None and kept.engine == best else build_model(best)


def load_with_guide(registry, spec: ModelSpec, **kwargs) -> LoadedModel:
    """`load`, plus the registry's guide model (autoguidance) loaded the same way."""
    model = load(spec, **kwargs)
    if spec.guide is not None:
        model.guide = load(registry.get(spec.guide), **kwargs)
    return model
