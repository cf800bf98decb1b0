"""Tiled denoising (engines.tiling): the window grid, and blending that reproduces an untiled
run exactly wherever the network's output at a cell depends on that cell alone."""

from __future__ import annotations

import torch

from engines.conditioning import Conditioning
from engines.guidance import Guidance, evaluator
from engines.sampling import sample, start
from engines.schedules import make_schedule
from engines.tiling import Tiling, tiled
from training.train_ldm import SCHEDULE


def test_windows_cover_with_overlap():
    t = Tiling(tile=64, overlap=16)
    assert t.starts(64) == [0] and t.starts(40) == [0]
    assert t.starts(128) == [0, 32, 64]
    assert t.starts(100) == [0, 36]
    for length in (65, 96, 100, 128, 200):
        s = t.starts(length)
        assert s[0] == 0 and s[-1] + 64 == length
        assert all(b - a <= 64 - 16 for a, b in zip(s, s[1:]))  # every neighbour pair shares >= overlap
    w = t.weight(64, 64)
    assert w.min() > 0 and w.max() == 1 and torch.equal(w, w.T)


def pointwise(x, sigma, cond, t):
    """x0 from the cell's own sample, sigma and low-res channels, and the prompt's mean."""
    s = sigma.view(-1, 1, 1, 1)
    return x / (1 + s) + cond.concat[:, :1] * 0.3 + cond.embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def rows_for(seed: int, size: int):
    schedule = make_schedule(SCHEDULE, "dpmpp_2m", 8)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(2):
        cond = Conditioning(torch.randn(5, 8, generator=g), concat=torch.randn(3, size, size, generator=g))
        uncond = Conditioning(torch.zeros(5, 8), concat=cond.concat)
        rows.append(start(torch.randn(4, size, size, generator=g), schedule, "dpmpp_2m",
                          cond=cond, uncond=uncond, guidance=Guidance("cfg", 3.0 + k)))
    return rows


def test_tiled_equals_untiled_for_a_pointwise_network():
    plain, counted = evaluator(pointwise), [0]
    untiled = sample(plain, rows_for(0, 100))
    tiled_rows = sample(tiled(evaluator(pointwise, counter=counted), Tiling(32, 8)), rows_for(0, 100))
    for a, b in zip(untiled, tiled_rows):
        torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-5)
    windows = len(Tiling(32, 8).windows(100, 100))
    assert windows == 16 and counted[0] == 8 * 2 * 2 * windows  # steps x rows x (cond + uncond) x windows


def test_each_window_sees_its_own_crop():
    """A 3x3 convolution mixes neighbours: the tiled answer equals the untiled one except at
    the cells next to a window's inner edge (where the window pads with zeros), so every
    window's sample and low-res crop sit where they belong."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.05)

    def local(x, sigma, cond, t):
        with torch.no_grad():
            return conv(x) + cond.concat[:, :1] * 0.3

    rows = rows_for(1, 64)
    untiled, _ = evaluator(local)(rows)
    tiling = Tiling(32, 16)
    x0, _ = tiled(evaluator(local), tiling)(rows)
    edge = torch.zeros(64, dtype=torch.bool)
    for first in tiling.starts(64):
        for cell in (first, first + 31):  # a window's first and last cell
            if 0 < cell < 63:
                edge[cell] = True
    assert edge.nonzero().flatten().tolist() == [16, 31, 32, 47]
    away = ~(edge[:, None] | edge[None, :])
    torch.testing.assert_close(x0[..., away], untiled[..., away], rtol=1e-5, atol=1e-5)
    assert ((x0 - untiled).abs()[..., ~away] > 1e-4).float().mean() > 0.5
