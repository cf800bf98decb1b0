"""Where the oracle and seed-compatibility tests run: the CPU in fp32 in CI; on a GPU host
`LATENTSERVE_TEST_DEVICE=cuda` with `LATENTSERVE_TEST_PRECISION=fp32|bf16` (bench/gpu/check.sh).

fp32 keeps the CPU tolerances (TF32 off, so float32 means float32). bf16 rounds the network's
inputs, and diffusers' pipelines also keep their latents in bf16 between steps where ours stay
fp32: there the bound is what bf16 rounding allows, and the measured errors are written to
`LATENTSERVE_TEST_REPORT` (a JSON-lines file) so the committed output shows the margins.
"""

from __future__ import annotations

import json
import os

import torch

DEVICE = os.environ.get("LATENTSERVE_TEST_DEVICE", "cpu")
PRECISION = os.environ.get("LATENTSERVE_TEST_PRECISION", "fp32")
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[PRECISION]
EXACT = PRECISION == "fp32"

if DEVICE.startswith("cuda") and EXACT:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def latent_tolerance(fp32_tol: float) -> float:
    """Relative error allowed between our sampler's latents and diffusers'."""
    return fp32_tol if EXACT else max(fp32_tol, 3e-2)


MIN_PSNR = 40.0 if EXACT else 25.0  # bf16: 26-50 dB measured on a CPU (diffusers keeps text encoders and latents in bf16)


def report(test: str, **measured) -> None:
    path = os.environ.get("LATENTSERVE_TEST_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "device": DEVICE, "precision": PRECISION, **measured}) + "\n")
