"""Random inpainting masks for training (1 = repaint), as the SD-inpainting recipe uses:
boxes, image halves (what the inpaint score asks for), blobs (unions of ellipses), object
silhouettes (the pixels that are not background, dilated), and the whole image now and then
(so the model still generates from text alone). Vectorised over a batch, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("box", "half", "blob", "silhouette", "full")
WEIGHTS = torch.tensor([0.3, 0.25, 0.2, 0.2, 0.05])


def random_masks(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """images: uint8 [B, H, W, 3] -> float masks [B, 1, H, W] in {0, 1}."""
    b, h, w, _ = images.shape
    kind = torch.multinomial(WEIGHTS, b, replacement=True, generator=generator)
    ys = torch.arange(h).view(1, h, 1).float()
    xs = torch.arange(w).view(1, 1, w).float()
    u = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731

    bw, bh = (0.25 + 0.5 * u(b)) * w, (0.25 + 0.5 * u(b)) * h
    x0, y0 = u(b) * (w - bw), u(b) * (h - bh)
    box = ((xs >= x0.view(-1, 1, 1)) & (xs < (x0 + bw).view(-1, 1, 1))
           & (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + bh).view(-1, 1, 1)))

    side = torch.randint(0, 4, (b,), generator=generator).view(-1, 1, 1)
    half = torch.where(side == 0, xs < w / 2, torch.where(side == 1, xs >= w / 2,
                       torch.where(side == 2, ys < h / 2, ys >= h / 2)))

    blob = torch.zeros(b, h, w, dtype=torch.bool)
    for _ in range(3):
        cx, cy = u(b).view(-1, 1, 1) * w, u(b).view(-1, 1, 1) * h
        rx, ry = (0.1 + 0.25 * u(b)).view(-1, 1, 1) * w, (0.1 + 0.25 * u(b)).view(-1, 1, 1) * h
        blob |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1

    pixels = images.float()
    corner = pixels[:, :1, :1, :]  # scenes' corners are background
    fg = ((pixels - corner).abs().amax(-1) > 24).float().unsqueeze(1)
    silhouette = F.max_pool2d(fg, 7, stride=1, padding=3).squeeze(1) > 0  # dilated by 3 px

    full = torch.ones(b, h, w, dtype=torch.bool)
    stacked = torch.stack([box.expand(b, h, w), half.expand(b, h, w), blob, silhouette, full], 1)
    return stacked[torch.arange(b), kind].float().unsqueeze(1)
