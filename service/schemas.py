"""Request and response bodies at the HTTP boundary (pydantic lives only here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.registry import MAX_FPS, MAX_FREE_INIT

Task = Literal["txt2img", "img2img", "inpaint", "superres", "txt2video"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="Registry id; the default model if omitted.")
    task: Task = "txt2img"
    prompt: str = Field(..., min_length=1, max_length=500)
    negative_prompt: str = Field("", max_length=500)
    width: int | None = Field(None, ge=1, description="Pixels; the model's default if omitted.")
    height: int | None = Field(None, ge=1)
    num_images: int = Field(1, ge=1, le=8, description="Images (txt2video: videos) of the job; k uses seed + k.")
    steps: int | None = Field(None, ge=1)
    sampler: str | None = Field(None, description="A sampler of the model's family, by its name or an alias "
                                "(e.g. euler_a, 'DPM++ 2M'); the canonical name is reported.")
    schedule: str | None = Field(None, description="default | leading | trailing | linspace | karras | exponential, "
                                 "where the sampler's diffusers scheduler defines it.")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta (0: deterministic). ddim only.")
    guidance_scale: float | None = Field(None, ge=0.0)
    guidance: Literal["cfg", "autoguidance", "apg", "none"] | None = Field(
        None, description="cfg; autoguidance (a weaker guide model, Karras et al. 2024; models with a guide); "
                          "apg (adaptive projected guidance, Sadat et al. 2024); none.")
    guidance_interval: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[sigma_lo, sigma_hi]: guide only for sigma in (lo, hi] "
                                                     "(Kynkaanniemi et al. 2024), in the model's sigma units.")
    guidance_interval_fraction: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[start, end]: guide only the steps i with start <= i/N < end.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random if omitted; image k uses seed + k.")
    output_format: Literal["png", "webp", "jpeg", "mp4", "gif"] | None = Field(
        None, description="Images: png (default), webp (lossless), jpeg. txt2video: mp4 (default: H.264, plays "
                          "everywhere), webp (animated, lossless), gif (animated, 256 colors).")
    num_frames: int | None = Field(None, ge=1, description="txt2video: frames per video (the model's default; at "
                                   "most its limits.max_frames, GET /v1/models).")
    fps: int | None = Field(None, ge=1, le=MAX_FPS,
                            description="txt2video: frames per second of the file (default 8).")
    free_init_iterations: int | None = Field(
        None, ge=1, le=MAX_FREE_INIT,
        description="txt2video: denoising passes, with FreeInit's noise re-initialisation between them "
                    "(Wu et al. 2023; diffusers' enable_free_init): frames agree more with each other, at that "
                    "many times the cost. 1 (default): off.")
    priority: Literal["high", "normal", "low"] = Field(
        "normal", description="A high-priority job joins a full batch at the next step by pausing lower-priority "
                              "ones, which resume where they stopped.")
    timeout_s: float | None = Field(None, gt=0, le=86400, description="Fail the job (reason: deadline) if it has "
                                                                      "not finished this long after submission.")
    # Image tasks (img2img, inpaint): base64 (or a data: URL) here, or files in a multipart/form-data upload.
    image: str | None = Field(None, description="img2img / inpaint: the input image (PNG, JPEG or WebP), base64.")
    mask: str | None = Field(None, description="inpaint: white = repaint, black = keep (as diffusers); base64.")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="img2img: how far the input is noised "
                                   "(1: entirely; steps * strength steps run). Default 0.8, as diffusers.")
    mask_blur: int | None = Field(None, ge=0, le=64, description="inpaint: soft edge of the mask in pixels.")
    noise_level: int | None = Field(None, ge=0, le=350, description="superres: noise added to the low-resolution "
                                    "input (0-350, default 20, as diffusers' x4 upscaler).")
    back_projection: bool | None = Field(None, description="superres (and upscale): make the output average back "
                                         "to the input over each input pixel (iterative back-projection, 3 rounds): "
                                         "colors and positions stay the input's. Default true; false gives exactly "
                                         "diffusers' StableDiffusionUpscalePipeline's image.")
    upscale: bool = Field(False, description="txt2img: then upscale x4 with the model's upscaler (GET /v1/models: "
                          "`upscaler`), as one job: its images are the upscaled ones; progress counts both stages; "
                          "noise_level applies to the second stage.")
    resize: Literal["none", "fit"] = Field("none", description="none: the image must have the job's size (its "
                                           "own size by default); fit: resized to width x height (or the "
                                           "nearest size the model serves).")
    preview: bool = Field(False, description="Progress events carry a small preview of the current x0 estimate "
                          "(the first image's, a PNG at latent resolution) where the model has a preview map.")


class ImageOut(BaseModel):
    data: str  # base64
    mime: str
    seed: int
    width: int
    height: int
    frames: int | None = None  # a video's
    fps: int | None = None


class JobOut(BaseModel):
    id: str
    status: str
    model: str | None = None
    task: str | None = None
    progress: dict | None = None
    sampler: str | None = None  # canonical name
    schedule: str | None = None
    steps: int | None = None
    error: str | None = None
    warnings: list[str] = []
    images: list[ImageOut] | None = None
    timings: dict | None = None
    batch: dict | None = None
    denoiser_calls: int | None = None
    created_at: float | None = None
    queue_position: int | None = None  # while queued: jobs ahead of it in its model's queue (0: next)


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
