"""Shape buckets and optimisation profiles: pure functions over a component's signature.

TensorRT (and CUDA graphs) are fastest at the exact shapes they were built for and can be
slow or wrong far from them, so instead of one profile spanning batch 1..64 each component
gets a few narrow batch buckets, each optimised at its top (where a padded batch lands).
Spatial sizes span the registry's limits with the optimum at the model's default size.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.components import ComponentSpec

Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) shapes


@dataclass(frozen=True)
class Profile:
    shapes: dict[str, Range]  # input name -> (min, opt, max)

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        return True

    def as_json(self) -> dict:
        return {k: [list(x) for x in v] for k, v in sorted(self.shapes.items())}


def batch_buckets(max_rows: int) -> list[tuple[int, int]]:
    """Batch ranges [lo, hi]: 1, 2, 3-4, 5-8, ... (powers of two) up to max_rows."""
    ranges, lo, hi = [], 1, 1
    while lo <= max_rows:
        ranges.append((lo, min(hi, max_rows)))
        lo, hi = hi + 1, hi * 2
    return ranges


def component_rows(component: str, max_batch: int) -> int:
    """Largest batch a component sees: guided denoising runs cond and uncond rows together."""
    return 2 * max_batch if component == "denoiser" else max_batch


def profiles(spec: ComponentSpec, layout, limits, defaults, max_batch: int) -> list[Profile]:
    """One profile per batch bucket, covering the model's allowed sizes."""
    f = layout.vae_scale_factor
    dims = {
        "latent_height": (limits.min_size // f, defaults.height // f, limits.max_size // f),
        "latent_width": (limits.min_size // f, defaults.width // f, limits.max_size // f),
        "height": (limits.min_size, defaults.height, limits.max_size),
        "width": (limits.min_size, defaults.width, limits.max_size),
        "tokens": (layout.text_length + layout.t5_tokens,) * 3,
    }
    out = []
    for lo, hi in batch_buckets(component_rows(spec.name, max_batch)):
        shapes = {}
        for t in spec.inputs:
            ranges = [(lo, hi, hi) if d == "batch" else dims[d] if isinstance(d, str) else (d, d, d)
                      for d in t.dims]
            shapes[t.name] = tuple(tuple(r[i] for r in ranges) for i in range(3))
        out.append(Profile(shapes))
    return out


def select_profile(candidates: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first (narrowest) profile that fits; ValueError if none does."""
    for i, p in enumerate(candidates):
        if p.fits(shapes):
            return i
    raise ValueError(f"no optimisation profile fits shapes {shapes}")
