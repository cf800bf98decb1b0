"""Seed compatibility with diffusers: image k of our request equals the diffusers pipeline's
with one generator per image, `generator=[torch.Generator("cpu").manual_seed(seed + k) ...]`,
and the matching scheduler, for every sampler of each family (stochastic ones included: each
image's noise comes from its own generator, in diffusers' order)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

from engines import loader
from engines.registry import load_registry
from engines.sampler_catalog import CATALOG, family_samplers
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run
from service.config import ROOT
from tests.device import DEVICE, DTYPE, MIN_PSNR, PRECISION, report

REGISTRY = load_registry(ROOT / "models" / "registry.json")
PROMPT, SEED, STEPS, SCALE = "a large red circle on the left on a white background", 1234, 8, 4.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def setups():
    out = {}
    for model_id in ("shapes-ldm", "shapes-mmdit"):
        spec = REGISTRY.get(model_id)
        if spec.family == "ldm":
            pipe = StableDiffusionPipeline.from_pretrained(spec.path, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False, dtype=DTYPE)
        else:
            pipe = StableDiffusion3Pipeline.from_pretrained(spec.path, text_encoder_3=None, tokenizer_3=None,
                                                            dtype=DTYPE)
        out[model_id] = (loader.load(spec, engine="torch", precision=PRECISION, device=DEVICE), pipe.to(DEVICE))
    return out


# StableDiffusion3Pipeline does not hand its generators to scheduler.step, so flow_lcm's
# per-step noise there comes from torch's global RNG: no seed can match it. Our flow_lcm equals
# FlowMatchLCMScheduler stepped with the generators (tests/test_samplers.py).
CASES = [(m, s, 0.0) for m, fam in (("shapes-ldm", "ldm"), ("shapes-mmdit", "mmdit")) for s in family_samplers(fam)
         if s != "flow_lcm"]
CASES.append(("shapes-ldm", "ddim", 0.7))


@pytest.mark.parametrize("model_id,sampler,eta", CASES, ids=[f"{m}-{s}-eta{e}" for m, s, e in CASES])
def test_our_images_equal_the_pipelines_with_one_generator_per_image(setups, model_id, sampler, eta):
    model, pipe = setups[model_id]
    info = CATALOG[sampler]
    pipe.scheduler = getattr(diffusers, info.scheduler).from_config(pipe.scheduler.config, **dict(info.fixed))
    images = [ImageRequest(PROMPT, "", SEED + k, SCALE, sampler, STEPS, eta=eta) for k in range(2)]
    ours = run(model, Txt2ImgBatch(64, 64, sampler, STEPS, images)).numpy()
    kwargs = {"max_sequence_length": 0} if model_id == "shapes-mmdit" else {"eta": eta}
    ref = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=SCALE, height=64, width=64,
               num_images_per_prompt=2, output_type="np",
               generator=[torch.Generator("cpu").manual_seed(SEED + k) for k in range(2)], **kwargs).images
    ref = (ref * 255).round().astype(np.uint8)
    report("seed_compat", model=model_id, sampler=sampler, eta=eta, psnr=[psnr(ours[k], ref[k]) for k in range(2)])
    for k in range(2):
        assert ref[k].std() > 5, "a flat reference would prove nothing"
        assert psnr(ours[k], ref[k]) >= MIN_PSNR, f"image {k}: {psnr(ours[k], ref[k]):.1f} dB"
    # Sensitive: the other seed's image is further than the 40 dB bound (30 dB for shapes-ldm,
    # whose v-prediction model draws this fully specified prompt alike from most seeds).
    assert psnr(ours[0], ref[1]) < 35
