"""Evaluate a shapes model: generate a fixed set of (prompt, seed) pairs through the serving
code path (registry -> engines -> txt2img) and score the pixels (training/scorer.py).

    python -m training.evaluate --model shapes-mmdit                  # 256 pairs, registry defaults
    python -m training.evaluate --model shapes-mmdit --n 64 --steps 10 --guidance 3
    python -m training.evaluate --validate-scorer --vae models/shapes-vae

Reports: color / shape / position / size accuracy on one-object prompts, the two-object
both-correct rate, held-out (color, shape) pair accuracy, and diversity (mean pairwise pixel
distance across seeds for loosely specified prompts, beside the same figure for rendered
training scenes matching those prompts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.scorer import Detection, score_image
from training.shapes import (COLORS, HELD_OUT, OPPOSITE, POSITIONS, SHAPES, SIZES, Obj,
                             Scene, describe, random_background, random_scene, render)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    kind: str  # "single" | "two" | "held_out"
    scene: Scene
    prompt: str
    seed: int


def eval_cases(n: int = 256, seed: int = 2024) -> list[Case]:
    """A fixed rule: 5/8 one-object held-in, 3/16 one-object held-out, 3/16 two-object."""
    rng = random.Random(seed)
    n_held, n_two = 3 * n // 16, 3 * n // 16
    cases = []
    held = sorted(HELD_OUT)
    for i in range(n):
        if i < n_held:
            color, shape = held[i % len(held)]
            obj = Obj(shape, color, rng.choice(SIZES), rng.choice(POSITIONS))
            kind, objects = "held_out", (obj,)
        elif i < n_held + n_two:
            first = rng.choice(list(OPPOSITE))
            a = _held_in(rng, first)
            b = _held_in(rng, OPPOSITE[first])
            while b.color == a.color:
                b = _held_in(rng, OPPOSITE[first])
            kind, objects = "two", (a, b)
        else:
            kind, objects = "single", (_held_in(rng, rng.choice(POSITIONS)),)
        scene = Scene(objects, random_background(rng, objects))
        cases.append(Case(kind, scene, describe(scene), rng.randrange(2**32)))
    return cases


def _held_in(rng: random.Random, position: str) -> Obj:
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in HELD_OUT:
            return Obj(shape, color, rng.choice(SIZES), position)


def shuffled_cases(n: int = 16, seed: int = 7) -> list[Case]:
    """The first n of a seeded shuffle of the full evaluation set (the service test's rule)."""
    cases = eval_cases()
    random.Random(seed).shuffle(cases)
    return cases[:n]


def judge(case: Case, det: Detection) -> dict:
    """Per-attribute correctness of one image against its case."""
    found = {o.position: o for o in det.objects}
    out = {"background": det.background == case.scene.background}
    if case.kind == "two":
        out["both"] = all((o.position in found and found[o.position].color == o.color
                           and found[o.position].shape == o.shape) for o in case.scene.objects)
        return out
    want = case.scene.objects[0]
    got = det.objects[0] if det.objects else None
    for attr in ("color", "shape", "position", "size"):
        out[attr] = got is not None and getattr(got, attr) == getattr(want, attr)
    out["pair"] = out["color"] and out["shape"]
    return out


def summarize(cases: list[Case], verdicts: list[dict]) -> dict:
    def rate(kind: str, key: str) -> float:
        vals = [v[key] for c, v in zip(cases, verdicts) if c.kind == kind]
        return round(float(np.mean(vals)), 4) if vals else float("nan")

    return {
        "color": rate("single", "color"), "shape": rate("single", "shape"),
        "position": rate("single", "position"), "size": rate("single", "size"),
        "background": round(float(np.mean([v["background"] for v in verdicts])), 4),
        "two_object_both": rate("two", "both"), "held_out_pair": rate("held_out", "pair"),
        "held_out_color": rate("held_out", "color"), "held_out_shape": rate("held_out", "shape"),
        "n": len(cases),
    }


# ---------------------------------------------------------------- generation


def report(result: dict, out: Path | None) -> None:
    """Print an evaluation's JSON result, and write it to `out` if given."""
    print(json.dumps(result, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def load_model(model_id: str, registry: Path):
    from engines import loader
    from engines.registry import load_registry

    models = load_registry(registry)
    return loader.load_with_guide(models, models.get(model_id))


@dataclass(frozen=True)
class Sampling:
    """How the evaluation generates: sampler, steps, schedule and guidance."""

    sampler: str
    steps: int
    guidance_scale: float
    schedule: str = "default"
    guidance: str = "cfg"
    interval_fraction: tuple[float, float] | None = None


def generate(model, prompts: list[str], seeds: list[int], how: Sampling, batch: int = 16,
             size: tuple[int, int] = (64, 64), stats=None) -> np.ndarray:
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run

    out = []
    for i in range(0, len(prompts), batch):
        rows = [ImageRequest(p, "", s, how.guidance_scale, how.sampler, how.steps, how.schedule,
                             guidance=how.guidance, guidance_interval_fraction=how.interval_fraction)
                for p, s in zip(prompts[i : i + batch], seeds[i : i + batch])]
        out.append(run(model, Txt2ImgBatch(size[0], size[1], how.sampler, how.steps, rows), stats=stats).numpy())
    return np.concatenate(out)


DIVERSITY_PROMPTS = ["a red circle", "a blue square", "a small purple star", "an orange triangle",
                     "a cyan circle on the left", "a large pink square", "a yellow star",
                     "a green triangle at the top"]


def mean_pairwise(images: np.ndarray) -> float:
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    dists = [np.sqrt(((a - b) ** 2).mean()) for a, b in itertools.combinations(flat, 2)]
    return float(np.mean(dists))


def data_diversity(prompt: str, k: int, rng: random.Random, image_size: tuple[int, int] = (64, 64)) -> float:
    """The same figure for rendered scenes that fit a loosely specified prompt."""
    words = prompt.split()
    color = next(w for w in words if w in COLORS)
    shape = next(w for w in words if w in SHAPES)
    size = next((w for w in words if w in SIZES), None)
    position = next((w for w in words if w in POSITIONS), None)
    images = []
    for _ in range(k):
        obj = Obj(shape, color, size or rng.choice(SIZES), position or rng.choice(POSITIONS))
        images.append(render(Scene((obj,), random_background(rng, (obj,))), image_size, rng))
    return mean_pairwise(np.stack(images))


def evaluate(model, model_id: str, how: Sampling, n: int, size: tuple[int, int] = (64, 64)) -> dict:
    from engines.tasks.txt2img import RunStats

    cases = eval_cases(n)
    started = time.time()
    stats = RunStats()
    images = generate(model, [c.prompt for c in cases], [c.seed for c in cases], how, size=size, stats=stats)
    verdicts = [judge(c, score_image(img)) for c, img in zip(cases, images)]
    result = summarize(cases, verdicts)
    k, rng = 8, random.Random(99)
    gen_div, data_div = [], []
    for j, prompt in enumerate(DIVERSITY_PROMPTS):
        imgs = generate(model, [prompt] * k, [1000 * j + s for s in range(k)], how, size=size)
        gen_div.append(mean_pairwise(imgs))
        data_div.append(data_diversity(prompt, k, rng, size))
    result["diversity"] = round(float(np.mean(gen_div)), 4)
    result["diversity_data"] = round(float(np.mean(data_div)), 4)
    result["diversity_ratio"] = round(result["diversity"] / result["diversity_data"], 3)
    result.update(model=model_id, image_size=f"{size[0]}x{size[1]}", sampler=how.sampler, steps=how.steps,
                  schedule=how.schedule, guidance=how.guidance, guidance_scale=how.guidance_scale,
                  interval_fraction=how.interval_fraction, denoiser_rows_per_image=round(stats.denoiser_rows / n, 2),
                  seconds=round(time.time() - started, 1))
    return result


# ---------------------------------------------------------------- scorer validation


@torch.no_grad()
def vae_round_trip(vae_dir: Path, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3] encoded (the latent's mode) and decoded by the VAE in `vae_dir`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = torch.cat([vae(x[i : i + chunk], sample_posterior=False).sample for i in range(0, len(x), chunk)])
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def validate_scorer(vae_dir: Path | None, n: int = 512, size: tuple[int, int] = (64, 64)) -> dict:
    """Scorer accuracy on rendered ground truth and (with a VAE) on its reconstructions."""
    rng = random.Random(5)
    scenes = [random_scene(rng, two_objects=0.3) for _ in range(n)]
    images = np.stack([render(s, size, rng) for s in scenes])
    sets = {"rendered": images}
    if vae_dir is not None:
        sets["vae_reconstruction"] = vae_round_trip(vae_dir, images)
    out = {}
    for name, imgs in sets.items():
        right = {"color": [], "shape": [], "size": [], "position": [], "background": []}
        for scene, img in zip(scenes, imgs):
            det = score_image(img)
            right["background"].append(det.background == scene.background)
            found = {o.position: o for o in det.objects}
            for obj in scene.objects:
                got = found.get(obj.position)
                right["position"].append(got is not None)
                for attr in ("color", "shape", "size"):
                    right[attr].append(got is not None and getattr(got, attr) == getattr(obj, attr))
        out[name] = {k: round(float(np.mean(v)), 4) for k, v in right.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="registry id")
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--guidance-mode", help="cfg | autoguidance | apg | none (default: the model's)")
    parser.add_argument("--interval-fraction", type=float, nargs=2, help="guide only steps start <= i/N < end")
    parser.add_argument("--schedule", help="default: the model's")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", default="64x64", help="WxH")
    parser.add_argument("--validate-scorer", action="store_true")
    parser.add_argument("--vae", type=Path)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    if args.validate_scorer:
        result = validate_scorer(args.vae)
    else:
        from engines.registry import load_registry

        spec = load_registry(args.registry).get(args.model)
        model = load_model(spec.id, args.registry)
        width, height = (int(v) for v in args.size.lower().split("x"))
        d = spec.defaults
        how = Sampling(args.sampler or d.sampler, args.steps or d.steps,
                       d.guidance_scale if args.guidance is None else args.guidance, args.schedule or d.schedule,
                       args.guidance_mode or d.guidance,
                       tuple(args.interval_fraction) if args.interval_fraction else None)
        result = evaluate(model, spec.id, how, args.n, (width, height))
    report(result, args.out)


if __name__ == "__main__":
    main()
