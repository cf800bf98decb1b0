"""The model registry: a JSON manifest naming each servable model and how to serve it.

Format (paths are relative to the manifest's directory unless absolute):

    {
      "default": "tiny-mmdit",
      "models": [
        {
          "id": "tiny-mmdit",
          "path": "tiny-mmdit",              # a diffusers-format directory (safetensors only)
          "family": "mmdit",                 # "ldm" (eps/v UNet) or "mmdit" (SD3 rectified flow)
          "description": "...",
          "tasks": ["txt2img"],
          "samplers": ["flow_euler"],
          "defaults": {"sampler": "flow_euler", "steps": 20, "guidance_scale": 4.0,
                       "width": 64, "height": 64},
          "limits": {"min_size": 32, "max_size": 128, "size_multiple": 16,
                     "max_steps": 50, "max_guidance_scale": 30.0, "max_queue": 256,
                     "max_wait_s": 0},
          "engine": "torch", "precision": "fp32", "max_batch": 8,
          "options": {"t5_sequence_length": 256},  # and APG's apg_momentum, apg_norm_threshold, apg_eta
          "guide": "tiny-mmdit-guide",             # optional: the guide model for autoguidance
          "tile": 256,                             # optional: larger images denoised in windows of 256
          "upscaler": "shapes-x4"                  # optional: the x4 model `upscale: true` chains after txt2img
        }
        # A txt2video model (an AnimateDiff directory: training.train_video's export) also has
        # "defaults": {..., "num_frames": 16} and "limits": {..., "max_frames": 32}.
      ]
    }

This module is torch-free so the API process can read it without loading any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engines.sampler_catalog import CATALOG, family_samplers

FAMILIES = {"ldm", "mmdit"}
KNOWN_TASKS = ("txt2img", "img2img", "inpaint", "superres", "txt2video")
ENGINES = ("torch", "onnxruntime", "tensorrt")  # engines.backends; "auto" picks among them
PRECISIONS = ("fp32", "bf16", "fp16")


class RegistryError(ValueError):
    """The manifest is malformed or names something that does not exist."""


# superres: the noise added to the low-res input when a request names none (StableDiffusionUpscalePipeline's)
DEFAULT_NOISE_LEVEL = 20
# txt2video's per-request bounds, read by the API's schema and the worker's parse alike
MAX_FPS = 60
MAX_FREE_INIT = 4  # FreeInit passes: each one costs a whole schedule


@dataclass(frozen=True)
class Defaults:
    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    schedule: str = "default"
    guidance: str = "cfg"  # cfg | autoguidance | apg | none
    num_frames: int = 0  # txt2video models: frames per video (0: an image model)


@dataclass(frozen=True)
class Limits:
    min_size: int = 32
    max_size: int = 1024
    size_multiple: int = 8
    max_steps: int = 50
    max_guidance_scale: float = 30.0
    max_queue: int = 256  # queued + running jobs before the API answers 429
    # 429 when a new job's predicted finish (service.cost) is further away than this (0: no limit).
    max_wait_s: float = 0.0
    # The (width, height) pairs the model serves, when it serves only some (a model trained at a
    # few sizes); empty: any size within min/max and the multiple.
    sizes: tuple[tuple[int, int], ...] = ()
    # The guidance modes a model takes: a distilled few-step model takes only "none".
    guidance_modes: tuple[str, ...] = ("cfg", "autoguidance", "apg", "none")
    # txt2video models: the most frames a video may have (at most the motion adapter's
    # temporal position embeddings, motion_max_seq_length); 0 for image models. And the
    # fewest: a motion adapter trained on one clip length may not move at shorter ones.
    max_frames: int = 0
    min_frames: int = 1


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: Path
    family: str
    tasks: tuple[str, ...]
    samplers: tuple[str, ...]
    defaults: Defaults
    limits: Limits
    description: str = ""
    engine: str = "torch"
    precision: str = "fp32"
    max_batch: int = 8  # images per engine call (each frame of a video counts as one)
    options: dict = field(default_factory=dict)
    guide: str | None = None  # registry id of the guide model for autoguidance (same family)
    # Images larger than this (output pixels per side) are denoised in overlapping windows of
    # this size (engines.tiling); 0: never. Upscalers trained at one size serve larger inputs so.
    tile: int = 0
    # Registry id of the x4 upscaler that `upscale: true` chains after this model's txt2img.
    upscaler: str | None = None

    def tokenizer_dirs(self) -> list[Path]:
        names = ["tokenizer"] if self.family == "ldm" else ["tokenizer", "tokenizer_2"]
        return [self.path / name for name in names]


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelSpec]

    def get(self, model_id: str | None) -> ModelSpec:
        """The model with this id (the default for None); KeyError if unknown."""
        return self.models[model_id or self.default]


def _spec(entry: dict, root: Path) -> ModelSpec:
    model_id = entry.get("id")
    if not model_id:
        raise RegistryError("every model needs an 'id'")
    family = entry.get("family")
    if family not in FAMILIES:
        raise RegistryError(f"{model_id}: family must be one of {sorted(FAMILIES)}, got {family!r}")
    path = Path(entry.get("path", model_id))
    path = path if path.is_absolute() else (root / path)
    if not (path / "model_index.json").is_file():
        raise RegistryError(f"{model_id}: {path} is not a diffusers model directory")
    tasks = tuple(entry.get("tasks", ["txt2img"]))
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise RegistryError(f"{model_id}: unknown tasks {unknown}")
    # Every model serves its family's whole set: a listed sampler must be one of them.
    samplers = family_samplers(family)
    bad = set(entry.get("samplers", ())) - set(samplers)
    if bad:
        raise RegistryError(f"{model_id}: samplers {sorted(bad)} do not fit family {family}")
    defaults = Defaults(**entry["defaults"])
    raw_limits = dict(entry.get("limits", {}))
    raw_limits["sizes"] = tuple(tuple(int(v) for v in size) for size in raw_limits.get("sizes", ()))
    if "guidance_modes" in raw_limits:
        raw_limits["guidance_modes"] = tuple(raw_limits["guidance_modes"])
    limits = Limits(**raw_limits)
    if defaults.sampler not in samplers:
        raise RegistryError(f"{model_id}: default sampler {defaults.sampler!r} not in {samplers}")
    if limits.sizes and (defaults.width, defaults.height) not in limits.sizes:
        raise RegistryError(f"{model_id}: default size {defaults.width}x{defaults.height} is not in its sizes")
    if defaults.guidance not in limits.guidance_modes:
        raise RegistryError(f"{model_id}: default guidance {defaults.guidance!r} is not in its guidance_modes")
    if defaults.schedule not in CATALOG[defaults.sampler].schedules:
        raise RegistryError(f"{model_id}: default schedule {defaults.schedule!r} does not fit {defaults.sampler}")
    for side in (defaults.width, defaults.height):
        if side % limits.size_multiple or not limits.min_size <= side <= limits.max_size:
            raise RegistryError(f"{model_id}: default size {side} breaks its own limits")
    engine, precision = entry.get("engine", "torch"), entry.get("precision", "fp32")
    if engine not in (*ENGINES, "auto"):
        raise RegistryError(f"{model_id}: engine must be one of {[*ENGINES, 'auto']}, got {engine!r}")
    if "txt2video" in tasks:
        _check_video(model_id, path, family, tasks, engine, defaults, limits)
    if precision not in PRECISIONS:
        raise RegistryError(f"{model_id}: precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return ModelSpec(
        id=model_id,
        path=path.resolve(),
        family=family,
        tasks=tasks,
        samplers=samplers,
        defaults=defaults,
        limits=limits,
        description=entry.get("description", ""),
        engine=engine,
        precision=precision,
        max_batch=int(entry.get("max_batch", 8)),
        options=dict(entry.get("options", {})),
        guide=entry.get("guide"),
        tile=int(entry.get("tile", 0)),
        upscaler=entry.get("upscaler"),
    )


def _check_video(model_id: str, path: Path, family: str, tasks: tuple[str, ...], engine: str,
                 defaults: Defaults, limits: Limits) -> None:
    """A txt2video model is an AnimateDiff directory (training.train_video's export): its
    denoiser takes [B, C, F, h, w] samples, so it serves no image task; it runs on torch
    (the motion UNet's ONNX export with a dynamic frame count is wrong in onnxscript 0.7.2)."""
    if family != "ldm" or tasks != ("txt2video",):
        raise RegistryError(f"{model_id}: a txt2video model is family ldm and serves only txt2video")
    if engine != "torch":
        raise RegistryError(f"{model_id}: txt2video models run on the torch engine, got {engine!r}")
    config = path / "motion_adapter" / "config.json"
    if not config.is_file():
        raise RegistryError(f"{model_id}: txt2video needs a motion_adapter/ beside the image model (AnimateDiff)")
    positions = int(json.loads(config.read_text()).get("motion_max_seq_length", 32))
    if not 1 <= limits.max_frames <= positions:
        raise RegistryError(f"{model_id}: limits.max_frames must be in 1..{positions} (the adapter's "
                            f"motion_max_seq_length), got {limits.max_frames}")
    if not 1 <= limits.min_frames <= defaults.num_frames <= limits.max_frames:
        raise RegistryError(f"{model_id}: defaults.num_frames must be in {limits.min_frames}..{limits.max_frames} "
                            f"(limits.min_frames >= 1), got {defaults.num_frames}")


def load_registry(manifest: str | Path) -> Registry:
    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"cannot read registry {manifest}: {exc}") from exc
    models = {}
    for entry in data.get("models", []):
        spec = _spec(entry, manifest.parent)
        if spec.id in models:
            raise RegistryError(f"duplicate model id {spec.id!r}")
        models[spec.id] = spec
    for spec in models.values():
        if spec.guide is not None and (spec.guide not in models or models[spec.guide].family != spec.family):
            raise RegistryError(f"{spec.id}: guide {spec.guide!r} must be a registry model of family {spec.family}")
        if spec.upscaler is not None and (spec.upscaler not in models or "superres" not in models[spec.upscaler].tasks):
            raise RegistryError(f"{spec.id}: upscaler {spec.upscaler!r} must be a registry model serving superres")
        if spec.defaults.guidance == "autoguidance" and spec.guide is None:
            raise RegistryError(f"{spec.id}: default guidance autoguidance needs a guide model")
    default = data.get("default")
    if default not in models:
        raise RegistryError(f"default model {default!r} is not in the registry")
    return Registry(default=default, models=models)
