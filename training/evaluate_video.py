"""Score a text-to-video model on the shapes domain, through the serving engines.

    python -m training.evaluate_video --model shapes-video --n 128 --out models/shapes-video/eval/txt2video.json

Clips are drawn as training draws them (one object moving left / right / up / down, or still;
a fifth still), prompted with their canonical caption ("a small red circle moving right on a
blue background"), generated at the model's defaults. The scorer (training.clips.read_clip:
training.scorer per frame, the object's centroid track, a line fitted through it) reports:
- per-frame color and shape: the share of frames whose largest object has the asked color and
  shape (and the clip-level majority, with size and background beside it);
- motion: of the moving prompts, the share read as the asked direction whose object travels at
  least a quarter of the frame along it; of the still prompts, the share read as still;
- the same object (color and shape, one object, same background) in every frame.
The same scorer's figures on the rendered clips themselves are reported beside (its ceiling), and
with `--vae-ceiling` on the rendered clips passed through the model's VAE (the ceiling its latent
space puts on a denoiser).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engines.guidance import MODES
from training.clips import DIRECTIONS, Clip, describe_clip, random_clip, read_clip, render_clip, score_reading
from training.evaluate import ROOT, report, vae_round_trip

MIN_TRAVEL = 0.25  # a moving clip counts only if its object travels this far (fraction of the frame)


def eval_clips(n: int, seed: int = 17) -> list[Clip]:
    rng = random.Random(seed)
    return [random_clip(rng) for _ in range(n)]


@dataclass(frozen=True)
class Sampling:
    """The sampling a run uses and reports."""

    sampler: str
    steps: int
    guidance_scale: float
    guidance: str
    free_init_iterations: int


def settings(model, sampling: dict) -> Sampling:
    """`sampling`'s keys over the model's defaults."""
    d = model.spec.defaults
    return Sampling(sampling.get("sampler", d.sampler), sampling.get("steps", d.steps),
                    sampling.get("guidance_scale", d.guidance_scale), sampling.get("guidance", d.guidance),
                    sampling.get("free_init", 1))


def generate(model, prompts: list[str], frames: int, batch: int = 4, seed: int = 5000, **sampling) -> np.ndarray:
    """uint8 [n, F, H, W, 3] through engines.tasks.video at the model's defaults (or `sampling`)."""
    from engines.tasks import video
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch

    d, s = model.spec.defaults, settings(model, sampling)
    out = []
    for i in range(0, len(prompts), batch):
        rows = [ImageRequest(p, "", seed + i + k, s.guidance_scale, s.sampler, s.steps, guidance=s.guidance)
                for k, p in enumerate(prompts[i:i + batch])]
        job = video.VideoBatch(Txt2ImgBatch(d.width, d.height, s.sampler, s.steps, rows), frames,
                               free_init=s.free_init_iterations)
        out.append(video.run(model, job).numpy())
    return np.concatenate(out)


def score(clips: list[Clip], videos: np.ndarray) -> dict:
    frame_ok, majority, moving, still, same = [], {"color": [], "shape": [], "size": [], "background": []}, [], [], []
    for clip, frames in zip(clips, videos):
        reading = read_clip(frames)
        frame_ok += [bool(d.objects) and (d.objects[0].color, d.objects[0].shape) == (clip.obj.color, clip.obj.shape)
                     for d in reading.frames]
        scored = score_reading(reading, clip)
        for attr in majority:
            majority[attr].append(scored[attr])
        if clip.motion == "still":
            still.append(reading.motion == "still")
        else:
            dx, dy = reading.displacement
            along = dx * DIRECTIONS[clip.motion][0] + dy * DIRECTIONS[clip.motion][1]
            moving.append(reading.motion == clip.motion and along >= MIN_TRAVEL)
        same.append(scored["consistent"])
    rate = lambda xs: round(float(np.mean(xs)), 4) if xs else None  # noqa: E731
    return {"per_frame_color_and_shape": rate(frame_ok),
            "clip_majority": {k: rate(v) for k, v in majority.items()},
            "motion_direction": rate(moving), "moving_clips": len(moving),
            "still_scored_still": rate(still), "still_clips": len(still),
            "same_object_every_frame": rate(same)}


def evaluate(model, n: int, frames: int, clip_seed: int = 17, vae_ceiling: bool = False,
             **sampling) -> tuple[dict, np.ndarray]:
    started = time.perf_counter()
    clips = eval_clips(n, clip_seed)
    videos = generate(model, [describe_clip(c) for c in clips], frames, **sampling)
    rendered = np.stack([render_clip(c, frames) for c in clips])
    d = model.spec.defaults
    result = {"n": n, "frames": frames, "size": f"{d.width}x{d.height}", "clip_seed": clip_seed,
              "sampling": asdict(settings(model, sampling)),
              "model": score(clips, videos),
              "rendered_clips": score(clips, rendered)}
    if vae_ceiling:
        frames_through_vae = vae_round_trip(Path(model.spec.path) / "vae", rendered.reshape(-1, *rendered.shape[2:]))
        result["rendered_clips_through_vae"] = score(clips, frames_through_vae.reshape(rendered.shape))
    return {**result, "elapsed_s": round(time.perf_counter() - started, 1)}, videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.json")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--clip-seed", type=int, default=17, help="another seed: a tuning set apart from the scored one")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--guidance", choices=MODES, help="the guidance mode (default: the model's)")
    parser.add_argument("--free-init", type=int, help="FreeInit passes (the request's free_init_iterations)")
    parser.add_argument("--vae-ceiling", action="store_true", help="also score the rendered clips through the VAE")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--gif", type=Path, help="write the first clips here as one animated GIF grid")
    args = parser.parse_args()
    from engines.registry import load_registry
    from engines.tasks import video

    model = video.load(load_registry(args.registry).get(args.model))
    sampling = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                  ("guidance", args.guidance), ("free_init", args.free_init)) if v is not None}
    result, videos = evaluate(model, args.n, args.frames, args.clip_seed, args.vae_ceiling, **sampling)
    report({"model_id": args.model, **result}, args.out)
    if args.gif:
        write_grid_gif(videos[:8], args.gif)


def write_grid_gif(videos: np.ndarray, path: Path, columns: int = 4) -> None:
    """[k, F, H, W, 3] as one looping GIF, clips side by side (k padded to whole rows)."""
    from PIL import Image

    k, f, h, w, c = videos.shape
    rows = -(-k // columns)
    grid = np.zeros((f, rows * h, columns * w, c), np.uint8)
    for i, clip in enumerate(videos):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = clip
    frames = [Image.fromarray(g).resize((columns * w * 2, rows * h * 2), Image.Resampling.NEAREST) for g in grid]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)


if __name__ == "__main__":
    main()
