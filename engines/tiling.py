"""Tiled denoising for latents larger than a model's tile: MultiDiffusion (Bar-Tal et al. 2023)
over x0 predictions. Each call's rows are cut into overlapping windows; every window is a row
of the same network call; the windows' x0 estimates are blended back with weights that ramp
up over the overlap, so neighbouring windows hand over smoothly and no seam survives the
following steps. The sampler then steps the whole latent, as untiled.

Used by upscalers (shapes-x4 serves up to 128x128 -> 512x512 with 256x256-output tiles):
their network is convolutional plus attention at coarse levels, and each window carries its
own crop of the low-res image, so a window sees what an untiled call would see near it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from engines.conditioning import Conditioning
from engines.sampling import Row


@dataclass(frozen=True)
class Tiling:
    tile: int  # window side, in latent cells
    overlap: int  # cells shared by neighbouring windows

    def __post_init__(self):
        if not 0 < self.overlap < self.tile:
            raise ValueError(f"overlap {self.overlap} must be in (0, tile {self.tile})")

    def starts(self, length: int) -> list[int]:
        """Window starts along one side: the fewest windows with at least `overlap` shared,
        spread evenly so the last ends at the edge."""
        if length <= self.tile:
            return [0]
        n = math.ceil((length - self.overlap) / (self.tile - self.overlap))
        return [round(i * (length - self.tile) / (n - 1)) for i in range(n)]

    def windows(self, height: int, width: int) -> list[tuple[slice, slice]]:
        return [(slice(y, y + min(self.tile, height)), slice(x, x + min(self.tile, width)))
                for y in self.starts(height) for x in self.starts(width)]

    def weight(self, height: int, width: int) -> torch.Tensor:
        """[h, w] blending weight of one window: a linear ramp over the overlap on each side,
        never zero (a pixel covered by one window alone takes that window's value)."""
        return torch.outer(_ramp(min(self.tile, height), self.overlap), _ramp(min(self.tile, width), self.overlap))


def _ramp(size: int, overlap: int) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.minimum(torch.ones(size), torch.minimum(i, size - i) / overlap)


def _crop(c: Conditioning | None, ys: slice, xs: slice) -> Conditioning | None:
    if c is None or c.concat is None:
        return c
    return replace(c, concat=c.concat[..., ys, xs])


def tiled(evaluate, tiling: Tiling):
    """evaluate(rows) -> (x0, rows), evaluating rows larger than the tile window by window in
    one call of `evaluate` (rows of one call share their shape)."""

    def run(rows: list[Row]) -> tuple[torch.Tensor, list[Row]]:
        height, width = rows[0].x.shape[-2:]
        if height <= tiling.tile and width <= tiling.tile:
            return evaluate(rows)
        if any(r.known is not None for r in rows):
            raise ValueError("tiled denoising does not take training-free inpainting rows")
        windows = tiling.windows(height, width)
        pieces = [replace(r, x=r.x[..., ys, xs], cond=_crop(r.cond, ys, xs), uncond=_crop(r.uncond, ys, xs),
                          guide_cond=_crop(r.guide_cond, ys, xs), apg=None if r.apg is None else r.apg[..., ys, xs])
                  for r in rows for ys, xs in windows]
        x0_pieces, evaluated = evaluate(pieces)
        x = torch.stack([r.x for r in rows])
        weight = tiling.weight(height, width).to(x.device, x.dtype)
        total = torch.zeros(height, width, dtype=x.dtype, device=x.device)
        for ys, xs in windows:
            total[ys, xs] += weight
        x0 = blend(x0_pieces, len(windows), windows, weight, total, x.shape)
        if any(p.apg is not None for p in evaluated):  # APG's running average is spatial: blend it too
            apg = blend(torch.stack([p.apg for p in evaluated]), len(windows), windows, weight, total, x.shape)
            rows = [replace(r, apg=a) for r, a in zip(rows, apg)]
        return x0, rows

    return run


def blend(pieces: torch.Tensor, per_row: int, windows, weight, total, shape) -> torch.Tensor:
    """[rows * windows, C, h, w] window values -> [rows, C, H, W], the weighted mean over the
    windows covering each cell."""
    out = torch.zeros(shape, dtype=pieces.dtype, device=pieces.device)
    for k, (ys, xs) in enumerate(windows):
        out[..., ys, xs] += pieces[k::per_row] * weight
    return out / total
