"""A model as named components with named tensors in and out, the unit every backend serves.

Each component is a small torch module around a diffusers / transformers network that fixes
its signature: positional tensors in the order of `ComponentSpec.inputs`, a tuple out in the
order of `.outputs`. That one signature is what the ONNX exporter traces, what onnxruntime and
TensorRT bind by name, and what the torch backend calls, so the backends are interchangeable.
Dimension names ("batch", "height", ...) mark the axes that are dynamic in exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Components a model of each family has, in load order; the VAE encoder is only needed by the
# image-conditioned tasks, so serving txt2img skips it.
FAMILY_COMPONENTS = {
    "ldm": ("text_encoder", "denoiser", "vae_decoder", "vae_encoder"),
    "mmdit": ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder", "vae_encoder"),
}
TXT2IMG_COMPONENTS = {
    "ldm": ("text_encoder", "denoiser", "vae_decoder"),
    "mmdit": ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder"),
}


def component_precision(name: str, precision: str) -> str:
    """The precision a component runs at when the model runs at `precision`.

    Text encoders stay fp32: they run once per batch (a negligible share of the time), and
    their rounding error is what guidance amplifies. Measured on shapes-mmdit, 8 images,
    bf16 vs fp32 PSNR: everything bf16 32.7 dB; text encoders fp32 50.2 dB; denoiser fp32 55.0 dB.
    """
    return "fp32" if name.startswith("text_encoder") else precision


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (the component's precision) or "int64"
    dims: tuple[str | int, ...]  # a name is a dynamic axis, an int a fixed size


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    subfolder: str  # the diffusers subfolder holding its weights
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}


def F(name, *dims):  # noqa: N802 - short constructors keep the table below readable
    return TensorSpec(name, "float", dims)


def I64(name, *dims):  # noqa: N802
    return TensorSpec(name, "int64", dims)


def component_spec(name: str, family: str, layout) -> ComponentSpec:
    """The signature of component `name` of a model with this `layout` (engines.layout)."""
    c, L = layout.latent_channels, layout.text_length
    latent = ("batch", c, "latent_height", "latent_width")
    denoiser_in = ("batch", layout.denoiser_in_channels, "latent_height", "latent_width")
    if name in ("text_encoder", "text_encoder_2"):
        outputs = (F("hidden_states", "batch", L, "text_width"),)
        if family == "mmdit":
            outputs += (F("pooled", "batch", "pooled_width"),)
        return ComponentSpec(name, name, (I64("input_ids", "batch", L),), outputs)
    if name == "denoiser":
        if family == "ldm":
            labels = (I64("class_labels", "batch"),) if layout.class_embeds else ()
            return ComponentSpec(name, "unet", (
                F("sample", *denoiser_in), F("timestep", "batch"),
                F("encoder_hidden_states", "batch", L, layout.context_width), *labels,
            ), (F("out_sample", *latent),))
        return ComponentSpec(name, "transformer", (
            F("sample", *latent), F("timestep", "batch"),
            F("encoder_hidden_states", "batch", "tokens", layout.context_width),
            F("pooled_projections", "batch", layout.pooled_width),
        ), (F("out_sample", *latent),))
    image = ("batch", 3, "height", "width")
    if name == "vae_decoder":
        return ComponentSpec(name, "vae", (F("latent", *latent),), (F("image", *image),))
    if name == "vae_encoder":
        return ComponentSpec(name, "vae", (F("image", *image),), (F("mean", *latent), F("logvar", *latent)))
    raise KeyError(f"unknown component {name!r}")


# --------------------------------------------------------------------------- torch modules


class ClipText(torch.nn.Module):
    """SD 1.x conditioning: the last hidden state of a CLIP text model."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return (self.encoder(input_ids)[0],)


class ClipTextPooled(torch.nn.Module):
    """SD3 conditioning: the penultimate hidden state and the projected pooled embedding."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        # class_labels: the x4 upscaler's noise level (UNets with num_class_embeds only).
        return (self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                          return_dict=False)[0],)


class MMDiT(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return (self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                 pooled_projections=pooled_projections, return_dict=False)[0],)


class VaeDecoder(torch.nn.Module):
    """Unscaled latents (already divided by the scaling factor) -> images in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return (self.vae.decode(latent, return_dict=False)[0],)


class VaeEncoder(torch.nn.Module):
    """Images in [-1, 1] -> the posterior (mean, logvar; unscaled): a task samples it with
    each image's generator, as the diffusers image-to-image pipelines do."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.logvar


def wrap(name: str, family: str, pipe) -> torch.nn.Module:
    """The torch module of component `name`, from a loaded diffusers pipeline."""
    if name == "text_encoder":
        return (ClipText if family == "ldm" else ClipTextPooled)(pipe.text_encoder)
    if name == "text_encoder_2":
        return ClipTextPooled(pipe.text_encoder_2)
    if name == "denoiser":
        return UNet(pipe.unet) if family == "ldm" else MMDiT(pipe.transformer)
    if name == "vae_decoder":
        return VaeDecoder(pipe.vae)
    if name == "vae_encoder":
        return VaeEncoder(pipe.vae)
    raise KeyError(f"unknown component {name!r}")


def example_inputs(spec: ComponentSpec, layout, batch: int = 2, latent_hw: tuple[int, int] = (8, 8),
                   tokens: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes: for tracing an export and checking it against torch."""
    g = torch.Generator().manual_seed(seed)
    f = layout.vae_scale_factor
    sizes = {"batch": batch, "latent_height": latent_hw[0], "latent_width": latent_hw[1],
             "height": latent_hw[0] * f, "width": latent_hw[1] * f,
             "tokens": tokens or layout.text_length + layout.t5_tokens}
    out = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.dims]
        if t.dtype == "int64":
            out[t.name] = torch.randint(0, layout.vocab_size, shape, generator=g)
        elif t.name == "timestep":
            out[t.name] = torch.rand(shape, generator=g) * 999
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


def text_engine(encoder: torch.nn.Module, pooled: bool):
    """A text encoder as a component engine for the trainers: gradients flow, nothing is cast."""
    module = ClipTextPooled(encoder) if pooled else ClipText(encoder)
    names = ("hidden_states", "pooled") if pooled else ("hidden_states",)
    device = next(encoder.parameters()).device
    return lambda input_ids: dict(zip(names, module(input_ids.to(device))))
