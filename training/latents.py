"""A bank of (latent, caption) pairs for denoiser training, encoded once with the trained VAE.

Scenes and captions come from a seeded generator (held-out pairs never appear); latents are
the posterior means, multiplied by the VAE's scaling factor, as the denoisers see them.
A multi-size bank holds one such bank per (width, height).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from training.shapes import caption, random_scene, render


@torch.no_grad()
def build_bank(vae_dir: Path, n: int, seed: int = 1, chunk: int = 256, size: tuple[int, int] = (64, 64),
               device: str = "cpu", keep_images: bool = False) -> dict:
    """`keep_images`: the rendered uint8 images too (the inpainting trainer masks them)."""
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().to(device)
    rng = random.Random(seed)
    latents, captions, kept = [], [], []
    for start in range(0, n, chunk):
        images = []
        for _ in range(min(chunk, n - start)):
            text, scene = caption(random_scene(rng), rng)
            images.append(render(scene, size, rng))
            captions.append(text)
        if keep_images:
            kept.append(torch.from_numpy(np.stack(images)))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            mean = vae.encode(x).latent_dist.mean.cpu()
        latents.append((mean.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor)
    bank = {"latents": torch.cat(latents).half(), "captions": captions}
    if keep_images:
        bank["images"] = torch.cat(kept)
    return bank


def load_or_build(path: Path, vae_dir: Path, n: int, seed: int = 1, device: str = "cpu",
                  keep_images: bool = False) -> dict:
    if path.exists():
        bank = torch.load(path, weights_only=False)
        if len(bank["captions"]) >= n and (not keep_images or "images" in bank):
            return bank
    bank = build_bank(vae_dir, n, seed, device=device, keep_images=keep_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bank, path)
    return bank


def load_or_build_sizes(path: Path, vae_dir: Path, counts: dict[tuple[int, int], int], seed: int = 1) -> dict:
    """{(width, height): bank}, each size with its own seeded scenes; built once, then loaded."""
    banks = torch.load(path, weights_only=False) if path.exists() else {}
    missing = [size for size, n in counts.items() if len(banks.get(size, {}).get("captions", [])) < n]
    for size in missing:
        w, h = size
        banks[size] = build_bank(vae_dir, counts[size], seed=seed * 1_000_003 + w * 1000 + h, size=size)
        print(f"bank {w}x{h}: {counts[size]} latents", flush=True)
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(banks, path)
    return {size: banks[size] for size in counts}
