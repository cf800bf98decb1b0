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
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.archs import model_entries
from bench.constants import CPU_ENGINES, DENOISER_BATCHES
from bench.engines_report import derive, machine_info, markdown, plot, settings
from bench.measure import run_job

ROOT = Path(__file__).resolve().parent.parent
REPORT_RESERVE_S = 20  # kept back from the budget to write the report


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
