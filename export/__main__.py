"""Export a model component by component to ONNX, check each against torch, write a manifest;
optionally build TensorRT plans from the graphs.

    python -m export shapes-mmdit --out exported/shapes-mmdit
    python -m export path/to/diffusers-model --out exported/m --components denoiser vae_decoder
    python -m export shapes-ldm --out exported/shapes-ldm --tensorrt --precision fp16   # GPU hosts

A registry id is looked up in LATENTSERVE_REGISTRY (default models/registry.json); a directory
is read as a diffusers model (StableDiffusionPipeline or StableDiffusion3Pipeline layout).
The worker does the same through the engine cache on first use; this command is for
inspecting, shipping or pre-building the artefacts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engines.cache import library_versions, weights_hash
from engines.components import FAMILY_COMPONENTS, component_spec
from engines.layout import ModelLayout
from engines.profiles import profiles
from engines.registry import Defaults, Limits, ModelSpec, load_registry
from export import onnx_export


def resolve(model: str) -> ModelSpec:
    path = Path(model)
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        family = "mmdit" if "StableDiffusion3" in index["_class_name"] else "ldm"
        sampler = "flow_euler" if family == "mmdit" else "ddim"
        return ModelSpec(id=path.resolve().name, path=path.resolve(), family=family, tasks=("txt2img",),
                         samplers=(sampler,), defaults=Defaults(sampler, 20, 4.0, 512, 512), limits=Limits())
    registry = os.environ.get("LATENTSERVE_REGISTRY", "models/registry.json")
    return load_registry(registry).get(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registry id or diffusers model directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--components", nargs="*", help="default: all of the model's components")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (needs tensorrt + CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads for the check")
    args = parser.parse_args(argv)

    from engines.backends.torch_backend import load_modules

    spec = resolve(args.model)
    layout = ModelLayout.read(spec)
    names = tuple(args.components or FAMILY_COMPONENTS[spec.family])
    modules = load_modules(spec, names)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"model": spec.id, "source": str(spec.path), "family": spec.family,
                "versions": json.loads(library_versions("torch", "onnx", "onnxruntime")), "components": {}}
    failed = False
    for name in names:
        cspec = component_spec(name, spec.family, layout)
        path = args.out / f"{name}.{args.precision}" / "model.onnx"  # a directory each: external weights
        path.parent.mkdir(exist_ok=True)
        info = onnx_export.export(modules[name], cspec, layout, path, args.precision)
        if args.precision == "fp32":
            info.update(onnx_export.check(modules[name], cspec, layout, path, args.threads))
            info["tolerance"] = onnx_export.tolerance(info["ref_max_abs"])
            info["ok"] = info["max_abs_diff"] <= info["tolerance"]
            failed |= not info["ok"]
        info["file"] = str(path.relative_to(args.out))
        info["weights"] = weights_hash(spec.path / cspec.subfolder)
        info["inputs"] = [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in cspec.inputs]
        info["outputs"] = [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in cspec.outputs]
        if args.tensorrt:
            from export import tensorrt_build

            plan_profiles = profiles(cspec, layout, spec.limits, spec.defaults, spec.max_batch)
            info["tensorrt"] = tensorrt_build.build(path, plan_profiles, path.parent / "model.plan",
                                                    args.out / "timing.cache")
        manifest["components"][name] = info
        print(f"{name}: {info['bytes'] / 1e6:.1f} MB, export {info['export_s']:.1f}s"
              + (f", max |onnx - torch| {info['max_abs_diff']:.2e} (bound {info['tolerance']:.1e})"
                 if "max_abs_diff" in info else ""))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {args.out / 'manifest.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
