"""What a live preview costs against the step it rides on (issue 13's target: < 5%).

    python -m bench.previews                          # the registry's default model
    python -m bench.previews --model shapes-ldm --out /tmp/previews

A step is what the worker runs per engine call (`txt2img.step`: one guided denoiser call over
the batch's rows, then each row's sampler step) at the model's defaults. A preview is what
the worker adds per job that asked (`service.previews.preview`: the first row's x0 estimate
through the model's latent -> RGB map, PNG-encoded, base64). Both are timed at every step
of `--repeats` whole generations; medians are reported, with the VAE decode of one image
(what a VAE-based preview would cost instead) for scale. Batch B: B images of B jobs; the
worst case is every one of them asking for previews (B previews per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from bench.engines_report import cpu_info
from engines import latent_preview, loader
from engines.registry import load_registry
from engines.tasks import txt2img
from service.config import ROOT
from service.previews import preview

PROMPT = "a large red circle on the left on a white background"


def clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.inference_mode()
def measure(model, rgb_map, batch: int, repeats: int) -> dict:
    d = model.spec.defaults
    images = [txt2img.ImageRequest(PROMPT, "", seed, d.guidance_scale, guidance=d.guidance, schedule=d.schedule)
              for seed in range(batch)]
    request = txt2img.Txt2ImgBatch(d.width, d.height, d.sampler, d.steps, images)
    evaluate = txt2img.evaluator_of(model)
    steps, previews, decodes = [], [], []
    for _ in range(repeats + 1):  # the first generation warms up and is not counted
        rows, run_steps, run_previews = txt2img.start_rows(model, request), [], []
        while not rows[0].done:
            started = clock()
            rows = txt2img.step(evaluate, rows)
            run_steps.append(clock() - started)
            started = clock()
            preview(rgb_map, rows[0])
            run_previews.append(clock() - started)
        started = clock()
        model.decode_latents(rows[0].denoised[None])
        decodes.append(clock() - started)
        steps += run_steps
        previews += run_previews
    steps, previews = steps[len(steps) // (repeats + 1):], previews[len(previews) // (repeats + 1):]
    step_s, preview_s = statistics.median(steps), statistics.median(previews)
    shown = preview(rgb_map, rows[0])
    return {
        "batch": batch, "steps_timed": len(steps), "step_ms": round(step_s * 1e3, 3),
        "preview_ms": round(preview_s * 1e3, 4), "preview_bytes_base64": len(shown["data"]),
        "preview_size": [shown["width"], shown["height"]],
        "one_job_previews_pct": round(100 * preview_s / step_s, 2),
        "every_job_previews_pct": round(100 * batch * preview_s / step_s, 2),
        "vae_decode_one_image_ms": round(statistics.median(decodes[1:]) * 1e3, 3),
    }


def report_md(report: dict) -> str:
    lines = [
        f"# Live preview cost: {report['model']} ({report['engine']} {report['precision']}, {report['device']})",
        "",
        f"CPU: {report['cpu']}; torch threads: {report['torch_threads']}; {report['date']}; medians over "
        f"{report['repeats']} generations of {report['steps']} steps at {report['size']} (`python -m bench.previews`); "
        f"load average {report['load_average'][0]} before and {report['load_average'][1]} after (other work on the "
        "host slows both columns).",
        "",
        "| batch | step (ms) | one preview (ms) | one job previews | every job previews | VAE decode, 1 image (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["batches"]:
        lines.append(f"| {r['batch']} | {r['step_ms']} | {r['preview_ms']} | {r['one_job_previews_pct']}% | "
                     f"{r['every_job_previews_pct']}% | {r['vae_decode_one_image_ms']} |")
    worst = max(r["every_job_previews_pct"] for r in report["batches"])
    lines += ["", f"Target < 5% of the step time: **{'met' if worst < 5 else 'not met'}** (worst case {worst}%).",
              f"A preview is {report['batches'][0]['preview_size'][0]}x{report['batches'][0]['preview_size'][1]} "
              f"pixels, {report['batches'][0]['preview_bytes_base64']} bytes of base64 per progress event."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="registry id (default: the registry's default model)")
    parser.add_argument("--registry", default=str(ROOT / "models" / "registry.json"))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="report directory (default: bench/reports/previews-<date>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    spec = registry.get(args.model or registry.default)
    model = loader.load_with_guide(registry, spec)
    rgb_map = latent_preview.load(spec.path, model.vae.scaling_factor, model.vae.shift_factor)
    if rgb_map is None:
        raise SystemExit(f"{spec.id} has no {latent_preview.FILENAME}: python -m training.fit_preview {spec.path}")
    d = spec.defaults
    report = {
        "model": spec.id, "engine": model.engine, "precision": model.precision, "device": model.device,
        "cpu": cpu_info()["model"], "torch_threads": torch.get_num_threads(), "date": date.today().isoformat(),
        "repeats": args.repeats, "steps": d.steps, "size": f"{d.width}x{d.height}", "sampler": d.sampler,
        "load_average": [round(os.getloadavg()[0], 2)],
        "batches": [measure(model, rgb_map, int(b), args.repeats) for b in args.batches.split(",")],
    }
    report["load_average"].append(round(os.getloadavg()[0], 2))
    out = Path(args.out or ROOT / "bench" / "reports" / f"previews-{report['date']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_md(report))
    print(report_md(report))


if __name__ == "__main__":
    main()
