"""A cheap latent -> RGB picture: one linear map per model (3 x C weights and a bias), as
ComfyUI's latent previews do, fitted to the model's own VAE (training/fit_preview.py) and
stored beside its weights as `latent_rgb.json`.

The map is fitted on the VAE's raw latents z (what its decoder reads) and folded here with the
model's `scaling_factor` / `shift_factor`, so it applies directly to latents as samplers hold
them ((z - shift) * scaling): SD3-style VAEs have a shift, and a map that ignored it would be
off by a constant colour. The file records a hash of the VAE it was fitted to; a map whose VAE
changed since is refused rather than shown wrong.

File format (`format: latent_rgb/1`): `weight` [3][C] and `bias` [3] give RGB in [0, 1] from
raw VAE latents; `vae_hash` is engines.cache.weights_hash of the model's `vae/` directory;
`fit` says how it was fitted and its held-out error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.cache import weights_hash

FILENAME = "latent_rgb.json"
FORMAT = "latent_rgb/1"
log = logging.getLogger("latentserve.engines")


@dataclass(frozen=True)
class LatentRGB:
    """RGB in [0, 1] = weight @ latents + bias, per latent cell, on sampler-space latents."""

    weight: torch.Tensor  # [3, C]
    bias: torch.Tensor  # [3]

    @classmethod
    def from_raw(cls, weight: torch.Tensor, bias: torch.Tensor, scaling_factor: float,
                 shift_factor: float) -> "LatentRGB":
        """A map fitted on raw VAE latents z, for latents x = (z - shift) * scaling:
        W z + b = (W / scaling) x + (b + W shift)."""
        weight, bias = weight.double(), bias.double()
        return cls((weight / scaling_factor).float(), (bias + weight.sum(1) * shift_factor).float())

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """[C, h, w] (any device) -> uint8 [h, w, 3] on the CPU."""
        w = self.weight.to(latents.device, latents.dtype)
        rgb = torch.einsum("oc,chw->hwo", w, latents) + self.bias.to(latents.device, latents.dtype)
        return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> float RGB [N, 3, h, w] in [0, 1], unclamped (for fitting and checks)."""
        return torch.einsum("oc,nchw->nohw", self.weight.to(latents), latents) + self.bias.to(latents)[:, None, None]


def load(model_dir: Path, scaling_factor: float, shift_factor: float) -> LatentRGB | None:
    """The model's map, or None (with a warning) where it has none or it was fitted to another VAE."""
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        log.warning("%s: unknown format %r; no latent previews", path, data.get("format"))
        return None
    if data.get("vae_hash") != weights_hash(Path(model_dir) / "vae"):
        log.warning("%s was fitted to another VAE than %s/vae; no latent previews (refit: "
                    "python -m training.fit_preview %s)", path, model_dir, model_dir)
        return None
    return LatentRGB.from_raw(torch.tensor(data["weight"]), torch.tensor(data["bias"]), scaling_factor, shift_factor)


def save(model_dir: Path, weight: torch.Tensor, bias: torch.Tensor, fit: dict) -> Path:
    """Write a map fitted on raw VAE latents (weight [3, C], bias [3])."""
    path = Path(model_dir) / FILENAME
    data = {
        "format": FORMAT,
        "space": "raw VAE latents z (what the decoder reads) -> RGB in [0, 1]",
        "weight": [[round(float(v), 6) for v in row] for row in weight],
        "bias": [round(float(v), 6) for v in bias],
        "vae_hash": weights_hash(Path(model_dir) / "vae"),
        "fit": fit,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
