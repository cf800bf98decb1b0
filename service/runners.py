"""The task table: a job's task name -> the runner that serves it, and nothing else.

A runner has three parts. `parse` reads a job's request (a JSON dict in its Redis record) into
typed parameters; an error there is caused by the job's own input (`JobInputError`), so that
job fails alone, at once, and never reaches an engine. `begin` turns parsed parameters into
the job's sampler rows at step 0 (its prompts encoded, its noise drawn from its seeds): the
step-level scheduler steps those rows in any company (engines.tasks.txt2img.step), and
`finish` decodes finished rows to uint8 pixels, and `output` encodes each image (or video) to
the file stored with the job.

Records are normally written by the API after validation, but anything that can write to
Redis can write a record, so `parse` checks everything the engine relies on for its types and
names (with service.job_params, which reads the fields every task shares); the registry limits
(sizes, steps) stay the API's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np
import torch

from engines.model import LoadedModel
from engines.registry import DEFAULT_NOISE_LEVEL, MAX_FPS, MAX_FREE_INIT
from engines.sampler_catalog import CATALOG
from engines.sampling import Row
from engines.tasks import img2img, inpaint, superres, txt2img, video
from service.job_params import JobInputError, Txt2ImgParams, extend, get_field, parse_txt2img, stored_image
from service.media import encode_image
from service.queue import StoredImage
from service.video_media import VIDEO_FORMATS, encode_video


def begin_txt2img(model: LoadedModel, jobs: list[Txt2ImgParams]) -> list[list[Row]]:
    """Each job's rows at step 0. Jobs of one size are begun together: one text-encoder call
    for all their prompts (what batching buys at admission); noise comes from each image's
    own seed either way."""
    out: dict[int, list[Row]] = {}
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, p in enumerate(jobs):
        by_size.setdefault((p.width, p.height), []).append(k)
    for (width, height), ks in by_size.items():
        images = [image for k in ks for image in jobs[k].batch().images]
        rows = txt2img.start_rows(model, txt2img.Txt2ImgBatch(width, height, images[0].sampler, images[0].steps, images))
        start = 0
        for k in ks:
            out[k] = rows[start:start + jobs[k].num_images]
            start += jobs[k].num_images
    return [out[k] for k in range(len(jobs))]


@dataclass(frozen=True)
class Img2ImgParams(Txt2ImgParams):
    strength: float = 0.8
    image: np.ndarray | None = field(default=None, compare=False, repr=False)  # uint8 [H, W, 3]

    @property
    def steps_run(self) -> int:
        """The schedule's tail SDEdit runs (engines.tasks.img2img.first_step)."""
        return min(int(self.steps * self.strength), self.steps)

    @property
    def denoiser_calls(self) -> int:
        return CATALOG[self.sampler].calls(self.steps_run)


def parse_img2img(request: Any, model: LoadedModel, inputs: dict[str, bytes] | None = None) -> Img2ImgParams:
    base = parse_txt2img(request, model)
    strength = get_field(request, "strength", float, 0.8)
    params = extend(Img2ImgParams, base, strength=strength, image=stored_image(inputs, "image"))
    if not 0 < strength <= 1 or params.steps_run < 1:
        raise JobInputError("strength", "must be in (0, 1] with steps * strength >= 1")
    if params.image.shape != (params.height, params.width, 3):
        raise JobInputError("image", f"stored image is {params.image.shape}, the job {params.width}x{params.height}")
    if model.vae.encoder is None:
        raise JobInputError("task", f"model {model.spec.id} was loaded without its VAE encoder")
    return params


def begin_img2img(model: LoadedModel, jobs: list[Img2ImgParams]) -> list[list[Row]]:
    """Each job's rows at the start of its schedule's tail, its image's latents noised there."""
    # per job: its images share one input (num_images seeds, one strength)
    return [img2img.start_rows(model, img2img.Img2ImgBatch(
        p.batch(), img2img.pixels_to_tensor(p.repeated(p.image)), [p.strength] * p.num_images)) for p in jobs]


@dataclass(frozen=True)
class InpaintParams(Txt2ImgParams):
    mask_blur: int = 0
    image: np.ndarray | None = field(default=None, compare=False, repr=False)  # uint8 [H, W, 3]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # uint8 [H, W], white = repaint


