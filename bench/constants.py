"""The engine benchmark's fixed settings shared by its orchestration, jobs and report (a
module of its own so that none of them imports bench.engines)."""

from __future__ import annotations

PROMPT = "a large red circle on the left of a white background"
DENOISER_BATCHES = (1, 4, 16)
CPU_ENGINES = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"))
GPU_ENGINES = (("torch", "fp16", "cuda"), ("torch", "bf16", "cuda"), ("tensorrt", "fp16", "cuda"))
GOAL = {"model": "sd15-sized", "vs_diffusers_fp32": 3.0, "vs_diffusers_bf16": 1.3, "peak_fraction_bf16": 0.40}
