"""Text to video with AnimateDiff-style models (an image LDM plus a MotionAdapter's temporal
layers), the computation of diffusers' AnimateDiffPipeline on our samplers.

A video is one row whose sample is [C, F, h, w] (the pipeline's (B, C, F, H, W) layout, row by
row): its initial noise comes from its own seed's generator in that layout, as the pipeline's
`randn_tensor` draws with one generator per video; its prompt is encoded once and the denoiser
repeats it for every frame (the pipeline's `repeat_interleave`); guidance and the sampler
steps are the image rows' own (they broadcast over any sample shape). Frames decode one by one
through the VAE, `decode_chunk_size` at a time, as the pipeline does.

FreeInit (Wu et al. 2023; diffusers' `enable_free_init`) is a job option: after a pass, each
video's latents are diffused back to the last training timestep with its initial noise; their
low frequencies (in time and space) are kept, the high ones drawn afresh from the video's own
generator, and the video is denoised again from there (`free_init` passes in all). It trades
passes for frames that agree with each other.

The model directory is what training.train_video exports: the image model's components (unet/
the spatial UNet2DConditionModel) plus motion_adapter/; its registry entry is an "ldm" one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engines.backends.torch_backend import TorchEngine, check_precision
from engines.components import F as FloatTensor, ClipText, ComponentSpec, VaeDecoder, component_precision, component_spec
from engines.layout import ModelLayout
from engines.model import LoadedModel, assemble, load_tokenizers
from engines.noise import StackedGenerator
from engines.registry import ModelSpec
from engines.schedules import vp_alphas_cumprod
from engines.sampling import Row, sample, start
from engines.tasks import txt2img
from engines.tasks.txt2img import Txt2ImgBatch, evaluator_of


@dataclass(frozen=True)
class VideoBatch:
    batch: Txt2ImgBatch  # the frame size, default sampler and steps, each video's prompt, seed, guidance
    frames: int
    decode_chunk_size: int = 16  # frames per VAE call
    free_init: int = 1  # denoising passes (FreeInit's num_iters; 1: off)


class MotionUNet(torch.nn.Module):
    """The motion UNet as a component: one text row per video in, repeated for each of its
    frames inside (so the component's batch is the videos', like every other denoiser's)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        text = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return (self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0],)


def denoiser_spec(layout: ModelLayout) -> ComponentSpec:
    video = ("batch", layout.latent_channels, "frames", "latent_height", "latent_width")
    return ComponentSpec("denoiser", "unet", (
        FloatTensor("sample", *video), FloatTensor("timestep", "batch"),
        FloatTensor("encoder_hidden_states", "batch", layout.text_length, layout.context_width),
    ), (FloatTensor("out_sample", *video),))


def load(spec: ModelSpec, precision: str = "fp32", device: str = "cpu") -> LoadedModel:
    """A video model on torch: text encoder, motion UNet (spatial UNet + adapter), VAE decoder."""
    from diffusers import AnimateDiffPipeline

    check_precision(precision, device)
    pipe = AnimateDiffPipeline.from_pretrained(spec.path, use_safetensors=True, local_files_only=True)
    layout = ModelLayout.read(spec)
    modules = {"text_encoder": ClipText(pipe.text_encoder), "denoiser": MotionUNet(pipe.unet),
               "vae_decoder": VaeDecoder(pipe.vae)}
    engines = {}
    for name, module in modules.items():
        cspec = denoiser_spec(layout) if name == "denoiser" else component_spec(name, "ldm", layout)
        engines[name] = TorchEngine(module, cspec, component_precision(name, precision), device,
                                    channels_last=name == "vae_decoder")
    return assemble(spec, layout, load_tokenizers(spec), engines, "torch", precision, device)


def initial_noise(model: LoadedModel, job: VideoBatch, generators: StackedGenerator | None = None) -> torch.Tensor:
    """[B, C, F, h, w] standard normal, video k's from its own seed (the pipeline's order)."""
    f = model.vae_scale_factor
    shape = (model.latent_channels, job.frames, job.batch.height // f, job.batch.width // f)
    return (generators or StackedGenerator([video.seed for video in job.batch.images])).randn(shape)


def start_rows(model: LoadedModel, job: VideoBatch) -> list[Row]:
    """Each video's row at step 0, as txt2img starts an image's, from its [C, F, h, w] noise
    (its generator goes on to draw its sampler's noise)."""
    generators = StackedGenerator([video.seed for video in job.batch.images])
    return txt2img.start_rows(model, job.batch, initial_noise(model, job, generators), generators)


def final_latents(model: LoadedModel, rows: list[Row]) -> torch.Tensor:
    """Finished rows' clean latents [B, C, F, h, w]."""
    x = torch.stack([row.x for row in rows])
    end = torch.tensor([float(row.schedule.sigmas[-1]) for row in rows], device=x.device)
    return model.denoiser.x_to_latents(x, end)


@torch.inference_mode()
def finish(model: LoadedModel, rows: list[Row], decode_chunk_size: int = 16) -> torch.Tensor:
    """Finished rows to uint8 frames [B, F, H, W, 3]; every frame decoded alone."""
    latents = final_latents(model, rows)
    b, c, f, h, w = latents.shape
    frames = latents.transpose(1, 2).reshape(b * f, c, h, w)
    images = torch.cat([model.decode_latents(frames[i:i + decode_chunk_size])
                        for i in range(0, len(frames), decode_chunk_size)])
    pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return pixels.reshape(b, f, *pixels.shape[1:])


@torch.inference_mode()
def reinitialize(model: LoadedModel, rows: list[Row], noise: torch.Tensor) -> list[Row]:
    """FreeInit's restart of finished rows: each video's latents noised to the last training
    timestep with its initial `noise` [B, C, F, h, w], low-pass filtered, its high frequencies
    from fresh noise off its own generator; the row begins its schedule again from there."""
    # diffusers' own filter and mix (FreeInitMixin's methods read no pipeline state), so a
    # video re-initialises exactly as in AnimateDiffPipeline with enable_free_init(): butterworth,
    # order 4, stop frequencies 0.25 in space and time.
    from diffusers.pipelines.free_init_utils import FreeInitMixin

    latents = final_latents(model, rows)
    alpha = vp_alphas_cumprod(model.scheduler_config)[-1].to(latents)
    diffused = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise.to(latents)
    fresh = torch.stack([torch.randn(noise.shape[1:], generator=row.generator) for row in rows]).to(latents)
    low_pass = FreeInitMixin._get_free_init_freq_filter(None, (1, *noise.shape[1:]), latents.device, "butterworth",
                                                        4, 0.25, 0.25)
    mixed = FreeInitMixin._apply_freq_filter(None, diffused.float(), fresh.float(), low_pass).to(latents.dtype)
    # start() scales the mix to the schedule's first sigma, as the first pass's noise; the
    # pipeline passes it unscaled, the same wherever init_noise_sigma is 1 (DDIM).
    return [replace(start(m, row.schedule, row.sampler, row.generator, row.eta), cond=row.cond, uncond=row.uncond,
                    guide_cond=row.guide_cond, guidance=row.guidance, calls=row.calls)
            for m, row in zip(mixed, rows)]


@torch.inference_mode()
def run(model: LoadedModel, job: VideoBatch) -> torch.Tensor:
    """The whole batch in one go (each of its `free_init` passes): uint8 [B, F, H, W, 3]."""
    rows = sample(evaluator_of(model), start_rows(model, job))
    for _ in range(job.free_init - 1):
        rows = sample(evaluator_of(model), reinitialize(model, rows, initial_noise(model, job)))
    return finish(model, rows, job.decode_chunk_size)
