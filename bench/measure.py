"""The measurement subprocess: one job (calibrate, build, onnx, engine, diffusers) per process,
its timings and per-phase peak memory written to its result file as they are taken."""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.archs import build_arch, model_spec
from bench.constants import CPU_ENGINES, GPU_ENGINES, PROMPT


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