def parse_inpaint(request: Any, model: LoadedModel, inputs: dict[str, bytes] | None = None) -> InpaintParams:
    base = parse_txt2img(request, model)
    params = extend(InpaintParams, base, mask_blur=get_field(request, "mask_blur", int, 0),
                    image=stored_image(inputs, "image"), mask=stored_image(inputs, "mask"))
    if params.image.shape != (params.height, params.width, 3):
        raise JobInputError("image", f"stored image is {params.image.shape}, the job {params.width}x{params.height}")
    if params.mask.shape != (params.height, params.width):
        raise JobInputError("mask", f"stored mask is {params.mask.shape}, the job {params.width}x{params.height}")
    if not 0 <= params.mask_blur <= 64:
        raise JobInputError("mask_blur", "must be in 0..64")
    if model.vae.encoder is None:
        raise JobInputError("task", f"model {model.spec.id} was loaded without its VAE encoder")
    return params


def begin_inpaint(model: LoadedModel, jobs: list[InpaintParams]) -> list[list[Row]]:
    """Each job's rows at step 0 (a dedicated inpainting model's or the training-free path,
    engines.tasks.inpaint): its images share one input and mask."""
    return [inpaint.start_rows(model, inpaint.InpaintBatch(
        p.batch(), img2img.pixels_to_tensor(p.repeated(p.image)), inpaint.mask_to_tensor(p.repeated(p.mask))))
        for p in jobs]


def composite_inpaint(p: InpaintParams, pixels: np.ndarray) -> np.ndarray:
    """The input's own pixels back outside the (blurred) mask, for each of the job's images."""
    return np.stack([inpaint.composite(p.image, image, p.mask, p.mask_blur) for image in pixels])


@dataclass(frozen=True)
class SuperresParams(Txt2ImgParams):
    noise_level: int = DEFAULT_NOISE_LEVEL
    back_projection: bool = True
    images: np.ndarray | None = field(default=None, compare=False, repr=False)  # uint8 [n, H/4, W/4, 3]


