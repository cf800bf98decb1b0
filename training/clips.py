"""Clips of the shapes domain for text-to-video: one object moving in a straight line (left,
right, up, down) or still, its caption, and a scorer that reads a clip back from pixels.

A clip is a single-object scene of training/shapes.py whose centre moves linearly from
`start` to `end` over the frames (by 0.30-0.45 of the frame for a moving clip, so at least a
quarter; not at all for a still one), drawn by the same anti-aliased renderer, so every frame
is an image of the image domain. Everything is decided by the seeded generator.

Captions say the object as the image captions do ("a small red circle"), then its motion
("moving right", "moving to the right"; a still clip: "still", or a position as the image
captions give one), then maybe the background. "moving", "up", "down" and "still" are not in
the image model's vocabulary: the video trainer adds them (MOTION_WORDS).

The scorer reads every frame with training.scorer (background, color, shape, size), tracks the
object's centroid and calls the motion from the line fitted through the track.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from training.scorer import Detection, rgb_to_lab, score_image
# The image captions' phrase builders, so clips say objects and backgrounds in the same words.
from training.shapes import (ANCHORS, COLORS, JITTER, NEUTRALS, POSITIONS, RADIUS, Obj, Size, _background_phrase,
                             _object_phrase, draw_shape, random_background, random_object, width_height)

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOTIONS = (*DIRECTIONS, "still")
MOTION_WORDS = ("moving", "up", "down", "still")  # words the image vocabulary lacks
TRAVEL = (0.30, 0.45)  # a moving centre's path, fraction of the frame along its axis
BOUNDS = (0.25, 0.75)  # where a moving centre stays (a large star still fits inside the frame)
STILL_LIMIT = 0.06  # the scorer: a fitted displacement below this (fraction of the frame) is still
MOVE_MIN = 0.125  # ... and one above this along one axis is motion (half the least travel)


@dataclass(frozen=True)
class Clip:
    obj: Obj  # position: a still object's anchor; a moving one's is unused
    background: str
    motion: str  # a DIRECTIONS key or "still"
    start: tuple[float, float]  # the centre in the first frame, fractions of width and height
    end: tuple[float, float]  # ... and in the last

    def centre(self, k: int, frames: int) -> tuple[float, float]:
        w = k / max(frames - 1, 1)
        return (self.start[0] + w * (self.end[0] - self.start[0]), self.start[1] + w * (self.end[1] - self.start[1]))


def random_clip(rng: random.Random, still: float = 0.2, small_share: float | None = None) -> Clip:
    """A training clip: still with probability `still`, else one of the four directions; its
    object small with probability `small_share` where one is given (else as the image domain
    draws sizes, half and half: the same clips as always, for the scored sets)."""
    clip = _random_clip(rng, still)
    if small_share is None:
        return clip
    size = "small" if rng.random() < small_share else "large"
    return replace(clip, obj=replace(clip.obj, size=size))


def _random_clip(rng: random.Random, still: float) -> Clip:
    if rng.random() < still:
        obj = random_object(rng, rng.choice(POSITIONS))
        fx, fy = ANCHORS[obj.position]
        centre = (fx + rng.uniform(-JITTER, JITTER), fy + rng.uniform(-JITTER, JITTER))
        return Clip(obj, random_background(rng, (obj,)), "still", centre, centre)
    motion = rng.choice(list(DIRECTIONS))
    obj = random_object(rng, "center")
    dx, dy = DIRECTIONS[motion]
    travel = rng.uniform(*TRAVEL)
    lo, hi = BOUNDS
    along = rng.uniform(lo, hi - travel)  # the path's low end on its axis
    across = rng.uniform(lo, hi)
    a, b = (along, along + travel) if dx + dy > 0 else (along + travel, along)
    start, end = ((a, across), (b, across)) if dx else ((across, a), (across, b))
    return Clip(obj, random_background(rng, (obj,)), motion, start, end)


def render_clip(clip: Clip, frames: int, size: Size = 64) -> np.ndarray:
    """uint8 [frames, height, width, 3], each frame drawn as training.shapes.render draws (4x, box-filtered)."""
    scale = 4
    width, height = width_height(size)
    w, h = width * scale, height * scale
    out = []
    for k in range(frames):
        image = Image.new("RGB", (w, h), COLORS.get(clip.background) or NEUTRALS[clip.background])
        fx, fy = clip.centre(k, frames)
        draw_shape(ImageDraw.Draw(image), clip.obj.shape, fx * w, fy * h, RADIUS[clip.obj.size] * min(w, h),
                   COLORS[clip.obj.color])
        out.append(np.asarray(image.resize((width, height), Image.Resampling.BOX)))
    return np.stack(out)


def motion_phrase(rng: random.Random, motion: str) -> str:
    if motion == "still":
        return "still"
    if motion in ("left", "right") and rng.random() < 0.4:
        return f"moving to the {motion}"
    return f"moving {motion}"


def clip_caption(clip: Clip, rng: random.Random) -> str:
    """The object (size said or not), its motion, maybe the background. A still clip says
    "still" or, like an image caption, maybe its position."""
    say_position = clip.motion == "still" and rng.random() < 0.5
    phrase = _object_phrase(rng, clip.obj, {"size": rng.random() < 0.6, "position": say_position})
    if not say_position and (clip.motion != "still" or rng.random() < 0.7):
        phrase += " " + motion_phrase(rng, clip.motion)
    if rng.random() < 0.6:
        bg = _background_phrase(rng, clip.background)
        phrase = f"{phrase} {bg}" if rng.random() < 0.7 else f"{bg} , {phrase}"
    return phrase


def training_clip(rng: random.Random, frames: int, size: Size = 64) -> tuple[np.ndarray, str]:
    clip = random_clip(rng)
    return render_clip(clip, frames, size), clip_caption(clip, rng)


def describe_clip(clip: Clip) -> str:
    """The canonical full caption (evaluation prompts)."""
    o = clip.obj
    motion = "still" if clip.motion == "still" else f"moving {clip.motion}"
    return f"a {o.size} {o.color} {o.shape} {motion} on a {clip.background} background"


# ---------------------------------------------------------------- reading clips back


@dataclass(frozen=True)
class ClipReading:
    frames: tuple[Detection, ...]  # training.scorer's reading of each frame (the largest object)
    track: np.ndarray  # [F, 2] the object's centroid per frame, fractions of width / height (nan: none)
    displacement: tuple[float, float]  # first to last frame along the line fitted through the track
    motion: str  # a DIRECTIONS key, "still", or "unclear"

    @property
    def consistent(self) -> bool:
        """One object of the same color and shape on the same background in every frame."""
        seen = {(d.background, *((d.objects[0].color, d.objects[0].shape) if d.objects else ())) for d in self.frames}
        return len(seen) == 1 and all(len(d.objects) == 1 for d in self.frames)

    def majority(self, attribute: str) -> str | None:
        values = [getattr(d.objects[0], attribute) for d in self.frames if d.objects]
        return max(set(values), key=values.count) if values else None


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """The largest object's centroid (fractions), separated from the background as the scorer does."""
    lab = rgb_to_lab(frame)
    border = np.concatenate([lab[:2].reshape(-1, 3), lab[-2:].reshape(-1, 3),
                             lab[:, :2].reshape(-1, 3), lab[:, -2:].reshape(-1, 3)])
    labels, count = ndimage.label(np.linalg.norm(lab - np.median(border, axis=0), axis=-1) > 12)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(np.ones(labels.shape), labels, index=np.arange(1, count + 1))
    cy, cx = ndimage.center_of_mass(labels == int(np.argmax(sizes)) + 1)
    height, width = frame.shape[:2]
    return (cx + 0.5) / width, (cy + 0.5) / height


