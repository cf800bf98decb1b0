"""The benchmark's models: the random-weight architectures (SD-1.5-sized, SD3-medium-sized),
how they are built in the diffusers layout, and the plain-data entries of every model benchmarked."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """A random-weight architecture benchmarked beside the shipped models."""

    name: str
    family: str
    sampler: str
    steps: int
    guidance: float
    weights_dtype: str  # what save_pretrained writes (loading casts to the engine's precision)
    skip_onnx: str  # why onnxruntime is not run on it ("" = it is)
    e2e_batches: tuple[int, ...] = (1,)


ARCHS = {
    "sd15-sized": Arch("sd15-sized", "ldm", "euler", 4, 7.5, "fp32", ""),
    "sd3-medium-sized": Arch(
        "sd3-medium-sized", "mmdit", "flow_euler", 4, 7.0, "bf16",
        "not run: its fp32 ONNX graph would be ~8 GB (2B-parameter transformer plus CLIP-G); "
        "exporting and checking it would take a large share of the time budget"),
}


def arch_config(name: str, quick: bool) -> dict:
    """Component configs of a benchmark architecture: the real sizes, or tiny ones (--quick)."""
    if name == "sd15-sized":
        if quick:
            return {"image": 64,
                    "unet": dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, cross_attention_dim=64,
                                 attention_head_dim=4, norm_num_groups=8, sample_size=8),
                    "vae": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                                sample_size=64, latent_channels=4, scaling_factor=0.18215),
                    "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
        return {"image": 512,  # SD-1.5: runwayml/stable-diffusion-v1-5's unet / vae / text_encoder configs
                "unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                             attention_head_dim=8, norm_num_groups=32, sample_size=64),
                "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                            sample_size=512, latent_channels=4, scaling_factor=0.18215),
                "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu")}
    if name == "sd3-medium-sized":
        if quick:
            return {"image": 64,
                    "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=128,
                                        caption_projection_dim=64, pooled_projection_dim=96, pos_embed_max_size=16),
                    "vae": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                                sample_size=64, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                use_quant_conv=False, use_post_quant_conv=False),
                    "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                    "text_2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
        return {"image": 512,  # SD3-medium: stabilityai/stable-diffusion-3-medium-diffusers' configs, no T5
                "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
                "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                            sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False, use_post_quant_conv=False),
                "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu"),  # CLIP-L/14
                "text_2": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                               hidden_act="gelu")}  # OpenCLIP bigG/14
    raise KeyError(name)


def arch_dir(work: Path, name: str, quick: bool) -> Path:
    return work / "models" / (f"{name}-quick" if quick else name)


def build_arch(name: str, quick: bool, path: Path) -> dict:
    """Write a random-weight diffusers pipeline of the architecture to `path` (skipped when a
    build of the same config is already there)."""
    arch, cfg = ARCHS[name], arch_config(name, quick)
    marker = {"arch": name, "quick": quick, "config": cfg, "weights_dtype": arch.weights_dtype}
    if (path / "bench-arch.json").is_file() and json.loads((path / "bench-arch.json").read_text()) == marker:
        return {"built": False, "build_s": 0.0, "bytes": dir_bytes(path)}

    import torch

    started = time.perf_counter()
    torch.manual_seed(0)
    pipe = make_pipeline(name, quick)
    if arch.weights_dtype == "bf16":
        pipe.to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "bench-arch.json").write_text(json.dumps(marker))
    tmp.rename(path)
    return {"built": True, "build_s": round(time.perf_counter() - started, 2), "bytes": dir_bytes(path)}


def make_pipeline(name: str, quick: bool):
    """The architecture as a diffusers pipeline with random weights (on the current default
    device: under `torch.device("meta")` it costs nothing)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.vocab import build_tokenizer

    arch, cfg = ARCHS[name], arch_config(name, quick)

    def clip_config(tokenizer, text: dict) -> CLIPTextConfig:
        # Word-level tokenizer (no hub here): CLIP pools the first EOS only when eos_token_id != 2.
        if tokenizer.eos_token_id == 2:
            raise ValueError("the tokenizer's EOS id is 2: CLIP would fall back to argmax pooling")
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=text["hidden_size"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **text)

    def vae() -> AutoencoderKL:
        n = len(cfg["vae"]["block_out_channels"])
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **cfg["vae"])

    if arch.family == "ldm":
        tokenizer = build_tokenizer(77)
        n = len(cfg["unet"]["block_out_channels"])
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), **cfg["unet"])
        # SD-1.5's scheduler settings, as an Euler scheduler (the sampler benchmarked); its
        # tables live on the CPU whatever the default device.
        with torch.device("cpu"):
            scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                               beta_schedule="scaled_linear", timestep_spacing="leading",
                                               steps_offset=1, prediction_type="epsilon")
        pipe = StableDiffusionPipeline(vae=vae(), text_encoder=CLIPTextModel(clip_config(tokenizer, cfg["text"])),
                                       tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        tokenizer, tokenizer_2 = build_tokenizer(77), build_tokenizer(77)
        with torch.device("cpu"):
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**cfg["transformer"]),
            scheduler=scheduler,
            vae=vae(),
            text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, cfg["text"])), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, cfg["text_2"])),
            tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    return pipe


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- model specs


