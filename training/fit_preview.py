"""Fit a model's latent -> RGB preview map (engines/latent_preview.py) to its own VAE.

Rendered shapes scenes are encoded (posterior means: raw latents z) and decoded again; the
decoded pixels, box-averaged down to latent resolution, are what the VAE would show for each
latent cell. A least-squares fit of those RGB values on the cell's C channels (plus a bias)
gives the 3 x C map ComfyUI-style previews use. Held-out scenes (their own seed) measure it:
the error is printed and stored in the file, beside the error of the best constant colour
(what a map that learnt nothing would score).

    python -m training.fit_preview models/shapes-ldm [models/... ...]   # each model directory
    python -m training.fit_preview                                     # every models/* with a vae/

Models whose VAE weights are identical (the shapes family shares shapes-vae) are fitted once
per run and get the same numbers, each in its own directory.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from engines import latent_preview
from training.shapes import random_scene, render

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Samples:
    latents: torch.Tensor  # [N, C, h, w] raw VAE latents (posterior means)
    rgb: torch.Tensor  # [N, 3, h, w] the decoded image box-averaged to latent cells, in [0, 1]


def load_vae(model_dir: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(Path(model_dir) / "vae", use_safetensors=True).eval()


def scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def samples(vae: AutoencoderKL, n: int, seed: int, size: int = 64, chunk: int = 64) -> Samples:
    """`n` rendered scenes (seeded) as raw latents and the decoder's colours per latent cell."""
    rng = random.Random(seed)
    f = scale_factor(vae)
    latents, rgb = [], []
    for start in range(0, n, chunk):
        images = np.stack([render(random_scene(rng), size, rng) for _ in range(min(chunk, n - start))])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(x).latent_dist.mean
        decoded = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        latents.append(z)
        rgb.append(F.avg_pool2d(decoded, f))
    return Samples(torch.cat(latents), torch.cat(rgb))


def least_squares(s: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [3, C], bias [3] minimising the squared RGB error over every latent cell."""
    c = s.latents.shape[1]
    x = s.latents.permute(0, 2, 3, 1).reshape(-1, c).double()
    y = s.rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y).solution  # [C + 1, 3]
    return solution[:c].T.float(), solution[c].float()


def errors(predicted: torch.Tensor, target: torch.Tensor) -> dict:
    """RMSE in 8-bit levels and PSNR (dB) of RGB in [0, 1] as previews are served (clamped, 8-bit)."""
    p = (predicted.clamp(0, 1) * 255).round()
    t = (target.clamp(0, 1) * 255).round()
    mse = float(((p - t) ** 2).mean())
    return {"rmse_8bit": round(math.sqrt(mse), 3), "psnr_db": round(10 * math.log10(255**2 / max(mse, 1e-10)), 2)}


def held_out_error(rgb_map: latent_preview.LatentRGB, vae: AutoencoderKL, n: int, seed: int) -> dict:
    """The map's error on `n` fresh scenes; `rgb_map` applies to sampler-space latents, so the
    raw latents are scaled (and shifted) as the model's samplers hold them."""
    s = samples(vae, n, seed)
    shift, scaling = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    return errors(rgb_map.rgb((s.latents - shift) * scaling), s.rgb)


def fit(vae: AutoencoderKL, n: int, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    started = time.perf_counter()
    weight, bias = least_squares(samples(vae, n, seed))
    test = samples(vae, held_out, seed + 1)
    predicted = latent_preview.LatentRGB(weight, bias).rgb(test.latents)
    constant = test.rgb.mean((0, 2, 3), keepdim=True).expand_as(test.rgb)
    report = {
        "method": "least squares over latent cells: rendered shapes scenes, encoded (posterior mean), "
                  "decoded, box-averaged to latent resolution",
        "scenes": n, "held_out_scenes": held_out, "seed": seed,
        "held_out": errors(predicted, test.rgb),
        "held_out_constant_colour": errors(constant, test.rgb),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return weight, bias, report


def model_dirs(paths: list[str]) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted(p for p in (ROOT / "models").iterdir() if (p / "vae" / "config.json").is_file()
                  and (p / "model_index.json").is_file())


def vae_weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((model_dir / "vae").glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model directories (default: every models/* with a vae/)")
    parser.add_argument("--scenes", type=int, default=512)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fitted: dict[str, tuple] = {}  # VAE weights digest -> (weight, bias, report)
    for model_dir in model_dirs(args.models):
        digest = vae_weights_digest(model_dir)
        if digest not in fitted:
            fitted[digest] = fit(load_vae(model_dir), args.scenes, args.held_out, args.seed)
        weight, bias, report = fitted[digest]
        path = latent_preview.save(model_dir, weight, bias, report)
        ho, const = report["held_out"], report["held_out_constant_colour"]
        print(f"{path}: held-out RMSE {ho['rmse_8bit']:.2f}/255 ({ho['psnr_db']:.1f} dB); "
              f"constant colour {const['rmse_8bit']:.2f}/255 ({const['psnr_db']:.1f} dB)", flush=True)


if __name__ == "__main__":
    main()
