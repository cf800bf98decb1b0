"""The artefacts engines.loader asks for, built here: each component's ONNX graph (exported
and checked against torch on a cache miss) and TensorRT plans from it.

    from export.artefacts import load
    model = load(spec, engine="onnxruntime")          # engines.loader.load with these builders
"""

from __future__ import annotations

import json
from pathlib import Path

from engines import loader
from engines.backends.base import EngineError
from engines.cache import EngineCache, device_fingerprint, library_versions
from engines.components import component_spec
from engines.layout import ModelLayout
from engines.model import LoadedModel
from engines.profiles import profiles
from engines.registry import ModelSpec


class ExportArtefacts:
    """engines.loader.Artefacts: ONNX graphs and TensorRT plans through the engine cache."""

    def onnx(self, builder: loader.Builder, component: str, precision: str = "fp32") -> Path:
        from export import onnx_export

        spec, layout = builder.spec, builder.layout
        cspec = component_spec(component, spec.family, layout)
        signature = {"inputs": [[t.name, t.dtype, list(t.dims)] for t in cspec.inputs],
                     "outputs": [[t.name, t.dtype, list(t.dims)] for t in cspec.outputs],
                     "opset": onnx_export.OPSET}
        key = builder.key(component, "onnx", precision, signature, library_versions("torch", "onnx"), "any")

        def build(tmp: Path) -> dict:
            module = builder.module(component)
            info = onnx_export.export(module, cspec, layout, tmp / "model.onnx", precision)
            if precision == "fp32":  # reduced-precision graphs are checked end to end instead
                info.update(onnx_export.check(module, cspec, layout, tmp / "model.onnx"))
                bound = onnx_export.tolerance(info["ref_max_abs"])
                if info["max_abs_diff"] > bound:
                    raise EngineError(f"{spec.id}/{component}: ONNX differs from torch by "
                                      f"{info['max_abs_diff']:.2e} (bound {bound:.1e})")
            return info

        return builder.get(key, build).path / "model.onnx"

    def tensorrt(self, builder: loader.Builder, component: str, precision: str) -> Path:
        from export import tensorrt_build

        spec, layout = builder.spec, builder.layout
        onnx_path = self.onnx(builder, component, precision)
        cspec = component_spec(component, spec.family, layout)
        plan_profiles = profiles(cspec, layout, spec.limits, spec.defaults, spec.max_batch)
        versions = library_versions("tensorrt", "torch", "onnx")
        device = device_fingerprint(builder.device)
        key = builder.key(component, "tensorrt", precision, [p.as_json() for p in plan_profiles], versions, device)
        timing = builder.cache.root / "timing-caches" / f"{device}-{json.loads(versions)['tensorrt']}.cache"
        timing.parent.mkdir(parents=True, exist_ok=True)
        return builder.get(key, lambda tmp: tensorrt_build.build(onnx_path, plan_profiles, tmp / "model.plan", timing)
                           ).path / "model.plan"


ARTEFACTS = ExportArtefacts()


def builder(spec: ModelSpec, cache: EngineCache, device: str = "cpu", on_event=None) -> loader.Builder:
    """A loader.Builder for `spec` that builds with export's builders."""
    return loader.Builder(spec, ModelLayout.read(spec), cache, device, on_event, ARTEFACTS)


def load(spec: ModelSpec, **kwargs) -> LoadedModel:
    """engines.loader.load with export's builders: any engine, `auto` included."""
    return loader.load(spec, artefacts=ARTEFACTS, **kwargs)


def load_with_guide(registry, spec: ModelSpec, **kwargs) -> LoadedModel:
    return loader.load_with_guide(registry, spec, artefacts=ARTEFACTS, **kwargs)