def call_motion(dx: float, dy: float) -> str:
    if max(abs(dx), abs(dy)) < STILL_LIMIT:
        return "still"
    if abs(dx) >= MOVE_MIN and abs(dx) > 2 * abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) >= MOVE_MIN and abs(dy) > 2 * abs(dx):
        return "down" if dy > 0 else "up"
    return "unclear"


def read_clip(frames: np.ndarray) -> ClipReading:
    """uint8 [F, H, W, 3] -> what the clip shows."""
    detections = tuple(score_image(f, max_objects=2) for f in frames)
    track = np.array([c if (c := centroid(f)) is not None else (np.nan, np.nan) for f in frames])
    found = ~np.isnan(track[:, 0])
    if found.sum() < 2:
        return ClipReading(detections, track, (0.0, 0.0), "unclear")
    k = np.arange(len(frames))[found]
    span = len(frames) - 1
    dx, dy = (float(np.polyfit(k, track[found, i], 1)[0] * span) for i in range(2))
    return ClipReading(detections, track, (dx, dy), call_motion(dx, dy))


def score_clip(frames: np.ndarray, clip: Clip) -> dict[str, bool]:
    """Per attribute, whether the clip shows what `clip` asks (color, shape, size by majority of frames)."""
    return score_reading(read_clip(frames), clip)


def score_reading(reading: ClipReading, clip: Clip) -> dict[str, bool]:
    """score_clip over a clip already read."""
    out = {attr: reading.majority(attr) == getattr(clip.obj, attr) for attr in ("color", "shape", "size")}
    backgrounds = [d.background for d in reading.frames]
    out["background"] = max(set(backgrounds), key=backgrounds.count) == clip.background
    out["motion"] = reading.motion == clip.motion
    out["consistent"] = reading.consistent
    return out


def validate_clip_scorer(n: int = 64, frames: int = 8, size: Size = 64, seed: int = 5) -> dict[str, float]:
    """The scorer's accuracy per attribute on rendered clips (ground truth)."""
    rng = random.Random(seed)
    right: dict[str, list[bool]] = {}
    for _ in range(n):
        clip = random_clip(rng)
        for attr, ok in score_clip(render_clip(clip, frames, size), clip).items():
            right.setdefault(attr, []).append(ok)
    return {k: round(float(np.mean(v)), 4) for k, v in right.items()}
