"""FreeInit's cost: one video at 1..N denoising passes (the request's free_init_iterations),
timed side by side in one run, interleaved (a report, not a test).

    python -m bench.free_init --out bench/reports/freeinit-<date>-cpu        # shapes-video, 16 frames
    python -m bench.free_init --model tiny-video --frames 4 --steps 2 --repeats 2 --out /tmp/fi   # smoke

Each pass runs the whole schedule again, the decode runs once: the cost should be close to
N times one pass's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.engines_report import cpu_info
from engines.registry import load_registry
from engines.tasks import video
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from service.config import ROOT

PROMPT = "a small red star moving right on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-video")
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--frames", type=int, help="default: the model's")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--passes", type=int, default=2, help="time 1..this many passes")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each (the first of each is warm-up)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = video.load(load_registry(args.registry).get(args.model))
    d = model.spec.defaults
    frames, steps = args.frames or d.num_frames, args.steps or d.steps
    request = [ImageRequest(PROMPT, "", 3, d.guidance_scale)]
    times: dict[int, list[float]] = {n: [] for n in range(1, args.passes + 1)}
    for _ in range(args.repeats):
        for n in times:  # interleaved, so drift in the machine's speed hits every setting alike
            job = video.VideoBatch(Txt2ImgBatch(d.width, d.height, d.sampler, steps, request), frames, free_init=n)
            started = time.perf_counter()
            video.run(model, job)
            times[n].append(time.perf_counter() - started)
    median = {n: statistics.median(ts[1:] or ts) for n, ts in times.items()}
    report = {"model": args.model, "frames": frames, "steps": steps, "size": f"{d.width}x{d.height}",
              "sampler": d.sampler, "cpu": cpu_info(), "runs_s": times,
              "median_s": {n: round(m, 3) for n, m in median.items()},
              "ratio_to_one_pass": {n: round(m / median[1], 2) for n, m in median.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_s", "ratio_to_one_pass")}))


if __name__ == "__main__":
    main()
