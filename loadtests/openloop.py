"""Open-loop load test: three servers on the same engine under the same request mix, side by
side in one run (a report, not a test).

    python -m loadtests.openloop --out loadtests/reports/openloop-<date>          # ~12 min on 2 cores
    python -m loadtests.openloop --out /tmp/ol --duration 3 --rates 0.5 --quick   # a smoke run

Servers (each its own redis-server, API and one worker, serving shapes-mmdit and
shapes-mmdit-turbo): one request at a time (max batch 1), whole-request batching
(LATENTSERVE_SCHEDULER=request) and step-level (the default). For each:
- a lone request of the default class, five times: end-to-end latency against the worker's
  own inference time (the service's overhead);
- 16 closed-loop clients for `--duration` seconds: throughput;
- Poisson arrivals (seeded) at fractions of the step-level server's 16-client throughput
  (its saturation), `--duration` seconds each: throughput, p50/p95/p99 latency and queue wait,
  overall and per request class.
Arrivals are open-loop: a request is sent at its time whether or not earlier ones finished.
Writes report.json, report.md and PNG plots (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import httpx

from bench.engines_report import cpu_info
from loadtests.stack import Stack

CONFIGS = {  # name -> the worker's settings
    "step-level": {"LATENTSERVE_SCHEDULER": "step"},
    "whole-request": {"LATENTSERVE_SCHEDULER": "request"},
    "one-at-a-time": {"LATENTSERVE_SCHEDULER": "request", "LATENTSERVE_MAX_BATCH": "1"},
    # What the delivery thread does on this host: step-level with decoding on a thread (the
    # default on CUDA, off on CPUs); not in the default run.
    "step-level-decode-thread": {"LATENTSERVE_SCHEDULER": "step", "LATENTSERVE_DECODE_OVERLAP": "on"},
}
DEFAULT_CONFIGS = ["step-level", "whole-request", "one-at-a-time"]
# The mix: (class, weight, request body). 4, 20 and 28 steps, guidance on and off, two sizes.
MIX = [
    ("turbo-4", 0.3, {"model": "shapes-mmdit-turbo"}),
    ("default-20", 0.4, {"model": "shapes-mmdit"}),
    ("long-28", 0.15, {"model": "shapes-mmdit", "steps": 28}),
    ("96px-20-unguided", 0.15, {"model": "shapes-mmdit", "width": 96, "height": 96, "guidance": "none"}),
]
# The same classes on the SD-1.5-sized random-weight stand-in at 512x512 (--stand-in sd15, GPU hosts).
SD15_MIX = [
    ("few-4", 0.3, {"model": "sd15-sized", "steps": 4, "guidance": "none"}),
    ("default-20", 0.4, {"model": "sd15-sized"}),
    ("long-28", 0.15, {"model": "sd15-sized", "steps": 28}),
    ("768px-20-unguided", 0.15, {"model": "sd15-sized", "width": 768, "height": 512, "guidance": "none"}),
]
PROMPTS = ["a large red circle on the left", "a small blue square at the top", "a green triangle in the center",
           "a yellow star on the right", "a purple circle and an orange square"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def body_of(mix: list, cls: str, k: int) -> dict:
    body = dict(next(b for name, _, b in mix if name == cls))
    return {**body, "prompt": PROMPTS[k % len(PROMPTS)], "seed": k}


async def one(client: httpx.AsyncClient, mix: list, cls: str, k: int, sent_at: float) -> dict:
    response = await client.post("/v1/generate", params={"wait": "true"}, json=body_of(mix, cls, k))
    job = response.json()
    while response.status_code == 202 and job.get("id"):  # waited past the API's limit: poll
        await asyncio.sleep(0.5)
        response = await client.get(f"/v1/jobs/{job['id']}")
        job = response.json()
        if job.get("status") in ("queued", "running"):
            response = httpx.Response(202, json=job)
    timings = job.get("timings") or {}
    done_at = time.perf_counter()
    return {"class": cls, "code": response.status_code, "status": job.get("status"), "done_at": done_at,
            "latency_s": done_at - sent_at, "queue_s": timings.get("queue_s"),
            "inference_s": timings.get("inference_s"), "batch": (job.get("batch") or {}).get("size")}


def summarize(results: list[dict], start: float, seconds: float, mix: list) -> dict:
    """Latencies of every succeeded job; throughput counts only those done inside the window
    (a drain after it would make an overloaded server look faster or slower than it is)."""
    ok = [r for r in results if r["status"] == "succeeded"]
    inside = sum(1 for r in ok if r["done_at"] <= start + seconds)
    out = {"sent": len(results), "succeeded": len(ok), "throughput_jobs_s": round(inside / seconds, 3)}
    for name, rows in [("all", ok)] + [(c, [r for r in ok if r["class"] == c]) for c, _, _ in mix]:
        lat = [r["latency_s"] for r in rows]
        wait = [r["queue_s"] for r in rows if r["queue_s"] is not None]
        out[name] = {"n": len(rows), **{f"p{int(q * 100)}_s": _round(percentile(lat, q)) for q in (0.5, 0.95, 0.99)},
                     "queue_p50_s": _round(percentile(wait, 0.5)), "queue_p99_s": _round(percentile(wait, 0.99))}
    return out


def _round(v):
    return None if v is None else round(v, 3)


async def open_loop(url: str, mix: list, rate: float, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    classes, weights = [c for c, _, _ in mix], [w for _, w, _ in mix]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=2000)) as client:
        tasks, started, t, k = [], time.perf_counter(), 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t > seconds:
                break
            await asyncio.sleep(max(0.0, started + t - time.perf_counter()))
            cls = rng.choices(classes, weights)[0]
            tasks.append(asyncio.create_task(one(client, mix, cls, seed * 100000 + k, time.perf_counter())))
            k += 1
        results = await asyncio.gather(*tasks)
        drained = time.perf_counter() - started  # arrivals plus the drain of what they left
    return {"offered_jobs_s": round(rate, 3), **summarize(results, started, seconds, mix), "drained_s": round(drained, 2)}


async def closed_loop(url: str, mix: list, clients: int, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    classes, weights = [c for c, _, _ in mix], [w for _, w, _ in mix]
    results, stop_at = [], time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def user(u: int):
            k = 0
            while time.perf_counter() < stop_at:
                results.append(await one(client, mix, rng.choices(classes, weights)[0], u * 10000 + k,
                                         time.perf_counter()))
                k += 1
        started = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(clients)))
    return {"clients": clients, **summarize(results, started, seconds, mix)}


async def lone(url: str, mix: list, n: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        rows = [await one(client, mix, "default-20", k, time.perf_counter()) for k in range(n)]
    e2e = statistics.median(r["latency_s"] for r in rows)
    inference = statistics.median(r["inference_s"] for r in rows)
    return {"n": n, "end_to_end_s": round(e2e, 4), "inference_s": round(inference, 4),
            "overhead_fraction": round((e2e - inference) / e2e, 3)}


def run_config(name: str, args, saturation: float | None, log_dir: Path) -> dict:
    (log_dir / name).mkdir(parents=True, exist_ok=True)
    mix = args.mix
    stack = Stack(sorted({b["model"] for _, _, b in mix}), CONFIGS[name], log_dir / name)
    try:
        # Warm-up: every class and batch size (16 clients), every cache.
        asyncio.run(closed_loop(stack.url, mix, 16, 2 if args.quick else 6, 99))
        out = {"settings": CONFIGS[name], "lone": asyncio.run(lone(stack.url, mix, 5))}
        out["closed_16"] = asyncio.run(closed_loop(stack.url, mix, 16, args.duration, 1))
        saturation = saturation or out["closed_16"]["throughput_jobs_s"]
        out["open"] = [asyncio.run(open_loop(stack.url, mix, f * saturation, args.duration, 7 + i))
                       for i, f in enumerate(args.rates)]
        print(name, json.dumps({k: out[k] for k in ("lone", "closed_16")}), flush=True)
        return out
    finally:
        stack.close()


def serve_stand_in(work: Path, quick: bool) -> str:
    """Build the SD-1.5-sized random-weight model and a registry serving it; the servers'
    processes inherit the settings. Returns the device's name."""
    from bench.archs import build_arch

    path = work / ("sd15-sized-quick" if quick else "sd15-sized")
    print("stand-in", json.dumps(build_arch("sd15-sized", quick, path)), flush=True)
    size = 64 if quick else 512
    registry = {"default": "sd15-sized", "models": [{
        "id": "sd15-sized", "path": str(path), "family": "ldm", "tasks": ["txt2img"],
        "samplers": ["euler", "ddim", "dpmpp_2m"], "description": "random weights, SD-1.5 architecture",
        "defaults": {"sampler": "euler", "steps": 20, "guidance_scale": 7.5, "width": size, "height": size},
        "limits": {"min_size": size, "max_size": size * 2, "size_multiple": 64,
                   "max_steps": 50, "max_queue": 4096},
        "engine": "torch", "precision": os.environ.get("LATENTSERVE_PRECISION", "bf16"), "max_batch": 16}]}
    (work / "registry.json").write_text(json.dumps(registry, indent=2))
    os.environ["LATENTSERVE_REGISTRY"] = str(work / "registry.json")
    # Random weights: only time matters (engines.selection refuses unverified half precision on CUDA).
    os.environ.setdefault("LATENTSERVE_UNVERIFIED_CUDA_HALF", "1")
    device = os.environ.get("LATENTSERVE_DEVICE", "cpu")
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return device