def parse_superres(request: Any, model: LoadedModel, inputs: dict[str, bytes] | None = None) -> SuperresParams:
    """One low-res image for all the job's images, or (a chained job's second stage,
    service.chain) one per image: `image:0`, `image:1`, ..."""
    base = parse_txt2img(request, model)
    if inputs and "image:0" in inputs:
        images = np.stack([stored_image(inputs, f"image:{k}") for k in range(base.num_images)])
    else:
        images = base.repeated(stored_image(inputs, "image"))
    noise_level = get_field(request, "noise_level", int, DEFAULT_NOISE_LEVEL)
    params = extend(SuperresParams, base, noise_level=noise_level, images=images,
                    back_projection=bool(request.get("back_projection", True)))
    f = model.vae_scale_factor
    if params.images.shape[1:] != (params.height // f, params.width // f, 3):
        raise JobInputError("image", f"stored image is {params.images.shape[1:]}, the job "
                                     f"{params.width}x{params.height} / {f}")
    if not 0 <= params.noise_level <= superres.max_noise_level(model):
        raise JobInputError("noise_level", f"must be in 0..{superres.max_noise_level(model)}")
    return params


def begin_superres(model: LoadedModel, jobs: list[SuperresParams]) -> list[list[Row]]:
    """Each job's rows: its low-res image noised to its level, concatenated at every call."""
    return [superres.start_rows(model, superres.SuperresBatch(
        p.batch(), img2img.pixels_to_tensor(p.images), [p.noise_level] * p.num_images)) for p in jobs]


def project_superres(p: SuperresParams, pixels: np.ndarray) -> np.ndarray:
    """The outputs made to average back to their inputs (superres.back_project), unless asked not to."""
    return superres.back_project(pixels, p.images) if p.back_projection else pixels


@dataclass(frozen=True)
class VideoParams(Txt2ImgParams):
    """txt2video: `num_images` videos of `frames` frames, each one row [C, F, h, w]."""

    frames: int = 16
    fps: int = 8
    free_init: int = 1  # passes (free_init_iterations)

    @property
    def passes(self) -> int:
        return self.free_init

    def shape_key(self) -> Hashable:
        return ("txt2video", self.width, self.height, self.frames)  # rows of one frame count stack

    @property
    def images_per_row(self) -> int:
        return self.frames


def parse_txt2video(request: Any, model: LoadedModel, inputs: dict[str, bytes] | None = None) -> VideoParams:
    base = parse_txt2img(request, model, formats=tuple(VIDEO_FORMATS))
    params = extend(VideoParams, base, frames=get_field(request, "num_frames", int),
                    fps=get_field(request, "fps", int, 8), free_init=get_field(request, "free_init_iterations", int, 1))
    # The registry keeps max_frames within the adapter's temporal position embeddings.
    if not model.spec.limits.min_frames <= params.frames <= model.spec.limits.max_frames:
        raise JobInputError("num_frames", f"must be in {model.spec.limits.min_frames}..{model.spec.limits.max_frames}")
    if not 1 <= params.fps <= MAX_FPS:
        raise JobInputError("fps", f"must be in 1..{MAX_FPS}")
    if not 1 <= params.free_init <= MAX_FREE_INIT:
        raise JobInputError("free_init_iterations", f"must be in 1..{MAX_FREE_INIT}")
    if request.get("preview"):  # service.previews projects image rows, not [C, F, h, w]
        raise JobInputError("preview", "txt2video sends no previews")
    return params


def begin_txt2video(model: LoadedModel, jobs: list[VideoParams]) -> list[list[Row]]:
    """Each job's videos at step 0: noise [C, F, h, w] from each video's own seed."""
    return [video.start_rows(model, video.VideoBatch(p.batch(), p.frames)) for p in jobs]


def again_txt2video(model: LoadedModel, p: VideoParams, rows: list[Row]) -> list[Row]:
    """The next FreeInit pass of a job's finished videos (their initial noise drawn again from their seeds)."""
    return video.reinitialize(model, rows, video.initial_noise(model, video.VideoBatch(p.batch(), p.frames)))


def finish_txt2video(model: LoadedModel, rows: list[Row]) -> torch.Tensor:
    """uint8 [B, F, H, W, 3]: frames decoded max_batch at a time, the VAE decoder's batch."""
    return video.finish(model, rows, model.spec.max_batch)


def image_file(p: Txt2ImgParams, pixels: np.ndarray, seed: int, fmt: str) -> StoredImage:
    return StoredImage(*encode_image(pixels, fmt), seed, p.width, p.height)


def video_file(p: VideoParams, frames: np.ndarray, seed: int, fmt: str) -> StoredImage:
    return StoredImage(*encode_video(frames, fmt, p.fps), seed, p.width, p.height, frames=p.frames, fps=p.fps)


@dataclass(frozen=True)
class Runner:
    parse: Callable[[Any, LoadedModel, dict[str, bytes]], Any]  # request, model, stored inputs -> typed params
    begin: Callable[[LoadedModel, list[Any]], list[list[Row]]]  # parsed params of jobs -> each one's rows at step 0
    finish: Callable[[LoadedModel, list[Row]], torch.Tensor]  # finished rows of one shape -> uint8 pixels
    # A job's params and its decoded uint8 [n, H, W, 3] pixels -> what it returns (inpaint's
    # compositing, superres's back-projection).
    composite: Callable[[Any, np.ndarray], np.ndarray] | None = None
    # A job's params, one image's (or video's) pixels, its seed and format -> the file stored.
    output: Callable[[Any, np.ndarray, int, str], StoredImage] = image_file
    # A job's params and finished rows -> its rows for the next of its `passes` (txt2video's FreeInit).
    again: Callable[[LoadedModel, Any, list[Row]], list[Row]] | None = None


# task name -> runner. A job whose task is missing here fails at once (never retried).
RUNNERS: dict[str, Runner] = {
    "txt2img": Runner(parse_txt2img, begin_txt2img, txt2img.finish),
    "img2img": Runner(parse_img2img, begin_img2img, txt2img.finish),
    "inpaint": Runner(parse_inpaint, begin_inpaint, txt2img.finish, composite_inpaint),
    "superres": Runner(parse_superres, begin_superres, txt2img.finish, project_superres),
    "txt2video": Runner(parse_txt2video, begin_txt2video, finish_txt2video, output=video_file, again=again_txt2video),
}