def model_spec(entry: dict):
    """The engines.registry.ModelSpec of a benchmarked model (registry id or built arch)."""
    from engines.registry import Defaults, Limits, ModelSpec, load_registry

    if entry["source"] == "registry":
        return load_registry(entry["registry"]).get(entry["id"])
    arch = ARCHS[entry["arch"]]
    size = entry["width"]
    return ModelSpec(
        id=entry["id"], path=Path(entry["path"]), family=arch.family, tasks=("txt2img",), samplers=(arch.sampler,),
        defaults=Defaults(arch.sampler, arch.steps, arch.guidance, size, size),
        limits=Limits(min_size=64, max_size=1024, size_multiple=64, max_steps=50), max_batch=16,
        options={"t5_sequence_length": 256} if arch.family == "mmdit" else {},
        description=f"random weights, {arch.name} architecture")


def model_entries(args) -> list[dict]:
    """What to benchmark, as plain data for the subprocesses: shipped models, then the archs."""
    from engines.registry import load_registry

    registry = load_registry(args.registry)
    wanted = set(args.models or [])
    entries = []
    for spec in registry.models.values():
        if (wanted and spec.id not in wanted) or "txt2video" in spec.tasks:
            continue  # video models: their motion UNet is neither an image denoiser nor exportable
        if not wanted and (spec.id.endswith("-guide") or (args.quick and spec.id != registry.default)):
            continue  # --quick: the default model stands for the shipped ones
        d = spec.defaults
        entries.append({"id": spec.id, "source": "registry", "registry": str(args.registry), "family": spec.family,
                        "sampler": d.sampler, "steps": d.steps, "guidance": d.guidance_scale, "width": d.width,
                        "height": d.height, "e2e_batches": sorted({1, min(8, spec.max_batch)}), "skip_onnx": "",
                        "description": spec.description})
    for name, arch in ARCHS.items():
        if wanted and name not in wanted:
            continue
        size = arch_config(name, args.quick)["image"]
        path = arch_dir(args.work, name, args.quick)
        entries.append({"id": path.name, "arch": name, "source": "synthetic", "path": str(path), "family": arch.family,
                        "sampler": arch.sampler, "steps": arch.steps, "guidance": arch.guidance, "width": size,
                        "height": size, "e2e_batches": list(arch.e2e_batches), "skip_onnx": arch.skip_onnx,
                        "weights_dtype": arch.weights_dtype,
                        "description": f"random weights, {name} architecture" + (" (--quick: tiny widths)" if args.quick else "")})
    return entries
