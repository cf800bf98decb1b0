"""Time the two heaviest tasks, x4 super-resolution and 16-frame text-to-video, through the
serving engines on each device asked for (the GPU check of the superres/video issue): median
of `--repeats` calls after one warm-up, batch 1 and a full batch.

    python -m bench.gpu.tasks_timing --x4 models/shapes-x4 --video models/shapes-video \
        --devices cuda cpu --out /tmp/out/tasks_timing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engines import loader
from engines.registry import load_registry
from engines.tasks import img2img, superres, video
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle moving right"


def median_s(call, repeats: int) -> tuple[float, list[float]]:
    call()  # warm-up (allocations, cuDNN autotuning)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def time_x4(spec, device: str, batch: int, steps: int, repeats: int) -> dict:
    model = loader.load(spec, device=device)
    low = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    requests = [ImageRequest("a red circle", "", k, 1.0, "ddim", steps) for k in range(batch)]
    job = superres.SuperresBatch(Txt2ImgBatch(256, 256, "ddim", steps, requests), img2img.pixels_to_tensor(low),
                                 [20] * batch)
    median, times = median_s(lambda: superres.run(model, job), repeats)
    return {"task": "superres 64->256", "device": device, "batch": batch, "steps": steps, "guidance_scale": 1.0,
            "median_s": round(median, 4), "per_image_s": round(median / batch, 4), "runs_s": [round(t, 4) for t in times]}


def time_video(spec, device: str, batch: int, frames: int, steps: int, guidance: float, repeats: int) -> dict:
    model = video.load(spec, device=device)
    requests = [ImageRequest(PROMPT, "", k, guidance, "ddim", steps) for k in range(batch)]
    job = video.VideoBatch(Txt2ImgBatch(64, 64, "ddim", steps, requests), frames)
    median, times = median_s(lambda: video.run(model, job), repeats)
    return {"task": f"txt2video {frames}x64x64", "device": device, "batch": batch, "steps": steps,
            "guidance_scale": guidance, "median_s": round(median, 4), "per_video_s": round(median / batch, 4),
            "runs_s": [round(t, 4) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x4", type=Path, required=True)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--x4-steps", type=int, default=20)
    parser.add_argument("--video-steps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # the entries it borrows settings from, alone (the registry checks every model's directory)
    entries = json.loads((ROOT / "models" / "registry.json").read_text())
    entries["models"] = [m for m in entries["models"] if m["id"] in ("tiny-x4", "tiny-video")]
    for m in entries["models"]:
        m["path"] = str(ROOT / "models" / m["path"])
    manifest = Path(tempfile.mkdtemp()) / "registry.json"
    manifest.write_text(json.dumps({**entries, "default": "tiny-x4"}))
    registry = load_registry(manifest)
    x4 = replace(registry.get("tiny-x4"), id="x4", path=args.x4.resolve(), tile=256)
    clip = registry.get("tiny-video")
    clip = replace(clip, id="video", path=args.video.resolve(),
                   limits=replace(clip.limits, max_frames=max(args.frames, clip.limits.max_frames), size_multiple=16))
    results = []
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "precision": "fp32", "results": results}

    def record(result: dict) -> None:  # written after each, so a run stopped early keeps what it measured
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    for device in args.devices:
        repeats = args.cpu_repeats if device == "cpu" else args.repeats
        for batch in (1, 8):
            record(time_x4(x4, device, batch, args.x4_steps, repeats))
        for batch in (1, 4):
            record(time_video(clip, device, batch, args.frames, args.video_steps, 5.0, repeats))


if __name__ == "__main__":
    main()
