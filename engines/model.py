"""A loaded model: the pieces a task composes, whatever backend computes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engines.conditioning import Conditioning
from engines.denoisers import DiscreteVPDenoiser, FlowDenoiser
from engines.registry import ModelSpec


@dataclass
class LoadedModel:
    spec: ModelSpec
    encode_prompts: Callable[[list[str]], Conditioning]
    denoiser: DiscreteVPDenoiser | FlowDenoiser
    decode_latents: Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [-1, 1]
    scheduler_config: dict
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    size_multiple: int  # pixel sizes must be multiples of this (VAE x denoiser downsampling)
    dtype: torch.dtype = torch.float32
