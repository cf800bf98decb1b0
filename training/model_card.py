"""Write a model card (README.md) for a shipped shapes model from what its run recorded.

    python -m training.model_card models/shapes-mmdit --command "..." --eval runs/eval-mmdit.json

Reads training.json (written at export) and evaluation JSON files (training.evaluate --out),
so every figure on a card comes from a file a command wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from safetensors import safe_open

TARGETS = {"color": 0.95, "shape": 0.90, "position": 0.90, "two_object_both": 0.70,
           "held_out_pair": 0.85, "diversity_ratio": 0.50}


def parameter_counts(model_dir: Path) -> dict[str, float]:
    counts = {}
    for weights in sorted(model_dir.glob("*/*.safetensors")):
        with safe_open(weights, "pt") as f:
            counts[weights.parent.name] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6
    return counts


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def eval_table(results: list[dict]) -> list[str]:
    keys = ["color", "shape", "position", "size", "background", "two_object_both", "held_out_pair", "diversity_ratio"]
    models = len({r.get("model") for r in results}) > 1  # baselines beside the model: name each row's
    lines = [("| model " if models else "") + "| size | sampler, steps, guidance | " + " | ".join(keys)
             + " | rows/image | n |", "|---" * (len(keys) + 4 + models) + "|"]
    for r in results:
        cells = []
        for k in keys:
            value = r.get(k)
            mark = "" if k not in TARGETS else (" ✓" if value >= TARGETS[k] else " ✗")
            cells.append(f"{value:.3f}{mark}" if isinstance(value, float) else str(value))
        how = f"{r['sampler']}, {r['steps']}, {r.get('guidance', 'cfg')} {r['guidance_scale']}"
        if r.get("schedule", "default") != "default":
            how += f", {r['schedule']} schedule"
        if r.get("interval_fraction"):
            how += f", interval {r['interval_fraction'][0]}-{r['interval_fraction'][1]}"
        lines.append((f"| {r.get('model')} " if models else "") + f"| {r.get('image_size', '64x64')} | {how} | "
                     + " | ".join(cells)
                     + f" | {r.get('denoiser_rows_per_image', '')} | {r['n']} |")
    targets = ", ".join(f"{k} >= {v}" for k, v in TARGETS.items())
    lines += ["", f"Targets (issue 3): {targets}. diversity_ratio: mean pairwise pixel distance across "
              "seeds for loosely specified prompts, over the same figure for rendered scenes."]
    return lines


def cpu_description() -> str:
    """This machine's CPU as the card states it (model name, cores, the matmul extensions)."""
    from engines.cache import cpu_fields, cpu_flags_present

    name = cpu_fields().get("model name", "")
    present = cpu_flags_present()
    return f"{name or platform.machine()} CPU, {os.cpu_count()} cores ({', '.join(present) or 'no AVX-512'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--command", action="append", default=[], help="how it was trained (repeatable)")
    parser.add_argument("--eval", type=Path, action="append", default=[])
    parser.add_argument("--notes", default="")
    parser.add_argument("--hardware", default="", help="where it trained (default: this machine's CPU)")
    args = parser.parse_args()
    training = json.loads((args.model_dir / "training.json").read_text())
    results = [json.loads(p.read_text()) for p in args.eval]
    params = parameter_counts(args.model_dir)
    lines = [f"# {args.title}", "", args.summary, "",
             "## Components (millions of parameters)", "",
             ", ".join(f"{k}: {v:.2f}M" for k, v in params.items()), "",
             "## Training", ""]
    lines += [f"    {c}" for c in args.command] + [""]
    elapsed = training.get("elapsed_s")
    lines += [f"- seed {training.get('seed')}, {training.get('step')} steps, batch {training.get('batch')}, lr {training.get('lr')}",
              f"- wall time {elapsed / 60:.1f} min" if elapsed else "- wall time: not recorded",
              f"- hardware: {args.hardware or cpu_description() + ', no GPU'}",
              f"- settings: `{json.dumps(training)}`", ""]
    if results:
        lines += ["## Evaluation (`python -m training.evaluate`)", ""] + eval_table(results) + [""]
    if args.notes:
        lines += ["## Notes", "", args.notes, ""]
    (args.model_dir / "README.md").write_text("\n".join(lines))
    print((args.model_dir / "README.md").read_text())


if __name__ == "__main__":
    main()
