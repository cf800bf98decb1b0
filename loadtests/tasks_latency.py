"""Per-task latency of lone requests (a report, not a test): txt2img, img2img, inpaint, superres
(64x64 -> 256x256), the txt2img -> x4 chain and txt2video on the shipped models at their default
steps, through API, Redis and one worker.

    python -m loadtests.tasks_latency --out loadtests/reports/tasks-<date>      # ~3 min on 2 cores
    python -m loadtests.tasks_latency --out ... --only superres,upscale,txt2video

Each (model, task) runs `--repeats` requests one after another (`?wait=true`) after one
warm-up; the report gives the medians of the client's end-to-end time and the worker's own
inference time (its steps, its decode) and what the service adds around them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.engines_report import cpu_info
from loadtests.stack import Stack
from training.shapes import random_scene, render

CASES = [  # (model, task, extra body)
    ("shapes-mmdit", "txt2img", {}),
    ("shapes-mmdit", "img2img", {"strength": 0.8}),
    ("shapes-mmdit", "inpaint", {}),
    ("shapes-ldm", "txt2img", {}),
    ("shapes-ldm", "img2img", {"strength": 0.8}),
    ("shapes-ldm", "inpaint", {}),
    ("shapes-inpaint", "inpaint", {}),
    ("shapes-x4", "superres", {}),
    ("shapes-ldm", "txt2img", {"upscale": True}),  # reported as task "upscale": two stages, one job
    ("shapes-video", "txt2video", {}),  # its default: 16 frames
]


def label(task: str, extra: dict) -> str:
    return "upscale" if extra.get("upscale") else task


def png_b64(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def body(model: str, task: str, extra: dict, k: int) -> dict:
    rng = random.Random(k)
    b = {"model": model, "task": task, "prompt": "a large red circle on the left and a blue square on the right",
         "seed": k, **extra}
    if task in ("img2img", "inpaint", "superres"):
        b["image"] = png_b64(render(random_scene(rng), 64, rng))
    if task == "inpaint":
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 255
        b["mask"] = png_b64(mask)
    return b


def measure(url: str, model: str, task: str, extra: dict, repeats: int) -> dict:
    e2e, inference, steps = [], [], None
    with httpx.Client(base_url=url, timeout=300) as client:
        for k in range(repeats + 1):
            started = time.perf_counter()
            job = client.post("/v1/generate", params={"wait": "true"}, json=body(model, task, extra, k)).json()
            elapsed = time.perf_counter() - started
            if job.get("status") != "succeeded":
                raise RuntimeError(f"{model} {task}: {job}")
            if k:  # the first is the warm-up
                e2e.append(elapsed)
                inference.append(float(job["timings"]["inference_s"]))
                steps = job["progress"]["total"]
    e, i = statistics.median(e2e), statistics.median(inference)
    return {"model": model, "task": label(task, extra), "steps": steps, "n": repeats, "end_to_end_s": round(e, 4),
            "inference_s": round(i, 4), "service_s": round(e - i, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", help="comma-separated tasks to measure (txt2img, upscale, superres, ...)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or label(c[1], c[2]) in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    models = {m for m, _, extra in cases} | ({"shapes-x4"} if any(e.get("upscale") for _, _, e in cases) else set())
    stack = Stack(sorted(models), {}, args.out / "logs", ready_timeout_s=900)  # one worker warms every model up
    try:
        rows = [measure(stack.url, m, t, extra, args.repeats) for m, t, extra in cases]
    finally:
        stack.close()
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
              "cores": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Per-task latency of lone requests, {report['date']}", "",
             f"CPU: {report['cpu']['model']}, {report['cores']} cores (client, API, worker and Redis share them). "
             f"64x64, each model's default sampler, steps and guidance; medians of {args.repeats} requests after a "
             "warm-up; img2img at strength 0.8 (steps x 0.8 run); inpaint with the right half masked; superres "
             "64x64 -> 256x256; upscale: a 64x64 txt2img then x4 as one job (steps of both stages; its worker "
             "inference is the second stage's, so its service column holds the first stage's inference); "
             "txt2video: the model's default frames (shapes-video: 16) at 64x64, MP4.", "",
             "| model | task | steps run | end to end s | worker inference s | service s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['steps']} | {r['end_to_end_s']} | {r['inference_s']} | {r['service_s']} |"
              for r in rows]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
