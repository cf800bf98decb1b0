"""Engine benchmark: the project's engines beside the plain diffusers pipeline, on this machine.

    PYTHONPATH=. .venv/bin/python -m bench.engines --out bench/reports/cpu-$(date +%F)
    PYTHONPATH=. .venv/bin/python -m bench.engines --quick --out /tmp/bench-quick   # tiny sizes

A report, not a test: nothing is asserted and nothing is hard-coded; every figure in the report
is measured in the run that writes it. The run is held to --budget-min (30 minutes): anything
that would not fit is skipped and the report says what and why.

What one run measures:
  * the machine's peak matmul FLOP/s (4096^3 torch.matmul, fp32 and bf16, --threads threads);
  * the FLOPs of each denoiser call, VAE decode and text encoding, counted once with
    torch.utils.flop_counter on meta tensors (free; attention included);
  * for every model and every engine this host can run (torch fp32, torch bf16, onnxruntime
    fp32; CUDA and TensorRT are listed as skipped with the reason when absent): load / build
    seconds, the latency of one denoiser call at batch 1/4/16 (rows per call) with its achieved
    FLOP/s and fraction of the measured peak of its precision, one guided end-to-end
    generation through engines.tasks.txt2img (images/s, with the per-step denoiser time), and
    the peak RSS of the process;
  * the plain diffusers pipeline (StableDiffusionPipeline / StableDiffusion3Pipeline) on the
    same weights, sampler, steps, guidance and size, in fp32 and in bf16.
Models: every model of the registry (the `-guide` checkpoint only when named with --models),
plus random-weight architectures written to --work in the diffusers layout: "sd15-sized"
(SD-1.5 UNet, VAE and a ViT-L/14 text encoder) and "sd3-medium-sized" (SD3-medium MMDiT, its
VAE and both CLIP encoders, without T5), with the same FLOPs as the real models. --quick
shrinks both to tiny widths and 64x64 images and keeps only the registry's default model, to
check the whole script in about two minutes.

Cost control: a denoiser batch is skipped (and the report says so) when its call is predicted,
from the smaller batch, to exceed --max-call-s (30 s): on the big models fp32 batch 16 is not
measured by default. Repeats fill --repeat-s (8 s) per measurement, at least one after a
warm-up. Generations are timed after a 1-step warm-up at the same size.

Every measurement runs in a fresh subprocess (this module with --job), so peak memory
(VmHWM, reset between phases) never mixes between engines. Engine caches (ONNX graphs) live
under --work/engine-cache: a second run reuses them. Outputs in --out: report.md,
report.json, latency.png (drawn with Pillow), jobs/ and logs/ (one per subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle on the left of a white background"
DENOISER_BATCHES = (1, 4, 16)
CPU_ENGINES = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"))
GPU_ENGINES = (("torch", "fp16", "cuda"), ("torch", "bf16", "cuda"), ("tensorrt", "fp16", "cuda"))
REPORT_RESERVE_S = 20  # kept back from the budget to write the report
GOAL = {"model": "sd15-sized", "vs_diffusers_fp32": 3.0, "vs_diffusers_bf16": 1.3, "peak_fraction_bf16": 0.40}


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """A random-weight architecture benchmarked beside the shipped models."""

    name: str
    family: str
    sampler: str
    steps: int
    guidance: float
    weights_dtype: str  # what save_pretrained writes (loading casts to the engine's precision)
    skip_onnx: str  # why onnxruntime is not run on it ("" = it is)
    e2e_batches: tuple[int, ...] = (1,)


ARCHS = {
    "sd15-sized": Arch("sd15-sized", "ldm", "euler", 4, 7.5, "fp32", ""),
    "sd3-medium-sized": Arch(
        "sd3-medium-sized", "mmdit", "flow_euler", 4, 7.0, "bf16",
        "not run: its fp32 ONNX graph would be ~8 GB (2B-parameter transformer plus CLIP-G); "
        "exporting and checking it would take a large share of the time budget"),
}


def arch_config(name: str, quick: bool) -> dict:
    """Component configs of a benchmark architecture: the real sizes, or tiny ones (--quick)."""
    if name == "sd15-sized":
        if quick:
            return {"image": 64,
                    "unet": dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, cross_attention_dim=64,
                                 attention_head_dim=4, norm_num_groups=8, sample_size=8),
                    "vae": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                                sample_size=64, latent_channels=4, scaling_factor=0.18215),
                    "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
        return {"image": 512,  # SD-1.5: runwayml/stable-diffusion-v1-5's unet / vae / text_encoder configs
                "unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                             attention_head_dim=8, norm_num_groups=32, sample_size=64),
                "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                            sample_size=512, latent_channels=4, scaling_factor=0.18215),
                "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu")}
    if name == "sd3-medium-sized":
        if quick:
            return {"image": 64,
                    "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=128,
                                        caption_projection_dim=64, pooled_projection_dim=96, pos_embed_max_size=16),
                    "vae": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                                sample_size=64, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                use_quant_conv=False, use_post_quant_conv=False),
                    "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                    "text_2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
        return {"image": 512,  # SD3-medium: stabilityai/stable-diffusion-3-medium-diffusers' configs, no T5
                "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
                "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                            sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False, use_post_quant_conv=False),
                "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu"),  # CLIP-L/14
                "text_2": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                               hidden_act="gelu")}  # OpenCLIP bigG/14
    raise KeyError(name)


def arch_dir(work: Path, name: str, quick: bool) -> Path:
    return work / "models" / (f"{name}-quick" if quick else name)


def build_arch(name: str, quick: bool, path: Path) -> dict:
    """Write a random-weight diffusers pipeline of the architecture to `path` (skipped when a
    build of the same config is already there)."""
    arch, cfg = ARCHS[name], arch_config(name, quick)
    marker = {"arch": name, "quick": quick, "config": cfg, "weights_dtype": arch.weights_dtype}
    if (path / "bench-arch.json").is_file() and json.loads((path / "bench-arch.json").read_text()) == marker:
        return {"built": False, "build_s": 0.0, "bytes": dir_bytes(path)}

    import torch

    started = time.perf_counter()
    torch.manual_seed(0)
    pipe = make_pipeline(name, quick)
    if arch.weights_dtype == "bf16":
        pipe.to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "bench-arch.json").write_text(json.dumps(marker))
    tmp.rename(path)
    return {"built": True, "build_s": round(time.perf_counter() - started, 2), "bytes": dir_bytes(path)}


def make_pipeline(name: str, quick: bool):
    """The architecture as a diffusers pipeline with random weights (on the current default
    device: under `torch.device("meta")` it costs nothing)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.vocab import build_tokenizer

    arch, cfg = ARCHS[name], arch_config(name, quick)

    def clip_config(tokenizer, text: dict) -> CLIPTextConfig:
        # Word-level tokenizer (no hub here): CLIP pools the first EOS only when eos_token_id != 2.
        if tokenizer.eos_token_id == 2:
            raise ValueError("the tokenizer's EOS id is 2: CLIP would fall back to argmax pooling")
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=text["hidden_size"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **text)

    def vae() -> AutoencoderKL:
        n = len(cfg["vae"]["block_out_channels"])
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **cfg["vae"])

    if arch.family == "ldm":
        tokenizer = build_tokenizer(77)
        n = len(cfg["unet"]["block_out_channels"])
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), **cfg["unet"])
        # SD-1.5's scheduler settings, as an Euler scheduler (the sampler benchmarked); its
        # tables live on the CPU whatever the default device.
        with torch.device("cpu"):
            scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                               beta_schedule="scaled_linear", timestep_spacing="leading",
                                               steps_offset=1, prediction_type="epsilon")
        pipe = StableDiffusionPipeline(vae=vae(), text_encoder=CLIPTextModel(clip_config(tokenizer, cfg["text"])),
                                       tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        tokenizer, tokenizer_2 = build_tokenizer(77), build_tokenizer(77)
        with torch.device("cpu"):
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**cfg["transformer"]),
            scheduler=scheduler,
            vae=vae(),
            text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, cfg["text"])), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, cfg["text_2"])),
            tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    return pipe


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- model specs


