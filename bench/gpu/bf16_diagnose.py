"""Which part of the torch engine path breaks bf16 images on CUDA (the 2026-11-26 H100 check:
fp32 through our engines matched diffusers at >= 80 dB, bf16 gave 4-29 dB, while bf16 on a
CPU matches at 26-50 dB). One image of shapes-ldm and shapes-mmdit per variant, as PSNR
against our own fp32 image on the same device; under a minute on a GPU.

    python -m bench.gpu.bf16_diagnose --device cuda        # on a GPU host
    python -m bench.gpu.bf16_diagnose --device cpu         # the same table on a CPU

Variants: bf16 as served (CUDA graphs, channels-last convolutions); without CUDA graphs;
without channels-last; without both; bf16 with the denoiser in fp32; with the VAE in fp32.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from engines import loader
from engines.backends import torch_backend
from engines.components import component_precision
from engines.registry import load_registry
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run
from service.config import ROOT

PROMPT = "a large red circle on the left on a white background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def image(spec, device: str, precision: str, graphs: bool) -> np.ndarray:
    model = loader.load(spec, engine="torch", precision=precision, device=device, cuda_graphs=graphs)
    d = spec.defaults
    images = [ImageRequest(PROMPT, "", 1234, d.guidance_scale, d.sampler, d.steps)]
    return run(model, Txt2ImgBatch(64, 64, d.sampler, d.steps, images)).numpy()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    registry = load_registry(ROOT / "models" / "registry.json")
    convolutional, precision_of = torch_backend.convolutional, component_precision
    table = {}
    for model_id in ("shapes-ldm", "shapes-mmdit"):
        spec = registry.get(model_id)
        ref = image(spec, args.device, "fp32", True)
        rows = {"bf16 as served": lambda: image(spec, args.device, "bf16", True),
                "no cuda graphs": lambda: image(spec, args.device, "bf16", False)}
        # The switches below replace module functions for one variant each: a diagnosis, not
        # a configuration the service offers.
        def no_channels_last(graphs: bool):
            torch_backend.convolutional = lambda *_: False
            try:
                return image(spec, args.device, "bf16", graphs)
            finally:
                torch_backend.convolutional = convolutional

        def fp32_component(prefix: str):
            import engines.components as components
            components.component_precision = lambda name, p: "fp32" if name.startswith(("text_encoder", prefix)) else p
            torch_backend.component_precision = components.component_precision
            try:
                return image(spec, args.device, "bf16", True)
            finally:
                components.component_precision = torch_backend.component_precision = precision_of

        rows["no channels-last"] = lambda: no_channels_last(True)
        rows["neither"] = lambda: no_channels_last(False)
        rows["denoiser fp32"] = lambda: fp32_component("denoiser")
        rows["vae fp32"] = lambda: fp32_component("vae")
        table[model_id] = {}
        for name, make in rows.items():
            try:
                table[model_id][name] = round(psnr(make(), ref), 1)
            except Exception as e:  # report and go on: each row is independent
                table[model_id][name] = f"error: {type(e).__name__}: {e}"[:200]
            print(model_id, name, table[model_id][name], flush=True)
    print(json.dumps({"device": args.device, "psnr_vs_own_fp32_db": table}, indent=2))


if __name__ == "__main__":
    main()
