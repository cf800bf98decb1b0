"""A loaded model: the pieces a task composes, whatever backend computes them.

`assemble` turns component engines (engines.backends.base.Engine) into the functions tasks
call, so a task never knows whether torch, onnxruntime or TensorRT is underneath.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from engines.conditioning import Conditioning, encode_ldm, encode_mmdit
from engines.denoisers import DiscreteVPDenoiser, FlowDenoiser
from engines.layout import ModelLayout
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
    engine: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    components: dict = field(default_factory=dict)  # name -> Engine
    guide: "LoadedModel | None" = None  # the registry's guide model, for autoguidance


def load_tokenizers(spec: ModelSpec) -> list:
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(d, local_files_only=True) for d in spec.tokenizer_dirs()]


def assemble(spec: ModelSpec, layout: ModelLayout, tokenizers: list, engines: dict,
             engine: str, precision: str, device: str = "cpu") -> LoadedModel:
    if spec.limits.size_multiple % layout.size_multiple:
        raise ValueError(
            f"{spec.id}: registry size_multiple {spec.limits.size_multiple} must be a multiple of "
            f"{layout.size_multiple} (VAE x{layout.vae_scale_factor}, denoiser x{layout.denoiser_factor})"
        )
    unet_or_dit = engines["denoiser"]
    if spec.family == "ldm":
        def net(x, t, cond: Conditioning):
            return unet_or_dit(sample=x, timestep=t, encoder_hidden_states=cond.embeds)["out_sample"]

        denoiser = DiscreteVPDenoiser.from_scheduler_config(net, layout.scheduler_config)

        def encode(prompts):
            return encode_ldm(tokenizers[0], engines["text_encoder"], prompts)
    else:
        def net(x, t, cond: Conditioning):
            return unet_or_dit(sample=x, timestep=t, encoder_hidden_states=cond.embeds,
                               pooled_projections=cond.pooled)["out_sample"]

        denoiser = FlowDenoiser(net, layout.scheduler_config.get("num_train_timesteps", 1000))
        text_encoders = [engines["text_encoder"], engines["text_encoder_2"]]

        def encode(prompts):
            return encode_mmdit(tokenizers, text_encoders, prompts, layout.context_width, layout.t5_tokens)

    vae_decoder = engines["vae_decoder"]

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae_decoder(latent=latents / layout.scaling_factor + layout.shift_factor)["image"]

    return LoadedModel(
        spec=spec, encode_prompts=encode, denoiser=denoiser, decode_latents=decode,
        scheduler_config=layout.scheduler_config, latent_channels=layout.latent_channels,
        vae_scale_factor=layout.vae_scale_factor, size_multiple=layout.size_multiple,
        engine=engine, precision=precision, device=device, components=engines,
    )
