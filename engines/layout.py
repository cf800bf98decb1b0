"""What a model directory's config files say about its shapes, read without loading weights.

An engine built ahead of time (ONNX, TensorRT) stands in for the torch modules, so the worker
needs the model's geometry and scheduler from the JSON files alone. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.registry import ModelSpec


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ModelLayout:
    family: str
    scheduler_config: dict
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    denoiser_factor: int  # latent cells per denoiser cell (UNet downsampling or DiT patch)
    scaling_factor: float
    shift_factor: float
    text_length: int  # tokens per prompt (the tokenizer's model_max_length)
    vocab_size: int
    context_width: int  # the denoiser's text-token width
    pooled_width: int  # MMDiT pooled projection width (0 for LDM)
    t5_tokens: int  # zero tokens standing in for T5 (MMDiT without T5)
    # The denoiser's input channels: latent_channels, or more for an inpainting UNet (SD's 9:
    # the latent, the mask, the masked image's latents).
    in_channels: int = 0
    class_embeds: bool = False  # the UNet takes class labels (the x4 upscaler's noise level)

    @property
    def denoiser_in_channels(self) -> int:
        return self.in_channels or self.latent_channels

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.denoiser_factor

    @classmethod
    def read(cls, spec: ModelSpec) -> "ModelLayout":
        root = spec.path
        vae = _json(root / "vae" / "config.json")
        text = _json(root / "text_encoder" / "config.json")
        tokenizer = _json(root / "tokenizer" / "tokenizer_config.json")
        if spec.family == "ldm":
            unet = _json(root / "unet" / "config.json")
            denoiser_factor = 2 ** (len(unet["block_out_channels"]) - 1)
            channels, context, pooled, t5 = unet["out_channels"], unet["cross_attention_dim"], 0, 0
            in_channels = unet["in_channels"]
            class_embeds = unet.get("num_class_embeds") is not None
        else:
            dit = _json(root / "transformer" / "config.json")
            denoiser_factor = dit["patch_size"]
            channels, context, pooled = dit["in_channels"], dit["joint_attention_dim"], dit["pooled_projection_dim"]
            in_channels, class_embeds = channels, False
            t5 = int(spec.options.get("t5_sequence_length", 256))
        return cls(
            family=spec.family,
            scheduler_config=_json(root / "scheduler" / "scheduler_config.json"),
            latent_channels=channels,
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            denoiser_factor=denoiser_factor,
            scaling_factor=float(vae["scaling_factor"]),
            shift_factor=float(vae.get("shift_factor") or 0.0),
            text_length=int(tokenizer.get("model_max_length", 77)),
            vocab_size=int(text["vocab_size"]),
            context_width=int(context),
            pooled_width=int(pooled),
            t5_tokens=t5,
            in_channels=in_channels,
            class_embeds=class_embeds,
        )
