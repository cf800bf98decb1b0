"""Tiny randomly initialised models in the Stable Diffusion and SD3 layouts.

They exercise every code path of the service (tokenizer, text encoder(s), denoiser, VAE,
schedulers) in milliseconds. Their weights are random: they draw noise, not pictures.

    python -m training.tiny models/      # writes models/tiny-ldm, tiny-mmdit, tiny-x4 and tiny-video
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.train_video import mirror_adapter, video_pipeline
from training.vocab import build_tokenizer

TEXT_LENGTH = 32  # tokens; shapes captions are short


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    # Three blocks: downsampling factor 4 (64x64x3 -> 16x16x4), the shapes family's VAE shape.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=shift_factor,
    )


def tiny_clip_config(tokenizer, hidden: int = 32, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_ldm(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TEXT_LENGTH)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    # The SD-1.x scheduler settings, so the same code paths run as for real checkpoints.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_clip_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_mmdit(seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TEXT_LENGTH)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # two 32-wide CLIP encoders side by side, no T5
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(shift_factor=0.0),
        text_encoder=CLIPTextModelWithProjection(tiny_clip_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(tokenizer)),
        tokenizer_2=build_tokenizer(TEXT_LENGTH),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_x4(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """The SD x4 upscaler's design in miniature: the low-res image's 3 channels beside the
    latents, its noise level as a class label, the pipeline's VAE scaling of 0.08333."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TEXT_LENGTH)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, num_class_embeds=1000,
    )
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.08333)
    return StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny_clip_config(tokenizer)), tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1, prediction_type="v_prediction"),
        max_noise_level=350,
    )


def tiny_video(seed: int = 0) -> AnimateDiffPipeline:
    """tiny-ldm (its files byte for byte) plus a MotionAdapter mirroring its UNet, in
    training.train_video's export layout. The adapter keeps diffusers' random init, whose
    temporal output projections are not zero, so its frames mix (AnimateDiff's zero init, where
    training starts, would make every frame the image model's alone)."""
    image = tiny_ldm(seed)
    torch.manual_seed(seed)
    adapter = mirror_adapter(image.unet.config, heads=4, max_frames=32)
    return video_pipeline(unet=image.unet, motion_adapter=adapter, vae=image.vae, text_encoder=image.text_encoder,
                          tokenizer=image.tokenizer, scheduler=image.scheduler)


BUILDERS = {"tiny-ldm": tiny_ldm, "tiny-mmdit": tiny_mmdit, "tiny-x4": tiny_x4, "tiny-video": tiny_video}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model folders into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(BUILDERS), help="write this one model")
    args = parser.parse_args()
    for name, build in BUILDERS.items():
        if args.only and name != args.only:
            continue
        build(args.seed).save_pretrained(args.out / name, safe_serialization=True)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
