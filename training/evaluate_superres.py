"""Score an x4 upscaler on the shapes domain, through the serving engines.

    python -m training.evaluate_superres --model shapes-x4 --n 128 --out models/shapes-x4/eval/superres.json

Scenes are rendered at the output size (the ground truth) and box-downsampled x4 (what a
render at the low size is): the model upscales the low-res image, captioned as training
captions its scenes. Reported:
- PSNR of the upscaled image against the ground-truth render, as the service returns it
  (back-projected onto the input: engines.tasks.superres.back_project) and the model's alone
  (diffusers' pipeline's image), beside bicubic upscaling's, plain and back-projected, and
  each one's gradient energy against the render's (above 1: edges or mottling the render has
  not; below 1: blur);
- agreement: the scorer's (color, shape) of every object read at the output size equals what
  it reads from the low-res input (the upscaler keeps the scene);
- tiling: 128x128 -> 512x512 scenes denoised in windows (the model's registry `tile`) and
  untiled, each's PSNR against its 512x512 render (the issue asks within 0.5 dB).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from engines.registry import DEFAULT_NOISE_LEVEL
from engines.tasks.superres import BACK_PROJECTION_ROUNDS, back_project
from training.evaluate import ROOT, report
from training.evaluate_tasks import psnr
from training.scorer import score_image
from training.shapes import caption, random_scene, render


def scenes(n: int, side: int, seed: int = 41) -> tuple[np.ndarray, list[str]]:
    """Ground-truth renders at `side` and their captions (held-in scenes, as training's)."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        text, scene = caption(random_scene(rng), rng)
        images.append(render(scene, side, rng))
        captions.append(text)
    return np.stack(images), captions


def downsample(images: np.ndarray) -> np.ndarray:
    """x4 box downsampling, as a render at the low size is made."""
    n, h, w, c = images.shape
    return images.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)).round().astype(np.uint8)


def bicubic(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(i).resize((i.shape[1] * 4, i.shape[0] * 4), Image.Resampling.BICUBIC))
                     for i in images])


def upscale(model, low: np.ndarray, captions: list[str], batch: int = 8, seed: int = 1000,
            noise_level: int = DEFAULT_NOISE_LEVEL) -> np.ndarray:
    from engines.tasks import img2img, superres
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch

    d = model.spec.defaults
    out = []
    for i in range(0, len(low), batch):
        chunk = low[i:i + batch]
        requests = [ImageRequest(c, "", seed + i + k, d.guidance_scale, d.sampler, d.steps)
                    for k, c in enumerate(captions[i:i + batch])]
        job = superres.SuperresBatch(Txt2ImgBatch(chunk.shape[2] * 4, chunk.shape[1] * 4, d.sampler, d.steps, requests),
                                     img2img.pixels_to_tensor(chunk), [noise_level] * len(chunk))
        out.append(superres.run(model, job).numpy())
    return np.concatenate(out)


def gradient_energy(images: np.ndarray, truth: np.ndarray) -> float:
    """Mean Sobel gradient magnitude over the truth's (mean over images): above 1, the images
    carry edges or mottling the render has not; below 1, they are blurred."""
    def magnitude(x: np.ndarray) -> float:
        gray = x.astype(np.float32).mean(-1)
        return float(np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)).mean())
    return float(np.mean([magnitude(o) / magnitude(t) for o, t in zip(images, truth)]))


def objects(image: np.ndarray) -> list[tuple[str, str]]:
    return sorted((o.color, o.shape) for o in score_image(image, 2).objects)


def evaluate(model, n: int, n_tiled: int, scene_seed: int = 41, noise_level: int = DEFAULT_NOISE_LEVEL) -> dict:
    started = time.perf_counter()
    truth, captions = scenes(n, model.spec.defaults.width, scene_seed)
    low = downsample(truth)
    model_only, cubic = upscale(model, low, captions, noise_level=noise_level), bicubic(low)
    ours = back_project(model_only, low)  # what the service returns by default
    rows = {"ours": ours, "model_alone": model_only, "bicubic": cubic, "bicubic_back_projected": back_project(cubic, low)}
    db = {name: [psnr(o, t) for o, t in zip(images, truth)] for name, images in rows.items()}
    agree = [objects(o) == objects(lo) for o, lo in zip(ours, low)]
    result = {
        "n": n, "scene_seed": scene_seed, "size": f"{low.shape[2]}x{low.shape[1]} -> {truth.shape[2]}x{truth.shape[1]}",
        "psnr_db": {**{f"{name}_mean": round(float(np.mean(v)), 2) for name, v in db.items()},
                    **{f"{name}_median": round(float(np.median(v)), 2) for name, v in db.items()}},
        "gradient_energy_vs_truth": {name: round(gradient_energy(images, truth), 3) for name, images in rows.items()},
        "scorer_agrees_with_low_res": round(float(np.mean(agree)), 4),
        "sampling": {"sampler": model.spec.defaults.sampler, "steps": model.spec.defaults.steps,
                     "guidance_scale": model.spec.defaults.guidance_scale, "noise_level": noise_level,
                     "back_projection_rounds": BACK_PROJECTION_ROUNDS},
    }
    mean = result["psnr_db"]
    result["psnr_db"]["gain_over_bicubic"] = round(mean["ours_mean"] - mean["bicubic_mean"], 2)
    result["psnr_db"]["model_alone_gain_over_bicubic"] = round(mean["model_alone_mean"] - mean["bicubic_mean"], 2)
    if n_tiled and model.spec.tile:
        big, big_captions = scenes(n_tiled, 512, seed=43)
        big_low = downsample(big)
        tiled = back_project(upscale(model, big_low, big_captions, batch=2, noise_level=noise_level), big_low)
        untiled = replace(model, spec=replace(model.spec, tile=0))
        whole = back_project(upscale(untiled, big_low, big_captions, batch=2, noise_level=noise_level), big_low)
        t_db = float(np.mean([psnr(o, t) for o, t in zip(tiled, big)]))
        u_db = float(np.mean([psnr(o, t) for o, t in zip(whole, big)]))
        result["tiling"] = {"n": n_tiled, "size": "128x128 -> 512x512", "tile": model.spec.tile,
                            "tiled_psnr_db": round(t_db, 2), "untiled_psnr_db": round(u_db, 2),
                            "difference_db": round(t_db - u_db, 2)}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--n-tiled", type=int, default=16, help="128x128 -> 512x512 scenes, tiled and untiled")
    parser.add_argument("--scene-seed", type=int, default=41, help="another seed: a tuning set apart from the scored one")
    parser.add_argument("--steps", type=int, help="instead of the model's default")
    parser.add_argument("--noise-level", type=int, default=DEFAULT_NOISE_LEVEL)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    from engines import loader
    from engines.registry import load_registry

    spec = load_registry(args.registry).get(args.model)
    if args.steps:
        spec = replace(spec, defaults=replace(spec.defaults, steps=args.steps))
    result = {"model": args.model, **evaluate(loader.load(spec), args.n, args.n_tiled, args.scene_seed, args.noise_level)}
    report(result, args.out)


if __name__ == "__main__":
    main()