def model_spec(entry: dict):
    """The engines.registry.ModelSpec of a benchmarked model (registry id or built arch)."""
    from engines.registry import Defaults, Limits, ModelSpec, load_registry

    if entry["source"] == "registry":
        return load_registry(entry["registry"]).get(entry["id"])
    arch = ARCHS[entry["arch"]]
    size = entry["width"]
    return ModelSpec(
        id=entry["id"], path=Path(entry["path"]), family=arch.family, tasks=("txt2img",), samplers=(arch.sampler,),
        defaults=Defaults(arch.sampler, arch.steps, arch.guidance, size, size),
        limits=Limits(min_size=64, max_size=1024, size_multiple=64, max_steps=50), max_batch=16,
        options={"t5_sequence_length": 256} if arch.family == "mmdit" else {},
        description=f"random weights, {arch.name} architecture")


def model_entries(args) -> list[dict]:
    """What to benchmark, as plain data for the subprocesses: shipped models, then the archs."""
    from engines.registry import load_registry

    registry = load_registry(args.registry)
    wanted = set(args.models or [])
    entries = []
    for spec in registry.models.values():
        if wanted and spec.id not in wanted:
            continue
        if not wanted and (spec.id.endswith("-guide") or (args.quick and spec.id != registry.default)):
            continue  # --quick: the default model stands for the shipped ones
        d = spec.defaults
        entries.append({"id": spec.id, "source": "registry", "registry": str(args.registry), "family": spec.family,
                        "sampler": d.sampler, "steps": d.steps, "guidance": d.guidance_scale, "width": d.width,
                        "height": d.height, "e2e_batches": sorted({1, min(8, spec.max_batch)}), "skip_onnx": "",
                        "description": spec.description})
    for name, arch in ARCHS.items():
        if wanted and name not in wanted:
            continue
        size = arch_config(name, args.quick)["image"]
        path = arch_dir(args.work, name, args.quick)
        entries.append({"id": path.name, "arch": name, "source": "synthetic", "path": str(path), "family": arch.family,
                        "sampler": arch.sampler, "steps": arch.steps, "guidance": arch.guidance, "width": size,
                        "height": size, "e2e_batches": list(arch.e2e_batches), "skip_onnx": arch.skip_onnx,
                        "weights_dtype": arch.weights_dtype,
                        "description": f"random weights, {name} architecture" + (" (--quick: tiny widths)" if args.quick else "")})
    return entries


# ----------------------------------------------------------------------------- measurement helpers (subprocess side)


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark back to the current RSS, so the next phase's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Recorder(dict):
    """A job's results, rewritten to disk on every update so a killed job leaves what it measured."""

    def __init__(self, path: Path):
        super().__init__(status="running")
        self.path = path
        self.phases: dict[str, float] = {}
        self.separable = reset_peak_rss()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self, indent=1, default=str))

    def phase_done(self, phase: str):
        """Record the peak RSS of the phase that just ended and start the next one's."""
        self.phases[phase] = round(peak_rss_mb(), 1)
        self["peak_rss_mb"] = {**self.phases, "process": max(self.phases.values()), "phases_separated": self.separable}
        reset_peak_rss()


def time_left(job: dict) -> float:
    return job["deadline"] - time.time()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_calls(fn, job: dict) -> dict:
    """One warm-up call, then as many timed calls as --repeat-s allows (1..--max-repeats)."""
    warmup = timed(fn)
    n = max(1, min(job["max_repeats"], int(job["repeat_s"] / max(warmup, 1e-6))))
    times = [timed(fn) for _ in range(n)]
    return {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times], "n": n,
            "warmup_s": round(warmup, 5)}


def predict_call_s(results: dict, batch: int) -> float | None:
    """Seconds of a call at `batch` rows, scaled linearly from the largest batch measured."""
    done = [(int(b), r["median_s"]) for b, r in results.items() if "median_s" in r]
    if not done:
        return None
    b, t = max(done)
    return t * batch / b


