"""Inpainting against diffusers' StableDiffusionInpaintPipeline, before compositing (PSNR >= 40
dB): the dedicated 9-channel shapes-inpaint, and the training-free path on a plain 4-channel
UNet; the training-free path on an MMDiT (no diffusers oracle: its SD3 inpaint pipeline refuses
a 4-channel transformer) keeps the known region; compositing returns the input's own pixels
outside the blurred mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from PIL import Image

from engines import loader
from engines.components import FAMILY_COMPONENTS
from engines.registry import load_registry
from engines.tasks import img2img, inpaint
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from service.config import ROOT
from tests.test_img2img import inputs
from tests.test_oracle import psnr

REGISTRY = load_registry(ROOT / "models" / "registry.json")


def half_masks(n: int, size: int = 64) -> np.ndarray:
    masks = np.zeros((n, size, size), np.uint8)
    masks[0, :, size // 2:] = 255  # right half
    if n > 1:
        masks[1, size // 4: 3 * size // 4, : size // 2] = 255  # a box on the left
    return masks


def job(sampler: str, steps: int, pictures: np.ndarray, masks: np.ndarray) -> inpaint.InpaintBatch:
    requests = [ImageRequest("a red circle on the right", "", 3, 4.0), ImageRequest("a blue square", "", 4, 2.0)]
    return inpaint.InpaintBatch(Txt2ImgBatch(64, 64, sampler, steps, requests[: len(pictures)]),
                                img2img.pixels_to_tensor(pictures), inpaint.mask_to_tensor(masks))


@pytest.mark.parametrize("model_id,sampler,steps", [
    ("shapes-inpaint", "ddim", 20),   # dedicated: 9 input channels
    ("tiny-ldm", "ddim", 20),         # training-free on a 4-channel UNet
    ("tiny-ldm", "euler", 15),
])
def test_inpaint_matches_diffusers_pipeline_before_compositing(model_id, sampler, steps):
    spec = REGISTRY.get(model_id)
    model = loader.load(spec, components=FAMILY_COMPONENTS[spec.family])
    assert inpaint.dedicated(model) == (model_id == "shapes-inpaint")
    pictures, masks = inputs(2), half_masks(2)
    batch = job(sampler, steps, pictures, masks)
    ours = inpaint.run(model, batch).numpy()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(spec.path, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False, torch_dtype=torch.float32)
    if sampler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for k, request in enumerate(batch.batch.images):
        ref = pipe(request.prompt, image=Image.fromarray(pictures[k]), mask_image=Image.fromarray(masks[k]),
                   height=64, width=64, num_inference_steps=steps, guidance_scale=request.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np").images[0]
        ref = (ref * 255).round().astype(np.uint8)
        assert ref.std() > 5
        assert psnr(ours[k], ref) >= 40, f"image {k}: {psnr(ours[k], ref):.1f} dB"


def test_training_free_inpaint_on_mmdit_keeps_the_known_region():
    spec = REGISTRY.get("shapes-mmdit")
    model = loader.load(spec, components=FAMILY_COMPONENTS[spec.family])
    pictures, masks = inputs(2), half_masks(2)
    out = inpaint.run(model, job("flow_euler", 20, pictures, masks)).numpy()
    for k in range(2):
        keep = masks[k] < 128
        inside = np.abs(out[k].astype(int) - pictures[k])[keep].mean()  # only VAE round trip error
        repainted = np.abs(out[k].astype(int) - pictures[k])[~keep].mean()
        assert inside < 12 and repainted > inside, (k, inside, repainted)


def test_composite_puts_back_the_input_outside_the_blurred_mask():
    rng = np.random.default_rng(0)
    original, generated = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    mask = half_masks(1)[0]
    exact = inpaint.composite(original, generated, mask)
    assert (exact[:, :32] == original[:, :32]).all() and (exact[:, 32:] == generated[:, 32:]).all()
    soft = inpaint.composite(original, generated, mask, blur=4)
    assert (soft[:, :16] == original[:, :16]).all()  # beyond the soft edge (3 sigma of the blur)
    assert (soft[:, 32 - 4: 32 + 4] != original[:, 32 - 4: 32 + 4]).any()  # a soft edge


# ------------------------------------------------------------------ through the service


def form(body: dict, picture: np.ndarray, mask: np.ndarray) -> dict:
    from tests.test_img2img import b64png

    return {**body, "image": b64png(picture), "mask": b64png(mask)}


def test_inpaint_through_the_service_composites_and_shares_calls_with_txt2img(api, worker):
    from tests.conftest import generate
    from tests.test_img2img import decoded

    picture, mask = inputs(1)[0], half_masks(1)[0]
    body = dict(model="tiny-ldm", task="inpaint", prompt="a red circle", seed=3, steps=12, mask_blur=2)
    job = generate(api, **form(body, picture, mask)).json()
    assert job["status"] == "succeeded", job
    out = decoded(job)
    assert (out[:, :24] == picture[:, :24]).all()  # outside the mask and its soft edge: the input, exactly
    assert np.abs(out[:, 40:] - picture[:, 40:]).mean() > 5  # repainted
    spec = load_registry(ROOT / "models" / "registry.json").get("tiny-ldm")
    model = loader.load(spec, components=FAMILY_COMPONENTS[spec.family])
    direct = inpaint.run(model, inpaint.InpaintBatch(
        Txt2ImgBatch(64, 64, "ddim", 12, [ImageRequest("a red circle", "", 3, 4.0)]),
        img2img.pixels_to_tensor(picture[None]), inpaint.mask_to_tensor(mask[None]))).numpy()[0]
    expected = inpaint.composite(picture, direct, mask, 2)
    assert np.abs(out - expected).max() <= 2


def test_dedicated_inpaint_job_survives_its_worker_being_killed(api, start_worker, r):
    """The inputs live under their own key with the job: a reclaiming worker still has them."""
    import signal

    from tests.conftest import generate, job_status, wait_until

    timing = dict(visibility_timeout_s=2, heartbeat_s=0.5)
    a = start_worker("shapes-inpaint", "inpaint-a", **timing)
    picture, mask = inputs(1)[0], half_masks(1)[0]
    body = dict(model="shapes-inpaint", task="inpaint", prompt="a red circle on the right", seed=5, steps=50,
                num_images=8)
    job_id = generate(api, wait=False, **form(body, picture, mask)).json()["id"]
    assert r.exists(f"latentserve:input:{job_id}")
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] > 0, 60, "progress on worker a")
    b = start_worker("shapes-inpaint", "inpaint-b", **timing)
    a.stop(signal.SIGKILL)
    final = wait_until(lambda: (j := job_status(api, job_id))["status"] in ("succeeded", "failed") and j,
                       120, "the job to finish on worker b")
    assert final["status"] == "succeeded", final
    assert r.hget(f"latentserve:job:{job_id}", "worker") == b"inpaint-b"
    assert r.exists(f"latentserve:input:{job_id}") == 0
    b.stop()
