"""Score the image-conditioned tasks on the shapes domain, through the serving engines.

    python -m training.evaluate_tasks --model shapes-ldm --task img2img --n 128
    python -m training.evaluate_tasks --model shapes-inpaint --task inpaint --n 128
    python -m training.evaluate_tasks --model shapes-mmdit --task inpaint --n 128   # training-free path

img2img: one-object scenes, each prompted with the same scene in another (held-in) color, at
strengths 0.2 ... 1.0: the mean pixel distance from the input (it should grow with strength)
and how often the prompt's color wins (the largest object read back has it).
inpaint: a one-object scene with its object on the left, the right half masked, the prompt
the full two-object caption with a named object on the right: how often the right half then
holds an object of the asked color and shape (scorer), and, before compositing, how close
the kept half stays to the input (PSNR; after compositing it is exact by construction).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.evaluate import ROOT, load_model, report
from training.scorer import score_image
from training.shapes import COLORS, HELD_OUT, SHAPES, SIZES, Obj, Scene, describe, random_background, render

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Case:
    scene: Scene  # the input
    target: Obj  # what the prompt asks for (img2img: the recoloured object; inpaint: the new one)
    prompt: str
    seed: int


def _held_in(rng: random.Random, position: str, avoid: str | None = None) -> Obj:
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in HELD_OUT and color != avoid:
            return Obj(shape, color, rng.choice(SIZES), position)


def cases(task: str, n: int, seed: int = 31) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if task == "img2img":
            obj = _held_in(rng, rng.choice(("left", "right", "top", "bottom", "center")))
            scene = Scene((obj,), random_background(rng, (obj,)))
            target = replace(obj, color=_held_in(rng, obj.position, avoid=obj.color).color)
            while target.color == scene.background:
                target = replace(obj, color=_held_in(rng, obj.position, avoid=obj.color).color)
            out.append(Case(scene, target, describe(Scene((target,), scene.background)), 1000 + i))
        else:
            left = _held_in(rng, "left")
            right = _held_in(rng, "right", avoid=left.color)
            background = random_background(rng, (left, right))
            scene = Scene((left,), background)
            out.append(Case(scene, right, describe(Scene((left, right), background)), 1000 + i))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def run_batches(model, task: str, items: list[Case], images: np.ndarray, steps: int, guidance: float,
                sampler: str, strength: float = 1.0, masks: np.ndarray | None = None, batch: int = 16) -> np.ndarray:
    from engines.tasks import img2img, inpaint
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch

    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        requests = [ImageRequest(c.prompt, "", c.seed, guidance, sampler, steps) for c in chunk]
        size = Txt2ImgBatch(64, 64, sampler, steps, requests)
        pixels = img2img.pixels_to_tensor(images[i:i + batch])
        if task == "img2img":
            job = img2img.Img2ImgBatch(size, pixels, [strength] * len(chunk))
            out.append(img2img.run(model, job).numpy())
        else:
            job = inpaint.InpaintBatch(size, pixels, inpaint.mask_to_tensor(masks[i:i + batch]))
            out.append(inpaint.run(model, job).numpy())
    return np.concatenate(out)


def evaluate(model, task: str, n: int) -> dict:
    from engines.tasks import inpaint

    d = model.spec.defaults
    items = cases(task, n)
    rng = random.Random(5)
    inputs = np.stack([render(c.scene, 64, rng) for c in items])
    args = dict(steps=d.steps, guidance=d.guidance_scale, sampler=d.sampler)
    if task == "img2img":
        rows = []
        for strength in STRENGTHS:
            out = run_batches(model, task, items, inputs, strength=strength, **args)
            wins = [any(o.color == c.target.color for o in score_image(img, 1).objects) for img, c in zip(out, items)]
            rows.append({"strength": strength, "mean_abs_diff": round(float(np.abs(out.astype(int) - inputs).mean()), 2),
                         "prompt_color_wins": round(float(np.mean(wins)), 4)})
        diffs = [r["mean_abs_diff"] for r in rows]
        return {"strengths": rows, "monotone": all(a < b for a, b in zip(diffs, diffs[1:])),
                "color_wins_at_0.8_plus": round(float(np.mean([r["prompt_color_wins"] for r in rows
                                                               if r["strength"] >= 0.8])), 4)}
    masks = np.zeros((n, 64, 64), np.uint8)
    masks[:, :, 32:] = 255
    raw = run_batches(model, task, items, inputs, masks=masks, **args)
    held, kept = [], []
    for raw_img, src, mask, c in zip(raw, inputs, masks, items):
        final = inpaint.composite(src, raw_img, mask)
        found = [o for o in score_image(final, 2).objects
                 if o.position in ("right",) and o.color == c.target.color and o.shape == c.target.shape]
        held.append(bool(found))
        kept.append(psnr(raw_img[:, :28], src[:, :28]))  # before compositing, away from the seam
    return {"right_half_holds_the_asked_object": round(float(np.mean(held)), 4),
            "kept_half_psnr_before_compositing_db": round(float(np.median(kept)), 2),
            "kept_half_exact_after_compositing": True, "path": "dedicated" if inpaint.dedicated(model) else "training-free"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", choices=("img2img", "inpaint"), required=True)
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    started = time.time()
    model = load_model(args.model, args.registry)
    result = {"model": args.model, "task": args.task, "n": args.n, **evaluate(model, args.task, args.n),
              "seconds": round(time.time() - started, 1)}
    report(result, args.out)


if __name__ == "__main__":
    main()
