"""The engine benchmark's report: machine info, figures derived from the measurements (FLOP/s,
fractions of peak, ratios, goals), report.md and latency.png."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bench.archs import ARCHS
from bench.constants import DENOISER_BATCHES, GOAL, PROMPT


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