def time_denoiser(denoiser, cspec, layout, entry: dict, job: dict) -> dict:
    """Median latency of one denoiser call with B rows at the model's latent size, B in 1/4/16."""
    import torch

    from engines.components import example_inputs

    f = layout.vae_scale_factor
    hw = (entry["height"] // f, entry["width"] // f)
    results: dict[str, dict] = {}
    for batch in job["batches"]:
        predicted = predict_call_s(results, batch)
        if predicted is not None and predicted > job["max_call_s"]:
            results[str(batch)] = {"skipped": f"predicted {predicted:.0f} s per call > --max-call-s {job['max_call_s']:g}"}
            continue
        if predicted is not None and 2.2 * predicted > time_left(job):
            results[str(batch)] = {"skipped": f"predicted {2 * predicted:.0f} s, beyond the time budget"}
            continue
        inputs = example_inputs(cspec, layout, batch=batch, latent_hw=hw, seed=batch)
        with torch.inference_mode():
            results[str(batch)] = time_calls(lambda: denoiser(**inputs), job)
    return results


def e2e_estimate_s(denoiser_results: dict, steps: int, images: int) -> float | None:
    """A guess at one warm-up + one timed guided generation, from the denoiser latencies."""
    call = predict_call_s(denoiser_results, 2 * images)
    return None if call is None else call * (steps + 3)


def step_breakdown(started: float, stamps: list[float], finished: float) -> dict:
    """Split a generation's wall time at the step callbacks: [encode + step 1], steps, decode."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"first_step_s": round(stamps[0] - started, 5) if stamps else None,
            "step_s": statistics.median(steps) if steps else None,
            "decode_s": round(finished - stamps[-1], 5) if stamps else None}


def time_generations(generate, job: dict) -> dict:
    """generate(steps, on_step) -> images. A 1-step warm-up at the same size, then timed runs."""
    generate(1, lambda: None)
    runs = []
    while True:
        stamps: list[float] = []
        started = time.perf_counter()
        images = generate(None, lambda: stamps.append(time.perf_counter()))
        finished = time.perf_counter()
        runs.append({"seconds": finished - started, **step_breakdown(started, stamps, finished)})
        if (len(runs) >= job["e2e_max_repeats"] or sum(r["seconds"] for r in runs) > job["repeat_s"]
                or 2 * runs[-1]["seconds"] > time_left(job)):
            break
    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
    import numpy as np

    pixels = np.asarray(images, dtype=np.float32)
    return {**best, "n": len(runs), "runs_s": [round(r["seconds"], 4) for r in runs],
            "image_std": float(pixels.std()), "image_finite": bool(np.isfinite(pixels).all())}


# ----------------------------------------------------------------------------- jobs (each in its own subprocess)


def job_calibrate(job: dict, rec: Recorder) -> None:
    """Peak matmul FLOP/s, the FLOPs of every model's components, and which engines can run."""
    import torch

    rec["peak"] = {prec: matmul_peak(dtype, job["matmul_n"], job["matmul_repeats"])
                   for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    flops = {}
    for entry in job["models"]:
        try:
            flops[entry["id"]] = count_model_flops(entry)
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the run goes on
            flops[entry["id"]] = {"error": f"{type(exc).__name__}: {exc}"}
    rec["flops"] = flops
    rec["engines"] = engine_availability()
    rec.phase_done("calibrate")


def matmul_peak(dtype, n: int, repeats: int) -> dict:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    times = [timed(lambda: torch.matmul(a, b, out=out)) for _ in range(repeats)]
    median = statistics.median(times)
    return {"n": n, "median_s": median, "times_s": [round(t, 5) for t in times], "flops": 2 * n**3,
            "tflops": 2 * n**3 / median / 1e12}


def count_flops(module, inputs: dict) -> int:
    """FLOPs of one forward pass, counted on meta tensors (nothing is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_attention(q, k, v, *_args, out_shape=None, **_kwargs):
        return sdpa_flop_count(q, k, v)

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention})
    with counter, torch.no_grad():
        module(*[v.to("meta") for v in inputs.values()])
    return int(counter.get_total_flops())


def count_model_flops(entry: dict) -> dict:
    """FLOPs per denoiser call at one row, per VAE decode of one image, per prompt encoded; and
    parameter counts. Modules are built from the configs on the meta device."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engines import components as C
    from engines.layout import ModelLayout

    spec = model_spec(entry)
    layout = ModelLayout.read(spec)
    root, f = spec.path, layout.vae_scale_factor
    hw = (entry["height"] // f, entry["width"] // f)
    ldm = spec.family == "ldm"
    with torch.device("meta"):
        net_cls, sub = (UNet2DConditionModel, "unet") if ldm else (SD3Transformer2DModel, "transformer")
        net = net_cls.from_config(net_cls.load_config(root / sub))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text_cls = CLIPTextModel if ldm else CLIPTextModelWithProjection
        texts = {name: text_cls(CLIPTextConfig.from_pretrained(root / name))
                 for name in C.TXT2IMG_COMPONENTS[spec.family] if name.startswith("text_encoder")}
    denoiser = (C.UNet if ldm else C.MMDiT)(net)

    def inputs(name: str):
        return C.example_inputs(C.component_spec(name, spec.family, layout), layout, batch=1, latent_hw=hw)

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    text_wrap = C.ClipText if ldm else C.ClipTextPooled
    return {
        "denoiser_per_row": count_flops(denoiser, inputs("denoiser")),
        "vae_decoder_per_image": count_flops(C.VaeDecoder(vae), inputs("vae_decoder")),
        "text_per_prompt": sum(count_flops(text_wrap(m), inputs(n)) for n, m in texts.items()),
        "params": {"denoiser": params(net), "vae": params(vae), **{n: params(m) for n, m in texts.items()}},
        "latent_hw": list(hw), "tokens": layout.text_length + layout.t5_tokens,
    }


def engine_availability() -> list[dict]:
    """Every engine the project has, with whether this host runs it (and why not)."""
    import torch

    from engines.selection import runnable

    cuda = torch.cuda.is_available()
    rows = []
    for kind, precision in CPU_ENGINES:
        why = runnable(kind, precision, "cpu")
        rows.append({"engine": kind, "precision": precision, "device": "cpu", "run": why is None, "reason": why or ""})
    for kind, precision, device in GPU_ENGINES:
        library = runnable(kind, precision, device)  # on a CPU host: whether the library is installed
        if not cuda:
            why = "no CUDA device (torch.cuda.is_available() is False)" + (f"; {library}" if library else "")
        else:
            why = library or "a CUDA device is present, but this benchmark measures the CPU engines only"
        rows.append({"engine": kind, "precision": precision, "device": device, "run": False, "reason": why})
    return rows


def job_build(job: dict, rec: Recorder) -> None:
    rec["arch"] = build_arch(job["arch"], job["quick"], Path(job["path"]))
    rec.phase_done("build")


def job_onnx(job: dict, rec: Recorder) -> None:
    """Export (or find in the cache) every txt2img component's ONNX graph, before the engine job
    loads them, so its peak memory is serving's, not the exporter's."""
    from engines.cache import EngineCache
    from engines.components import TXT2IMG_COMPONENTS
    from export import artefacts

    spec = model_spec(job["model"])
    events = []
    builder = artefacts.builder(spec, EngineCache(job["cache"]), "cpu", events.append)
    started = time.perf_counter()
    for name in TXT2IMG_COMPONENTS[spec.family]:
        builder.onnx(name, "fp32")
    rec["build_s"] = round(time.perf_counter() - started, 2)
    rec["cache_events"] = [asdict(e) for e in events]
    rec.phase_done("export")


def job_engine(job: dict, rec: Recorder) -> None:
    """Load a model on one engine, then time its denoiser and a guided generation."""
    from engines.cache import EngineCache
    from engines.components import component_spec
    from export import artefacts
    from engines.layout import ModelLayout
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run

    entry = job["model"]
    spec = model_spec(entry)
    layout = ModelLayout.read(spec)
    events = []
    started = time.perf_counter()
    model = artefacts.load(spec, engine=job["engine"], precision=job["precision"], cache=EngineCache(job["cache"]),
                        threads=job["threads"], on_event=events.append)
    rec["load_s"] = round(time.perf_counter() - started, 2)
    rec["cache_events"] = [asdict(e) for e in events]
    rec.phase_done("load")

    cspec = component_spec("denoiser", spec.family, layout)
    rec["denoiser"] = time_denoiser(model.components["denoiser"], cspec, layout, entry, job)
    rec.phase_done("denoiser")

    e2e = {}
    for images in entry["e2e_batches"]:
        estimate = e2e_estimate_s(rec["denoiser"], entry["steps"], images)
        if estimate is not None and estimate > time_left(job):
            e2e[str(images)] = {"skipped": f"estimated {estimate:.0f} s, beyond the time budget"}
            continue
        requests = [ImageRequest(PROMPT, "", 1000 + i, entry["guidance"]) for i in range(images)]

        def generate(steps, on_step, requests=requests):
            batch = Txt2ImgBatch(entry["width"], entry["height"], entry["sampler"], steps or entry["steps"], requests)
            return run(model, batch, on_step=lambda _done, _total: on_step())

        e2e[str(images)] = time_generations(generate, job)
        rec["e2e"] = e2e
    rec["e2e"] = e2e
    rec.phase_done("e2e")


def load_diffusers_pipeline(entry: dict, precision: str):
    """The plain diffusers pipeline on the model's directory, with the benchmarked sampler."""
    import torch
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)

    spec = model_spec(entry)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    common = dict(use_safetensors=True, local_files_only=True, dtype=dtype)
    if spec.family == "mmdit":
        return StableDiffusion3Pipeline.from_pretrained(spec.path, text_encoder_3=None, tokenizer_3=None, **common)
    pipe = StableDiffusionPipeline.from_pretrained(spec.path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **common)
    scheduler = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[entry["sampler"]]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def job_diffusers(job: dict, rec: Recorder) -> None:
    """The plain diffusers pipeline generating the same images as the engine jobs."""
    import torch

    entry = job["model"]
    started = time.perf_counter()
    pipe = load_diffusers_pipeline(entry, job["precision"])
    pipe.set_progress_bar_config(disable=True)
    rec["load_s"] = round(time.perf_counter() - started, 2)
    rec.phase_done("load")
    e2e = {}
    for images in entry["e2e_batches"]:
        def generate(steps, on_step, images=images):
            def callback(_pipe, _i, _t, kwargs):
                on_step()
                return kwargs

            return pipe([PROMPT] * images, negative_prompt=[""] * images, width=entry["width"],
                        height=entry["height"], num_inference_steps=steps or entry["steps"],
                        guidance_scale=entry["guidance"], generator=torch.Generator().manual_seed(1000),
                        output_type="np", callback_on_step_end=callback).images

        if e2e and 2 * images * next(iter(e2e.values())).get("seconds", 0) > time_left(job):
            e2e[str(images)] = {"skipped": "beyond the time budget"}
            continue
        e2e[str(images)] = time_generations(generate, job)
        rec["e2e"] = e2e
    rec["e2e"] = e2e
    rec.phase_done("e2e")


JOBS = {"calibrate": job_calibrate, "build": job_build, "onnx": job_onnx, "engine": job_engine,
        "diffusers": job_diffusers}


def run_job(path: Path) -> int:
    """Subprocess entry point: run one job file, write its results beside it."""
    job = json.loads(path.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(job["threads"])
    rec = Recorder(Path(job["result"]))
    try:
        JOBS[job["kind"]](job, rec)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()
        rec["status"] = "failed"
        traceback.print_exc()
        return 1
    import resource

    rec["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    rec["status"] = "ok"
    return 0


# ----------------------------------------------------------------------------- orchestration (parent side, torch-free)


class Runner:
    """Runs jobs one at a time in fresh subprocesses, within the run's deadline."""

    def __init__(self, args):
        self.args = args
        self.started = time.time()
        self.deadline = self.started + args.budget_min * 60 - REPORT_RESERVE_S
        self.jobs_dir, self.logs_dir = args.out / "jobs", args.out / "logs"
        for d in (self.jobs_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}

    def log(self, message: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {message}", flush=True)

    def common(self) -> dict:
        a = self.args
        return {"threads": a.threads, "quick": a.quick, "deadline": self.deadline, "cache": str(a.work / "engine-cache"),
                "batches": list(DENOISER_BATCHES), "max_call_s": a.max_call_s, "repeat_s": a.repeat_s,
                "max_repeats": a.max_repeats, "e2e_max_repeats": a.e2e_max_repeats}

    def run(self, name: str, kind: str, **payload) -> dict:
        left = self.deadline - time.time()
        if left < 5:
            return {"status": "skipped", "reason": "the time budget (--budget-min) was spent before this job"}
        path = self.jobs_dir / f"{name}.json"
        result = self.jobs_dir / f"{name}.result.json"
        result.unlink(missing_ok=True)
        path.write_text(json.dumps({**self.common(), **payload, "kind": kind, "result": str(result)}, indent=1))
        started = time.time()
        with open(self.logs_dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bench.engines", "--job", str(path)], cwd=ROOT,
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        data = json.loads(result.read_text()) if result.is_file() else {}
        if rc is None:
            data["status"], data["reason"] = "timeout", "killed at the run's deadline (--budget-min)"
        elif rc != 0 and data.get("status") != "failed":
            data["status"], data["error"] = "failed", f"exit code {rc}; see logs/{name}.log"
        data["wall_s"] = round(time.time() - started, 1)
        return data


def benchmark(args) -> dict:
    runner = Runner(args)
    entries = model_entries(args)
    report = {"meta": machine_info(args), "settings": settings(args), "models": [], "builds": {}}

    for entry in entries:
        if entry["source"] == "synthetic":
            runner.log(f"building {entry['id']} (random weights) in {entry['path']}")
            build = runner.run(f"build-{entry['id']}", "build", arch=entry["arch"], path=entry["path"])
            report["builds"][entry["id"]] = build
            runner.log(f"  {summarise_build(build)}")
    entries = [e for e in entries if e["source"] == "registry" or report["builds"][e["id"]].get("status") == "ok"]

    runner.log("measuring peak matmul FLOP/s and counting FLOPs")
    calib = runner.run("calibrate", "calibrate", models=entries, matmul_n=args.matmul_n,
                       matmul_repeats=3 if args.quick else 5)
    report["peak"], report["flops"] = calib.get("peak", {}), calib.get("flops", {})
    report["engines"] = calib.get("engines", [])
    report["calibrate"] = {k: calib.get(k) for k in ("status", "error", "wall_s")}
    for prec, p in report["peak"].items():
        runner.log(f"  peak {prec}: {p['tflops']:.3f} TFLOP/s ({p['n']}^3 matmul, median {p['median_s']:.4f} s)")
    runnable = [(e["engine"], e["precision"]) for e in report["engines"] if e["run"]] or list(CPU_ENGINES)
    runnable = [e for e in runnable if f"{e[0]}/{e[1]}" in args.engines]

    for entry in entries:
        report["models"].append(benchmark_model(runner, entry, runnable))
    report["meta"]["wall_s"] = round(time.time() - runner.started, 1)
    return report


def job_order(entry: dict, engines: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(what, engine, precision) in the order that matters most if the budget runs out: bf16
    first (the goal's engine), the diffusers baselines, fp32, then onnxruntime."""
    order = [("engine", e, p) for e, p in engines if p == "bf16"]
    order += [("diffusers", "diffusers", "fp32"), ("diffusers", "diffusers", "bf16")]
    order += [("engine", e, p) for e, p in engines if p != "bf16"]
    return order


def benchmark_model(runner: Runner, entry: dict, engines: list[tuple[str, str]]) -> dict:
    record = {"entry": entry, "engines": {}, "diffusers": {}, "onnx_build": None}
    for what, engine, precision in job_order(entry, engines):
        key = f"{engine}/{precision}"
        name = f"{entry['id']}-{engine}-{precision}"
        if what == "diffusers":
            runner.log(f"{entry['id']}: diffusers pipeline {precision}")
            result = runner.run(name, "diffusers", model=entry, precision=precision)
            record["diffusers"][precision] = result
        else:
            if engine == "onnxruntime" and entry["skip_onnx"]:
                record["engines"][key] = {"status": "skipped", "reason": entry["skip_onnx"]}
                runner.log(f"{entry['id']}: {key} skipped: {entry['skip_onnx']}")
                continue
            if engine == "onnxruntime":
                runner.log(f"{entry['id']}: ONNX export (engine cache)")
                record["onnx_build"] = build = runner.run(f"{entry['id']}-onnx-export", "onnx", model=entry)
                runner.log(f"  {summarise_onnx(build)}")
                if build.get("status") != "ok":
                    record["engines"][key] = {"status": "skipped", "reason": f"ONNX export {build.get('status')}: "
                                                                             f"{build.get('error') or build.get('reason')}"}
                    continue
            runner.log(f"{entry['id']}: {key}")
            result = runner.run(name, "engine", model=entry, engine=engine, precision=precision)
            record["engines"][key] = result
        runner.log(f"  {summarise_job(result)}")
    return record


def summarise_build(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error') or r.get('reason')}"
    a = r["arch"]
    return (f"built in {a['build_s']:.1f} s" if a["built"] else "already built") + f", {a['bytes'] / 1e9:.2f} GB"


def summarise_onnx(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error') or r.get('reason')}"
    misses = [e for e in r.get("cache_events", []) if not e["hit"]]
    return f"{len(misses)} graphs exported in {r['build_s']:.1f} s" if misses else "all graphs found in the cache"


def summarise_job(r: dict) -> str:
    if r.get("status") != "ok":
        wall = f"  ({r['wall_s']} s)" if r.get("wall_s") is not None else ""
        return f"{r.get('status')}: {r.get('error') or r.get('reason')}{wall}"
    parts = []
    if "load_s" in r:
        parts.append(f"load {r['load_s']:.1f} s")
    for b, d in r.get("denoiser", {}).items():
        parts.append(f"b{b} {d['median_s'] * 1e3:.1f} ms" if "median_s" in d else f"b{b} skipped")
    for n, d in r.get("e2e", {}).items():
        parts.append(f"e2e x{n} {d['seconds']:.2f} s" if "seconds" in d else f"e2e x{n} skipped")
    if "peak_rss_mb" in r:
        parts.append(f"peak {r['peak_rss_mb']['process']:.0f} MB")
    return ", ".join(parts) + f"  ({r.get('wall_s')} s)"


# ----------------------------------------------------------------------------- report


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict:
    from engines.cache import cpu_fields, cpu_flags_present  # torch-free

    fields, present = cpu_fields(), cpu_flags_present()
    info = {"model": fields.get("model name") or platform.processor() or platform.machine(), "flags": present}
    for key, name in (("vendor_id", "vendor_id"), ("cpu family", "cpu family"), ("model", "model_number")):
        if key in fields:
            info[name] = fields[key]
    if fields:
        info["amx"] = "amx_bf16" in present
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def machine_info(args) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
            "cores": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            "versions": {n: version(n) for n in ("torch", "onnxruntime", "onnx", "diffusers", "transformers")},
            "command": " ".join([Path(sys.executable).name, "-m", "bench.engines", *sys.argv[1:]]),
            "quick": args.quick}


def settings(args) -> dict:
    return {"budget_min": args.budget_min, "max_call_s": args.max_call_s, "repeat_s": args.repeat_s,
            "max_repeats": args.max_repeats, "e2e_max_repeats": args.e2e_max_repeats, "matmul_n": args.matmul_n,
            "denoiser_batches": list(DENOISER_BATCHES), "prompt": PROMPT, "work": str(args.work)}


def derive(report: dict) -> None:
    """Add the figures computed from the measurements: FLOP/s, fractions of peak, ratios, goals."""
    peak = {p: v["tflops"] * 1e12 for p, v in report.get("peak", {}).items()}
    for m in report["models"]:
        entry, flops = m["entry"], report.get("flops", {}).get(m["entry"]["id"], {})
        per_row = flops.get("denoiser_per_row")
        per_image = None
        if per_row:
            per_image = (2 * entry["steps"] * per_row + flops["vae_decoder_per_image"]
                         + 2 * flops["text_per_prompt"])
        m["flops_per_image"] = per_image
        baselines = {p: images_per_s(r, 1) for p, r in m["diffusers"].items()}
        for key, r in {**m["engines"], **{f"diffusers/{p}": r for p, r in m["diffusers"].items()}}.items():
            precision = key.split("/")[1]
            d = {}
            for b, t in r.get("denoiser", {}).items():
                if "median_s" in t and per_row and precision in peak:
                    rate = per_row * int(b) / t["median_s"]
                    d[b] = {"tflops": rate / 1e12, "fraction_of_peak": rate / peak[precision]}
            e = {}
            for n, g in r.get("e2e", {}).items():
                if "seconds" not in g:
                    continue
                e[n] = {"images_per_s": int(n) / g["seconds"]}
                if g.get("step_s") and per_row and precision in peak:
                    rate = per_row * 2 * int(n) / g["step_s"]
                    e[n]["step_tflops"] = rate / 1e12
                    e[n]["step_fraction_of_peak"] = rate / peak[precision]
                    e[n]["step_fraction_of_bf16_peak"] = rate / peak["bf16"] if "bf16" in peak else None
                for p, base in baselines.items():
                    if base and n == "1":
                        e[n][f"vs_diffusers_{p}"] = e[n]["images_per_s"] / base
            r["derived"] = {"denoiser": d, "e2e": e}
    report["goals"] = goals(report)


def images_per_s(result: dict, n: int) -> float | None:
    g = result.get("e2e", {}).get(str(n), {})
    return n / g["seconds"] if "seconds" in g else None


def goals(report: dict) -> dict | None:
    """The issue's goals, on the SD-1.5-sized model with the best of our engines."""
    model = next((m for m in report["models"] if m["entry"].get("arch") == GOAL["model"]), None)
    if model is None:
        return None
    ours = {k: r["derived"]["e2e"].get("1") for k, r in model["engines"].items() if r.get("derived", {}).get("e2e", {}).get("1")}
    if not ours:
        return {"model": model["entry"]["id"], "status": "no engine produced an image"}
    best = max(ours, key=lambda k: ours[k]["images_per_s"])
    figures = ours[best]
    checks = []
    for p, target in (("fp32", GOAL["vs_diffusers_fp32"]), ("bf16", GOAL["vs_diffusers_bf16"])):
        ratio = figures.get(f"vs_diffusers_{p}")
        checks.append({"goal": f">= {target:g}x the images/s of the diffusers {p} pipeline", "value": ratio,
                       "display": "not measured" if ratio is None else f"{ratio:.2f}x",
                       "met": None if ratio is None else ratio >= target})
    fraction = figures.get("step_fraction_of_bf16_peak")
    checks.append({"goal": f"denoiser at >= {GOAL['peak_fraction_bf16']:.0%} of measured peak bf16 matmul FLOP/s",
                   "value": fraction, "display": "not measured" if fraction is None else f"{fraction:.1%}",
                   "met": None if fraction is None else fraction >= GOAL["peak_fraction_bf16"]})
    baselines = {p: images_per_s(r, 1) for p, r in model["diffusers"].items()}
    return {"model": model["entry"]["id"], "engine": best, "images_per_s": figures["images_per_s"], "checks": checks,
            "per_engine": ours, "diffusers_images_per_s": baselines, "quick": report["meta"]["quick"]}


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_gflop(flops: float | None) -> str:
    if not flops:
        return "-"
    return f"{flops / 1e12:.3f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.3f} GFLOP"


def status_text(r: dict) -> str:
    return f"{r.get('status')}: {r.get('reason') or r.get('error') or ''}".strip()


def markdown(report: dict) -> str:
    meta, cpu = report["meta"], report["meta"]["cpu"]
    v = meta["versions"]
    lines = [
        f"# Engine benchmark — {cpu.get('model')}" + (" (--quick: tiny sizes, not the real figures)" if meta["quick"] else ""),
        "",
        f"- date: {meta['date']}; whole run {meta.get('wall_s', 0) / 60:.1f} min (budget {report['settings']['budget_min']} min)",
        f"- CPU: {cpu.get('model')} ({cpu.get('vendor_id', '?')}, family {cpu.get('cpu family', '?')}, model "
        f"{cpu.get('model_number', '?')}), {meta['cores']} cores, "
        f"flags {', '.join(cpu.get('flags', [])) or '-'} (AMX {'present' if cpu.get('amx') else 'absent'}), "
        f"{cpu.get('memory_gib', '?')} GiB RAM; threads used: {meta['threads']}",
        f"- python {meta['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, "
        f"diffusers {v['diffusers']}, transformers {v['transformers']}",
        f"- command: `{meta['command']}`",
        "",
        "## Peak matmul FLOP/s (measured in this run)",
        "",
        "| precision | size | median s | TFLOP/s |",
        "|---|---|---|---|",
    ]
    for p, pk in report.get("peak", {}).items():
        lines.append(f"| {p} | {pk['n']}^3 | {pk['median_s']:.4f} | {pk['tflops']:.3f} |")
    if not report.get("peak"):
        lines.append(f"| - | - | - | calibration {status_text(report.get('calibrate', {}))} |")
    lines += goals_markdown(report.get("goals"))
    lines += ["", "## Engines", "", "| engine | precision | device | measured | why not |", "|---|---|---|---|---|"]
    for e in report.get("engines", []):
        lines.append(f"| {e['engine']} | {e['precision']} | {e['device']} | {'yes' if e['run'] else 'no'} | {e['reason']} |")
    for m in report["models"]:
        lines += model_markdown(report, m)
    lines += notes_markdown(report)
    return "\n".join(lines) + "\n"


def goals_markdown(g: dict | None) -> list[str]:
    if not g:
        return []
    out = ["", f"## Goals ({g['model']}, {report_goal_setting()})", ""]
    if "checks" not in g:
        return out + [f"Not evaluated: {g.get('status')}."]
    if g.get("quick"):
        out.append("**--quick run: these are the tiny stand-in's figures, not the goal's.**\n")
    base = ", ".join(f"diffusers {p} {v:.4f} images/s" if v else f"diffusers {p} not measured"
                     for p, v in g["diffusers_images_per_s"].items())
    out += [f"Our fastest engine for this image: **{g['engine']}**, {g['images_per_s']:.4f} images/s ({base}).", "",
            "| goal | measured | |", "|---|---|---|"]
    for c in g["checks"]:
        verdict = "not measured" if c["met"] is None else ("**met**" if c["met"] else "**not met**")
        out.append(f"| {c['goal']} | {c['display']} | {verdict} |")
    out += ["", "Every engine on the same image (the denoiser figure is one guided step of the generation, against "
            "the bf16 peak):", "", "| engine | images/s | vs diffusers fp32 | vs diffusers bf16 | denoiser % of bf16 peak |",
            "|---|---|---|---|---|"]
    for key, f in g["per_engine"].items():
        cells = [f"{f[k]:.2f}x" if f.get(k) else "-" for k in ("vs_diffusers_fp32", "vs_diffusers_bf16")]
        frac = f.get("step_fraction_of_bf16_peak")
        out.append(f"| {key} | {f['images_per_s']:.4f} | {cells[0]} | {cells[1]} | "
                   f"{'-' if frac is None else f'{frac:.1%}'} |")
    return out


def report_goal_setting() -> str:
    arch = ARCHS[GOAL["model"]]
    return f"{arch.steps} {arch.sampler} steps, guidance {arch.guidance:g}, one image"


def model_markdown(report: dict, m: dict) -> list[str]:
    entry = m["entry"]
    flops = report.get("flops", {}).get(entry["id"], {})
    out = ["", f"## {entry['id']}", "", f"{entry['description']}", ""]
    out.append(f"- {entry['family']}, {entry['width']}x{entry['height']}, {entry['steps']} {entry['sampler']} steps, "
               f"guidance {entry['guidance']:g}")
    if "params" in flops:
        params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in flops["params"].items())
        out.append(f"- parameters: {params}")
        out.append(f"- FLOPs: denoiser {fmt_gflop(flops['denoiser_per_row'])} per row (latent "
                   f"{flops['latent_hw'][0]}x{flops['latent_hw'][1]}, {flops['tokens']} text tokens), VAE decode "
                   f"{fmt_gflop(flops['vae_decoder_per_image'])} per image, text encoders "
                   f"{fmt_gflop(flops['text_per_prompt'])} per prompt; one guided image "
                   f"{fmt_gflop(m.get('flops_per_image'))}")
    elif flops.get("error"):
        out.append(f"- FLOP count failed: {flops['error']}")
    if entry["source"] == "synthetic":
        b = report["builds"].get(entry["id"], {})
        if b.get("arch"):
            out.append(f"- random weights saved as {entry['weights_dtype']} ({b['arch']['bytes'] / 1e9:.2f} GB); "
                       + (f"built in {b['arch']['build_s']:.1f} s" if b["arch"]["built"] else "reused from --work"))
    if m.get("onnx_build"):
        ob = m["onnx_build"]
        events = ob.get("cache_events", [])
        misses = [f"{e['component']} {e['build_s']:.1f} s" for e in events if not e["hit"]]
        out.append("- ONNX graphs: " + (status_text(ob) if ob.get("status") != "ok" else
                                         ("exported and checked: " + ", ".join(misses) if misses else "all from the engine cache")))

    # Denoiser latency.
    batches = [str(b) for b in DENOISER_BATCHES]
    out += ["", "Denoiser call latency (median; n = timed calls after one warm-up), achieved FLOP/s and fraction of "
            "the measured peak of the engine's precision:", "",
            "| engine | " + " | ".join(f"batch {b}" for b in batches) + " | load s | peak RSS MB (load / calls / generation) |",
            "|---|" + "---|" * len(batches) + "---|---|"]
    for key, r in m["engines"].items():
        if not r.get("denoiser"):
            out.append(f"| {key} | " + " | ".join(["-"] * len(batches)) + f" | | {status_text(r)} |")
            continue
        cells = []
        for b in batches:
            t = r.get("denoiser", {}).get(b, {})
            if "median_s" not in t:
                cells.append(f"skipped: {t.get('skipped', 'not run')}")
                continue
            d = r.get("derived", {}).get("denoiser", {}).get(b)
            perf = f"<br>{d['tflops']:.3f} TFLOP/s, {d['fraction_of_peak']:.1%}" if d else ""
            cells.append(f"{fmt_s(t['median_s'])} (n={t['n']}){perf}")
        rss = r.get("peak_rss_mb", {})
        unfinished = "" if r.get("status") == "ok" else f" ({status_text(r)})"
        out.append(f"| {key} | " + " | ".join(cells) + f" | {r.get('load_s', '-')} | "
                   f"{rss.get('load', '-')} / {rss.get('denoiser', '-')} / {rss.get('e2e', '-')}{unfinished} |")

    # End to end.
    out += ["", "End to end (one guided generation: text encoding, all steps, VAE decode; after a 1-step warm-up):", "",
            "| who | images | s per batch | images/s | vs diffusers fp32 | vs diffusers bf16 | step s (guided call) | "
            "step % of peak | decode s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(k, r) for k, r in m["engines"].items()] + [(f"diffusers/{p}", r) for p, r in m["diffusers"].items()]
    for key, r in rows:
        if r.get("status") != "ok" and not r.get("e2e"):
            out.append(f"| {key} | | | | | | | | | {status_text(r)} |")
            continue
        for n, g in r.get("e2e", {}).items():
            if "seconds" not in g:
                out.append(f"| {key} | {n} | skipped: {g.get('skipped')} | | | | | | | |")
                continue
            d = r.get("derived", {}).get("e2e", {}).get(n, {})
            ratios = [f"{d[k]:.2f}x" if d.get(k) else "-" for k in ("vs_diffusers_fp32", "vs_diffusers_bf16")]
            frac = f"{d['step_fraction_of_peak']:.1%}" if d.get("step_fraction_of_peak") is not None else "-"
            sanity = "" if g.get("image_finite", True) else " (non-finite pixels)"
            out.append(f"| {key} | {n} | {g['seconds']:.3f} (n={g['n']}){sanity} | {d.get('images_per_s', 0):.4f} | "
                       f"{ratios[0]} | {ratios[1]} | {fmt_s(g.get('step_s'))} | {frac} | {fmt_s(g.get('decode_s'))} | "
                       f"{r.get('peak_rss_mb', {}).get('process', '-')} |")
    return out


def notes_markdown(report: dict) -> list[str]:
    return [
        "", "## How these were measured", "",
        "- Every row comes from its own fresh Python process; peak RSS is the process's VmHWM, reset between the "
        "load, denoiser-call and generation phases (so 'calls' and 'generation' include the loaded weights).",
        "- Denoiser latency: one call of the engine's denoiser component (`model.components['denoiser']`) with B rows "
        "of random inputs at the model's default latent size, under `torch.inference_mode()`. A guided image costs "
        "2 rows per step. Larger batches are skipped when the call is predicted to exceed --max-call-s "
        f"({report['settings']['max_call_s']:g} s) or the remaining time budget.",
        "- FLOPs: counted with `torch.utils.flop_counter.FlopCounterMode` on meta tensors (matmuls, convolutions and "
        "attention; elementwise ops and norms are not counted). Achieved FLOP/s = counted FLOPs / measured seconds; "
        "the fraction is against the peak matmul FLOP/s of the same precision measured above (fp32 for onnxruntime).",
        "- End to end: `engines.tasks.txt2img.run` for our engines, `pipe(...)` for diffusers (fp32: loaded with "
        "dtype=torch.float32; bf16: dtype=torch.bfloat16, the same as `pipe.to(torch.bfloat16)`), same prompt, sampler, "
        "steps, guidance and size. 'step s' is the median time between step callbacks (one guided denoiser call and "
        "the sampler update); 'decode s' runs from the last step to the returned images.",
        "- Random-weight architectures: the real models' component configs with random weights (no hub access here). "
        "Their text encoders use the project's word-level tokenizer, so their token-embedding tables are smaller than "
        "CLIP's (49,408 tokens): fewer parameters, the same FLOPs. SD3-medium-sized has no T5 encoder; like the SD3 "
        "pipeline without T5 it is conditioned on 77 CLIP tokens plus 256 zero tokens in the T5 slot.",
    ]


# ----------------------------------------------------------------------------- plot (Pillow: matplotlib is not installed)


COLORS = {"torch/fp32": (66, 133, 244), "torch/bf16": (15, 157, 88), "onnxruntime/fp32": (244, 160, 0),
          "diffusers/fp32": (150, 150, 150), "diffusers/bf16": (90, 90, 90)}


def plot(report: dict, path: Path) -> None:
    """Per model: denoiser latency per engine and batch, and seconds per image end to end."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:
        font = ImageFont.load_default()
    rows: list[tuple] = [("title", "Engine benchmark: " + report["meta"]["cpu"].get("model", "")
                          + (" (--quick)" if report["meta"]["quick"] else ""))]
    for m in report["models"]:
        rows.append(("title", m["entry"]["id"]))
        bars = [(f"{k} b{b}", t["median_s"], COLORS.get(k, (0, 0, 0))) for k, r in m["engines"].items()
                for b, t in r.get("denoiser", {}).items() if "median_s" in t]
        if bars:
            rows.append(("subtitle", "denoiser call latency"))
            rows += [("bar", label, value, max(b[1] for b in bars), color) for label, value, color in bars]
        results = {**m["engines"], **{f"diffusers/{p}": r for p, r in m["diffusers"].items()}}
        e2e = [(k, r["e2e"]["1"]["seconds"], COLORS.get(k, (0, 0, 0))) for k, r in results.items()
               if "seconds" in r.get("e2e", {}).get("1", {})]
        if e2e:
            rows.append(("subtitle", "end to end, seconds per image"))
            rows += [("bar", label, value, max(b[1] for b in e2e), color) for label, value, color in e2e]
    width, row_h, left, right = 900, 18, 170, 110
    image = Image.new("RGB", (width, 10 + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    y = 5
    for row in rows:
        if row[0] == "title":
            draw.text((5, y + 2), row[1], fill="black", font=font)
            draw.line((5, y + row_h - 1, width - 5, y + row_h - 1), fill=(200, 200, 200))
        elif row[0] == "subtitle":
            draw.text((15, y + 2), row[1], fill=(80, 80, 80), font=font)
        else:
            _, label, value, top, color = row
            length = int((width - left - right) * value / top) if top else 0
            draw.text((20, y + 2), label, fill="black", font=font)
            draw.rectangle((left, y + 3, left + max(1, length), y + row_h - 3), fill=color)
            draw.text((left + length + 5, y + 2), fmt_s(value), fill="black", font=font)
        y += row_h
    image.save(path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="report directory (report.md, report.json, latency.png)")
    p.add_argument("--work", type=Path, default=Path("/tmp/latentserve-bench"),
                   help="where the random-weight models and the engine cache go (reused by later runs)")
    p.add_argument("--quick", action="store_true", help="tiny stand-ins for the big architectures; a few minutes")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget of the whole run")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a denoiser batch whose call is predicted to take longer (default 30; 5 with --quick)")
    p.add_argument("--repeat-s", type=float, default=None,
                   help="time spent on repeats of one measurement (default 8; 1 with --quick)")
    p.add_argument("--max-repeats", type=int, default=5, help="timed denoiser calls per batch at most")
    p.add_argument("--e2e-max-repeats", type=int, default=3, help="timed generations per setting at most")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="matrix size of the peak FLOP/s measurement (default 4096; 2048 with --quick)")
    p.add_argument("--models", nargs="*", help="model ids (registry ids, sd15-sized, sd3-medium-sized); default: all")
    p.add_argument("--engines", nargs="*", default=[f"{e}/{p}" for e, p in CPU_ENGINES],
                   help="engines to measure, as engine/precision")
    p.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # internal: run one measurement subprocess
    args = p.parse_args(argv)
    if not args.job and not args.out:
        p.error("--out is required")
    args.max_call_s = args.max_call_s if args.max_call_s is not None else (5.0 if args.quick else 30.0)
    args.repeat_s = args.repeat_s if args.repeat_s is not None else (1.0 if args.quick else 8.0)
    args.matmul_n = args.matmul_n or (2048 if args.quick else 4096)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        return run_job(args.job)
    args.out, args.work = args.out.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = benchmark(args)
    derive(report)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "report.md").write_text(markdown(report))
    plot(report, args.out / "latency.png")
    print(f"wrote {args.out / 'report.md'}, report.json, latency.png in {report['meta']['wall_s'] / 60:.1f} min")
    if report.get("goals") and report["goals"].get("checks"):
        for c in report["goals"]["checks"]:
            print(f"  goal {c['goal']}: {c['display']} -> "
                  f"{'not measured' if c['met'] is None else ('met' if c['met'] else 'not met')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
