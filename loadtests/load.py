"""Load generator: N generate requests at concurrency C against a running service; a report.

    python -m loadtests.load --url http://127.0.0.1:8000 --requests 20 --concurrency 1
    python -m loadtests.load --requests 64 --concurrency 8 --model tiny-ldm

Each request uses ?wait=true. Writes loadtests/reports/<name>.json and .md with latency
percentiles (client-measured and the server's own timings), throughput and batch sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPORTS = Path(__file__).resolve().parent / "reports"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def one(client: httpx.Client, body: dict) -> dict:
    started = time.perf_counter()
    response = client.post("/v1/generate", params={"wait": "true"}, json=body)
    elapsed = time.perf_counter() - started
    job = response.json()
    return {"code": response.status_code, "client_s": elapsed, "status": job.get("status"),
            "timings": job.get("timings"), "batch": (job.get("batch") or {}).get("size")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--prompt", default="a red circle on the left")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--name", help="report name (default: load-<model>-c<concurrency>)")
    args = parser.parse_args()

    body = {"prompt": args.prompt}
    for key in ("model", "width", "height", "steps"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    with httpx.Client(base_url=args.url, timeout=600) as client:
        models = client.get("/v1/models").json()
        model_id = args.model or models["default"]
        spec = next(m for m in models["models"] if m["id"] == model_id)
        for i in range(args.warmup):
            one(client, {**body, "seed": 10_000 + i})
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: one(client, {**body, "seed": i}), range(args.requests)))
        wall = time.perf_counter() - started

    ok = [r for r in results if r["code"] == 200 and r["status"] == "succeeded"]
    client_s = [r["client_s"] for r in ok]
    server = {k: [r["timings"][k] for r in ok] for k in ("queue_s", "inference_s", "total_s")}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "python": platform.python_version()},
        "model": model_id,
        "request": {**body, "width": body.get("width", spec["defaults"]["width"]),
                    "height": body.get("height", spec["defaults"]["height"]),
                    "steps": body.get("steps", spec["defaults"]["steps"]),
                    "sampler": spec["defaults"]["sampler"]},
        "requests": args.requests, "concurrency": args.concurrency, "succeeded": len(ok),
        "wall_s": round(wall, 3), "jobs_per_s": round(len(ok) / wall, 3),
        "client_latency_s": {q: round(percentile(client_s, p), 4)
                             for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "server_median_s": {k: round(statistics.median(v), 4) for k, v in server.items() if v},
        "batch_sizes": sorted({r["batch"] for r in ok}),
        "mean_batch_size": round(statistics.mean(r["batch"] for r in ok), 2) if ok else None,
    }
    name = args.name or f"load-{model_id}-c{args.concurrency}"
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lat = report["client_latency_s"]
    md = [
        f"# {name}", "",
        f"{report['date']} · {report['host']['machine']} · model `{model_id}` · "
        f"{report['request']['width']}x{report['request']['height']}, {report['request']['steps']} "
        f"{report['request']['sampler']} steps · {args.requests} requests at concurrency {args.concurrency}", "",
        "| client p50 | client p95 | client p99 | server queue (median) | server inference (median) | server total (median) | jobs/s | mean batch |",
        "|---|---|---|---|---|---|---|---|",
        f"| {lat['p50']:.3f} s | {lat['p95']:.3f} s | {lat['p99']:.3f} s | "
        f"{report['server_median_s'].get('queue_s', float('nan')):.3f} s | "
        f"{report['server_median_s'].get('inference_s', float('nan')):.3f} s | "
        f"{report['server_median_s'].get('total_s', float('nan')):.3f} s | {report['jobs_per_s']} | "
        f"{report['mean_batch_size']} |",
    ]
    (REPORTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
