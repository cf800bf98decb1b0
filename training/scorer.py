"""A deterministic scorer of shapes images: background, then each object's color, shape,
size and position, read from pixels alone.

- background: the median color of the image border;
- objects: pixels whose color differs from the background, as an alpha (how far each pixel
  goes from the background towards the object color, so anti-aliased edges count partly),
  split into connected components (scipy.ndimage);
- color: nearest palette color in CIE Lab (so pink and red part) of the object's core pixels;
- shape: the shape whose template, drawn by the renderer itself at the object's centroid and
  at the scale its area implies, overlaps the object's alpha best (soft IoU, over a few
  sub-pixel shifts and scales), so slightly blurred corners don't turn a square into a circle;
- size: the radius the area implies for that shape, as a fraction of the shorter side, against
  the midpoint of the two sizes;
- position: the nearest anchor to the alpha-weighted centroid, as fractions of width and height
  (so non-square images read as the renderer drew them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from training.shapes import ANCHORS, COLORS, NEUTRALS, RADIUS, Obj, draw_shape as _draw_shape

_NAMES = list(COLORS) + list(NEUTRALS)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 [..., 3] -> CIE Lab (D65)."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = rgb_to_lab(np.array([COLORS.get(n) or NEUTRALS[n] for n in _NAMES]))
_OBJECT_LAB = _PALETTE_LAB[: len(COLORS)]
# Area of each shape as drawn by training.shapes, in units of its radius squared.
_AREA_PER_R2 = {"circle": np.pi, "square": (2 * 0.85) ** 2, "triangle": 0.5 * 2 * 1.1 * 0.95 * 1.1 * 1.75,
                "star": 5 * 0.45 * np.sin(np.pi / 5) * 1.15**2}
_SIZE_SPLIT = float(np.sqrt(RADIUS["small"] * RADIUS["large"]))
# How far below its drawing centre each shape's centroid lies, in units of its radius.
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.1 * (-1 + 0.75 + 0.75) / 3, "star": 0.0}


def nearest_color(lab: np.ndarray, palette: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(np.linalg.norm(palette - lab, axis=-1)))]


@dataclass(frozen=True)
class Detection:
    background: str
    objects: tuple[Obj, ...]


def _template(shape: str, cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """The renderer's own drawing of `shape`, centroid at (cx, cy) px, as alpha in [0, 1]."""
    scale = 4
    image = Image.new("L", (width * scale, height * scale), 0)  # coverage only, no colors
    draw = ImageDraw.Draw(image)
    dy = _CENTROID_DY[shape] * r
    _draw_shape(draw, shape, cx * scale, (cy - dy) * scale, r * scale)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255


def _classify_shape(alpha: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """(best shape, its radius in px) by soft IoU against rendered templates."""
    height, width = alpha.shape
    area = float(alpha.sum())
    best = ("circle", 0.0, -1.0)
    for shape in _AREA_PER_R2:
        r0 = np.sqrt(area / _AREA_PER_R2[shape])
        for k in (0.94, 1.0, 1.06):
            for ox, oy in ((0, 0), (-0.4, 0), (0.4, 0), (0, -0.4), (0, 0.4)):
                t = _template(shape, cx + ox, cy + oy, r0 * k, width, height)
                iou = np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9)
                if iou > best[2]:
                    best = (shape, r0 * k, iou)
    return best[0], best[1]


def score_image(image: np.ndarray, max_objects: int = 2) -> Detection:
    """Read the background and up to `max_objects` objects (largest first) from uint8 [H, W, 3]."""
    height, width = image.shape[:2]
    side = min(height, width)
    lab = rgb_to_lab(image)
    border = np.concatenate([lab[:2].reshape(-1, 3), lab[-2:].reshape(-1, 3),
                             lab[:, :2].reshape(-1, 3), lab[:, -2:].reshape(-1, 3)])
    bg_lab = np.median(border, axis=0)
    background = nearest_color(bg_lab, _PALETTE_LAB, _NAMES)

    distance = np.linalg.norm(lab - bg_lab, axis=-1)
    labels, count = ndimage.label(distance > 12)
    if count == 0:
        return Detection(background, ())
    sizes = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    order = np.argsort(-sizes)
    ys, xs = np.mgrid[0:height, 0:width]
    objects = []
    for index in order[:max_objects]:
        if sizes[index] < 0.004 * side * side:  # specks are not objects
            break
        mask = labels == index + 1
        # The object's color: the core pixels farthest from the background.
        far = distance[mask] >= np.percentile(distance[mask], 60)
        obj_lab = np.median(lab[mask][far], axis=0)
        color = nearest_color(obj_lab, _OBJECT_LAB, list(COLORS))
        # Alpha: position of each pixel between background and object color.
        direction = obj_lab - bg_lab
        alpha = ((lab - bg_lab) @ direction) / max(float(direction @ direction), 1e-6)
        alpha = np.clip(alpha, 0, 1) * ndimage.binary_dilation(mask)
        cy, cx = (alpha * ys).sum() / alpha.sum() + 0.5, (alpha * xs).sum() / alpha.sum() + 0.5
        shape, radius = _classify_shape(alpha, cx, cy)
        size = "small" if radius / side < _SIZE_SPLIT else "large"
        cx, cy = cx / width, cy / height
        position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
        objects.append(Obj(shape, color, size, position))
    return Detection(background, tuple(objects))