def main() -> None:
    from datetime import datetime, timezone

    from loadtests.openloop_report import goals, markdown, plots

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate (and for 16 clients)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9, 1.2],
                        help="fractions of the step-level server's saturation")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="short warm-up (smoke runs)")
    parser.add_argument("--stand-in", choices=["sd15"], help="serve the SD-1.5-sized random-weight stand-in "
                        "(built under --work) on LATENTSERVE_DEVICE instead of the shapes models")
    parser.add_argument("--work", type=Path, default=Path("/tmp/latentserve-openloop"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.mix, device = MIX, "cpu"
    if args.stand_in:
        args.mix, device = SD15_MIX, serve_stand_in(args.work, args.quick)
        if args.quick:  # tiny widths at 64x64: the wide class at 128x64
            args.mix = [(c, w, {**b, "width": 128, "height": 64} if "width" in b else b) for c, w, b in SD15_MIX]
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
              "cores": os.cpu_count(), "python": platform.python_version(), "device": device,
              "mix": {c: w for c, w, _ in args.mix}, "duration_s": args.duration, "rates": args.rates, "configs": {}}
    saturation = None
    for name in args.configs:  # step-level first: its saturation sets every server's rates
        report["configs"][name] = run_config(name, args, saturation, args.out / "logs")
        saturation = saturation or report["configs"][name]["closed_16"]["throughput_jobs_s"]
    report["saturation_jobs_s"] = saturation
    if set(DEFAULT_CONFIGS) <= set(report["configs"]):
        report["goals"] = goals(report)
        (args.out / "report.md").write_text(markdown(report))
        try:
            plots(report, args.out)
        except ImportError as exc:  # a host without matplotlib: plot from report.json elsewhere
            print(f"no plots ({exc}); python -m loadtests.openloop_report {args.out} draws them", flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report.get("goals", {}), indent=2))


if __name__ == "__main__":
    main()
