"""The torch backend: diffusers / transformers modules loaded offline from safetensors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import torch

from engines.conditioning import Conditioning, encode_ldm, encode_mmdit
from engines.denoisers import DiscreteVPDenoiser, FlowDenoiser
from engines.model import LoadedModel
from engines.registry import ModelSpec

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_pipeline(spec: ModelSpec, dtype: torch.dtype):
    # diffusers pipelines are used only as loaders: they resolve each component's class from
    # model_index.json. Sampling never goes through them (their schedulers are stateful).
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    common = dict(use_safetensors=True, local_files_only=True, dtype=dtype)
    if spec.family == "ldm":
        return StableDiffusionPipeline.from_pretrained(
            spec.path, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **common,
        )
    return StableDiffusion3Pipeline.from_pretrained(
        spec.path, text_encoder_3=None, tokenizer_3=None, **common
    )


def load(spec: ModelSpec, device: str = "cpu", precision: str | None = None) -> LoadedModel:
    dtype = PRECISIONS[precision or spec.precision]
    pipe = _load_pipeline(spec, dtype)
    pipe.to(device)
    vae = pipe.vae.eval()
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    scheduler_config = dict(pipe.scheduler.config)

    if spec.family == "ldm":
        unet = pipe.unet.eval()

        def unet_net(x, t, cond: Conditioning):
            return unet(x, t, encoder_hidden_states=cond.embeds).sample

        denoiser = DiscreteVPDenoiser.from_scheduler_config(unet_net, scheduler_config)
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder.eval()

        def encode(prompts):
            return encode_ldm(tokenizer, text_encoder, prompts)

        denoiser_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        latent_channels = unet.config.in_channels
    else:
        transformer = pipe.transformer.eval()

        def mmdit_net(x, t, cond: Conditioning):
            return transformer(
                hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                pooled_projections=cond.pooled,
            ).sample

        denoiser = FlowDenoiser(mmdit_net, scheduler_config.get("num_train_timesteps", 1000))
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        encoders = [pipe.text_encoder.eval(), pipe.text_encoder_2.eval()]
        joint_dim = transformer.config.joint_attention_dim
        t5_tokens = int(spec.options.get("t5_sequence_length", 256))

        def encode(prompts):
            return encode_mmdit(tokenizers, encoders, prompts, joint_dim, t5_tokens)

        denoiser_factor = transformer.config.patch_size
        latent_channels = transformer.config.in_channels

    scaling = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0

    @torch.inference_mode()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(dtype) / scaling + shift).sample.float()

    size_multiple = vae_factor * denoiser_factor
    if spec.limits.size_multiple % size_multiple:
        raise ValueError(
            f"{spec.id}: registry size_multiple {spec.limits.size_multiple} must be a multiple "
            f"of {size_multiple} (VAE x{vae_factor}, denoiser x{denoiser_factor})"
        )
    return LoadedModel(
        spec=spec,
        encode_prompts=encode,
        denoiser=denoiser,
        decode_latents=decode,
        scheduler_config=scheduler_config,
        latent_channels=latent_channels,
        vae_scale_factor=vae_factor,
        size_multiple=size_multiple,
        dtype=dtype,
    )
