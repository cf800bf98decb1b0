"""Turbo vs teacher: images/s of a few-step distilled model and its teacher at their defaults,
side by side in one run (a report, not a test).

    python -m bench.turbo --out bench/reports/turbo-<date>           # shipped models + SD3-medium-sized
    python -m bench.turbo --out /tmp/turbo --quick                    # tiny stand-in, for a smoke run

- Shipped models (`--teacher`, `--turbo`, registry ids): batch 1 and 8, median of `--repeats`
  runs, with the time split into text encoding, denoising and decoding (where fixed costs
  weigh on a small model).
- The SD3-medium-sized stand-in (random weights, bench.engines' config, 512x512, torch bf16):
  one image, the teacher's schedule (20 flow-Euler steps, CFG 7) against the turbo one (4
  steps, turbo schedule, unguided), on the same network: the compute ratio a distilled model
  buys where the network dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.archs import arch_dir, build_arch, model_spec
from bench.engines_report import cpu_info
from engines import loader
from engines.registry import load_registry
from engines.selection import UNVERIFIED_CUDA_HALF
from engines.tasks import txt2img
from service.config import ROOT

PROMPT = "a large red circle on the left on a white background"


def timed_run(model, how: dict, batch: int) -> dict:
    """One generation with its phases timed (text encoding, denoising, decoding)."""
    stamps = {}
    encode, decode = model.encode_prompts, model.decode_latents

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # device work is asynchronous: a phase ends when its kernels do
            stamps[name] = stamps.get(name, 0.0) + time.perf_counter() - started
            return out
        return wrapper

    model.encode_prompts, model.decode_latents = timed("encode_s", encode), timed("decode_s", decode)
    try:
        images = [txt2img.ImageRequest(PROMPT, "", k, how["guidance_scale"], how["sampler"], how["steps"],
                                       how["schedule"], guidance=how["guidance"]) for k in range(batch)]
        started = time.perf_counter()
        txt2img.run(model, txt2img.Txt2ImgBatch(how["width"], how["height"], how["sampler"], how["steps"], images))
        total = time.perf_counter() - started
    finally:
        model.encode_prompts, model.decode_latents = encode, decode
    return {"total_s": total, **stamps, "denoise_s": total - sum(stamps.values())}


def measure(model, how: dict, batch: int, repeats: int) -> dict:
    timed_run(model, how, batch)  # warm-up
    runs = [timed_run(model, how, batch) for _ in range(repeats)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {**{k: round(v, 4) for k, v in median.items()}, "images_per_s": round(batch / median["total_s"], 3),
            "batch": batch, "repeats": repeats, "min_total_s": round(min(r["total_s"] for r in runs), 4),
            "max_total_s": round(max(r["total_s"] for r in runs), 4)}


TURBO = {"sampler": "flow_euler", "steps": 4, "schedule": "turbo", "guidance": "none", "guidance_scale": 1.0}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def defaults_of(spec) -> dict:
    d = spec.defaults
    return {"sampler": d.sampler, "steps": d.steps, "schedule": d.schedule, "guidance": d.guidance,
            "guidance_scale": d.guidance_scale, "width": d.width, "height": d.height}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--teacher", default="shapes-mmdit")
    parser.add_argument("--turbo", default="shapes-mmdit-turbo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny stand-in instead of SD3-medium-sized")
    parser.add_argument("--work", type=Path, default=Path("/tmp/latentserve-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="", help="the shipped models' (default: the registry's choice)")
    parser.add_argument("--stand-in-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--build-only", action="store_true", help="only write the stand-in's random weights")
    args = parser.parse_args()
    report = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "device": device_name(args.device),
              "shipped": {}, "stand_in": {}}
    if not args.build_only:
        shipped(args, report)
    stand_in(args, report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def shipped(args, report: dict) -> None:
    registry = load_registry(args.registry)
    teacher_spec = registry.get(args.teacher)
    for name in (args.teacher, args.turbo):
        spec, how, note = registry.get(name) if name in registry.models else teacher_spec, None, None
        if name not in registry.models:
            # Before the distilled weights exist, the teacher's network under the turbo settings
            # costs the same (the student has the teacher's architecture).
            how = {**defaults_of(teacher_spec), **TURBO}
            note = "timed on the teacher's weights under the turbo settings (same architecture)"
        model = loader.load(spec, precision=args.precision, device=args.device)
        how = how or defaults_of(spec)
        report["shipped"][name] = {"defaults": how, "engine": model.engine, "precision": model.precision,
                                   **({"note": note} if note else {}),
                                   **{f"batch_{b}": measure(model, how, b, args.repeats) for b in (1, 8)}}
    for b in (1, 8):
        teacher, turbo = (report["shipped"][n][f"batch_{b}"]["images_per_s"] for n in (args.teacher, args.turbo))
        report["shipped"][f"speedup_batch_{b}"] = round(turbo / teacher, 2)


def stand_in(args, report: dict) -> None:
    path = arch_dir(args.work, "sd3-medium-sized", args.quick)
    report["stand_in"]["build"] = build_arch("sd3-medium-sized", args.quick, path)
    if args.build_only:
        print(json.dumps(report["stand_in"]["build"]))
        return
    entry = {"source": "arch", "arch": "sd3-medium-sized", "id": "sd3-medium-sized", "path": str(path),
             "width": 64 if args.quick else 512}
    # Random weights: only the time matters (engines.selection refuses unverified bf16 on CUDA otherwise).
    os.environ.setdefault(UNVERIFIED_CUDA_HALF, "1")
    model = loader.load(model_spec(entry), engine="torch", precision="bf16", device=args.device)
    size = entry["width"]
    teacher = {"sampler": "flow_euler", "steps": 20, "schedule": "default", "guidance": "cfg", "guidance_scale": 7.0,
               "width": size, "height": size}
    turbo = {**teacher, **TURBO}
    repeats = args.repeats if args.quick or args.device != "cpu" else 1
    for b in args.stand_in_batches:
        runs = {name: measure(model, how, b, repeats) for name, how in (("teacher_20_guided", teacher),
                                                                         ("turbo_4_unguided", turbo))}
        runs["speedup"] = round(runs["turbo_4_unguided"]["images_per_s"] / runs["teacher_20_guided"]["images_per_s"], 2)
        report["stand_in"][f"batch_{b}"] = runs


if __name__ == "__main__":
    main()
