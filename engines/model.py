"""A loaded model: its components as named objects a task calls, whatever backend computes them.

One denoiser call, from the scheduler to the engine, reads:
`evaluator` (engines.guidance) -> `model.denoiser` (a `DiscreteVPDenoiser` / `FlowDenoiser`:
sigmas in, x0 out) -> its `net` (`UNetNet` / `MMDiTNet`: names the tensors) -> the component
`Engine` (torch, onnxruntime or TensorRT). Prompts go through `PromptEncoder`, pixels and
latents through `Vae`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.backends.base import Engine
from engines.conditioning import Conditioning, encode_ldm, encode_mmdit
from engines.denoisers import DiscreteVPDenoiser, FlowDenoiser
from engines.layout import ModelLayout
from engines.registry import ModelSpec


@dataclass(frozen=True)
class UNetNet:
    """An LDM UNet component as the denoiser's network: (x, t, cond) -> eps or v."""

    engine: Engine

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.concat is not None:  # inpainting UNet: + mask, masked image latents; x4 upscaler: + low-res image
            x = torch.cat([x, cond.concat.to(x)], 1)
        labels = {} if cond.labels is None else {"class_labels": cond.labels}
        return self.engine(sample=x, timestep=t, encoder_hidden_states=cond.embeds, **labels)["out_sample"]


@dataclass(frozen=True)
class MMDiTNet:
    """An MMDiT transformer component as the denoiser's network: (x, t, cond) -> velocity."""

    engine: Engine

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.engine(sample=x, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled)["out_sample"]


@dataclass(frozen=True)
class PromptEncoder:
    """Prompts -> conditioning, as the family's diffusers pipeline encodes them."""

    family: str
    tokenizers: list
    engines: list[Engine]  # the text encoder components, in order
    layout: ModelLayout

    def __call__(self, prompts: list[str]) -> Conditioning:
        if self.family == "ldm":
            return encode_ldm(self.tokenizers[0], self.engines[0], prompts)
        return encode_mmdit(self.tokenizers, self.engines, prompts, self.layout.context_width,
                            self.layout.t5_tokens)


@dataclass(frozen=True)
class Vae:
    """Latents <-> pixels in [-1, 1], with the model's scaling and shift applied here only."""

    decoder: Engine
    encoder: Engine | None  # loaded only for image-conditioned tasks
    scaling_factor: float
    shift_factor: float

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent=latents / self.scaling_factor + self.shift_factor)["image"]

    def encode(self, images: torch.Tensor, generators=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents: the posterior sampled with each image's
        generator (engines.noise.StackedGenerator), or its mean when none is given."""
        if self.encoder is None:
            raise ValueError("this model was loaded without its vae_encoder component")
        out = self.encoder(image=images)
        latent = out["mean"]
        if generators is not None:  # DiagonalGaussianDistribution.sample: mean + std * randn
            std = torch.exp(0.5 * out["logvar"].clamp(-30.0, 20.0))
            latent = latent + std * generators.randn(tuple(latent.shape[1:])).to(latent)
        return (latent - self.shift_factor) * self.scaling_factor


@dataclass
class LoadedModel:
    spec: ModelSpec
    prompt_encoder: PromptEncoder
    denoiser: DiscreteVPDenoiser | FlowDenoiser
    vae: Vae
    scheduler_config: dict
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    size_multiple: int  # pixel sizes must be multiples of this (VAE x denoiser downsampling)
    in_channels: int = 0  # the denoiser's input channels when more than the latent's (an inpainting UNet)
    engine: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    components: dict = field(default_factory=dict)  # name -> Engine
    guide: "LoadedModel | None" = None  # the registry's guide model, for autoguidance

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self.prompt_encoder(prompts)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.vae.decode(latents)

    def encode_images(self, images: torch.Tensor, generators=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior samples with `generators`)."""
        return self.vae.encode(images, generators)


def load_tokenizers(spec: ModelSpec) -> list:
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(d, local_files_only=True) for d in spec.tokenizer_dirs()]


def assemble(spec: ModelSpec, layout: ModelLayout, tokenizers: list, engines: dict[str, Engine],
             engine: str, precision: str, device: str = "cpu") -> LoadedModel:
    """Component engines -> the model's named parts."""
    if spec.limits.size_multiple % layout.size_multiple:
        raise ValueError(
            f"{spec.id}: registry size_multiple {spec.limits.size_multiple} must be a multiple of "
            f"{layout.size_multiple} (VAE x{layout.vae_scale_factor}, denoiser x{layout.denoiser_factor})"
        )
    if spec.family == "ldm":
        denoiser = DiscreteVPDenoiser.from_scheduler_config(UNetNet(engines["denoiser"]), layout.scheduler_config)
        text = [engines["text_encoder"]]
    else:
        denoiser = FlowDenoiser(MMDiTNet(engines["denoiser"]), layout.scheduler_config.get("num_train_timesteps", 1000))
        text = [engines["text_encoder"], engines["text_encoder_2"]]
    return LoadedModel(
        spec=spec, prompt_encoder=PromptEncoder(spec.family, tokenizers, text, layout), denoiser=denoiser,
        vae=Vae(engines["vae_decoder"], engines.get("vae_encoder"), layout.scaling_factor, layout.shift_factor),
        scheduler_config=layout.scheduler_config, latent_channels=layout.latent_channels,
        vae_scale_factor=layout.vae_scale_factor, size_multiple=layout.size_multiple,
        in_channels=layout.denoiser_in_channels, engine=engine, precision=precision, device=device, components=engines,
    )
