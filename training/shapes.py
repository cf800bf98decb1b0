"""The synthetic "shapes" domain: scenes, their rendering and their captions.

A scene is one object, or two at opposite positions, on a plain background. Every attribute
has a fixed vocabulary so generated images can be scored (training/scorer.py). Rendering is
anti-aliased by drawing at 4x with Pillow and box-filtering down, at any resolution.
A fixed set of (color, shape) pairs is held out: it never appears in training images or
captions, only in evaluation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
}
NEUTRALS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# Object centres as fractions of the image's width and height; radii as fractions of its
# shorter side (so shapes keep their proportions on non-square images).
ANCHORS = {"left": (0.24, 0.5), "right": (0.76, 0.5), "top": (0.5, 0.24), "bottom": (0.5, 0.76),
           "center": (0.5, 0.5)}
RADIUS = {"small": 0.11, "large": 0.19}
JITTER = 0.03  # centre jitter, fraction of the width / height

HELD_OUT = frozenset({("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square")})

POSITION_PHRASES = {
    "left": ["on the left", "at the left", "left"],
    "right": ["on the right", "at the right", "right"],
    "top": ["at the top", "on top", "top"],
    "bottom": ["at the bottom", "on the bottom", "bottom"],
    "center": ["in the center", "in the middle", "centered", "center"],
}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str  # a NEUTRALS or COLORS name

    def background_rgb(self) -> tuple[int, int, int]:
        return NEUTRALS.get(self.background) or COLORS[self.background]


# ---------------------------------------------------------------- rendering


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill=255) -> None:
    """Draw one shape centred at (cx, cy) with radius r (pixels of `draw`'s canvas)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # similar area to the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx + h * 0.95, cy + h * 0.75), (cx - h * 0.95, cy + h * 0.75)], fill=fill)
    else:
        draw.polygon(_star(cx, cy, r * 1.15), fill=fill)


Size = int | tuple[int, int]  # a side, or (width, height)


def width_height(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def render(scene: Scene, size: Size = 64, rng: random.Random | None = None) -> np.ndarray:
    """uint8 [height, width, 3]. `rng` jitters object centres (None: exact anchors)."""
    scale = 4
    width, height = width_height(size)
    w, h = width * scale, height * scale
    image = Image.new("RGB", (w, h), scene.background_rgb())
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = ANCHORS[obj.position]
        if rng is not None:
            fx += rng.uniform(-JITTER, JITTER)
            fy += rng.uniform(-JITTER, JITTER)
        draw_shape(draw, obj.shape, fx * w, fy * h, RADIUS[obj.size] * min(w, h), COLORS[obj.color])
    return np.asarray(image.resize((width, height), Image.Resampling.BOX))


# ---------------------------------------------------------------- sampling scenes


def allowed(color: str, shape: str, held_out: bool) -> bool:
    return ((color, shape) in HELD_OUT) == held_out


def random_object(rng: random.Random, position: str, held_out: bool = False) -> Obj:
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if allowed(color, shape, held_out):
            return Obj(shape, color, rng.choice(SIZES), position)


def random_background(rng: random.Random, objects: tuple[Obj, ...]) -> str:
    used = {o.color for o in objects}
    options = list(NEUTRALS) * 3 + [c for c in COLORS if c not in used]
    return rng.choice(options)


def random_scene(rng: random.Random, two_objects: float = 0.3) -> Scene:
    """A training scene (never a held-out pair)."""
    if rng.random() < two_objects:
        first = rng.choice(list(OPPOSITE))
        objects = (random_object(rng, first), random_object(rng, OPPOSITE[first]))
        while objects[1].color == objects[0].color:
            objects = (objects[0], random_object(rng, OPPOSITE[first]))
    else:
        objects = (random_object(rng, rng.choice(POSITIONS)),)
    return Scene(objects, random_background(rng, objects))


# ---------------------------------------------------------------- captions


def _object_phrase(rng: random.Random, obj: Obj, say: dict[str, bool]) -> str:
    words = [rng.choice(["a", "a", "one", "the"])]
    if say["size"]:
        words.append(rng.choice({"small": ["small", "tiny"], "large": ["large", "big"]}[obj.size]))
    words += [obj.color, obj.shape]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    phrase = " ".join(words)
    if say["position"]:
        phrase += " " + rng.choice(POSITION_PHRASES[obj.position])
    return phrase


def _background_phrase(rng: random.Random, background: str) -> str:
    name = "grey" if background == "gray" and rng.random() < 0.3 else background
    return rng.choice([f"on a {name} background", f"{name} background", f"on {name}",
                       f"with a {name} background"])


def caption(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    """A caption for the scene, and the scene as the caption constrains it: attributes the
    caption omits are re-drawn at random (so the image varies where the text is silent)."""
    say = {"size": rng.random() < 0.6, "position": rng.random() < 0.7 or len(scene.objects) == 2}
    say_background = rng.random() < 0.6
    objects = scene.objects
    if not say["size"]:
        objects = tuple(Obj(o.shape, o.color, rng.choice(SIZES), o.position) for o in objects)
    if not say["position"] and len(objects) == 1:
        objects = (Obj(objects[0].shape, objects[0].color, objects[0].size, rng.choice(POSITIONS)),)
    background = scene.background if say_background else random_background(rng, objects)
    phrases = [_object_phrase(rng, o, say) for o in objects]
    text = " and ".join(phrases)
    if say_background:
        bg = _background_phrase(rng, background)
        text = f"{text} {bg}" if rng.random() < 0.7 else f"{bg} , {text}"
    return text, Scene(objects, background)


def training_example(rng: random.Random, size: Size = 64) -> tuple[np.ndarray, str]:
    text, scene = caption(random_scene(rng), rng)
    return render(scene, size, rng), text


def describe(scene: Scene) -> str:
    """The canonical full caption (used for evaluation prompts)."""
    parts = [f"a {o.size} {o.color} {o.shape} {POSITION_PHRASES[o.position][0]}" for o in scene.objects]
    return " and ".join(parts) + f" on a {scene.background} background"
