"""Super-resolution x4: our computation against diffusers' StableDiffusionUpscalePipeline
(same model, low-res image, seed, noise level, steps give the same image), tiled denoising
for larger inputs, the superres task through the service, and `upscale: true` chains (two
stages under one job id, surviving a worker killed in the second)."""

from __future__ import annotations

import base64
import io
import random
import signal

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from engines import loader
from engines.registry import load_registry
from engines.tasks import img2img, superres
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from service.config import ROOT
from tests.conftest import generate, job_status, wait_until
from tests.test_img2img import b64png
from tests.test_oracle import psnr
from training.shapes import random_scene, render

REGISTRY = load_registry(ROOT / "models" / "registry.json")
UPSCALERS = [m for m in ("tiny-x4", "shapes-x4") if m in REGISTRY.models]


def low_res(n: int, size: int = 16) -> np.ndarray:
    rng = random.Random(11)
    return np.stack([render(random_scene(rng), (size, size), rng) for _ in range(n)])


def pixels_of(job: dict, k: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(job["images"][k]["data"])))).astype(int)


def engine_run(model, pictures: np.ndarray, requests, steps: int, levels: list[int]) -> np.ndarray:
    h, w = pictures.shape[1:3]
    job = superres.SuperresBatch(Txt2ImgBatch(4 * w, 4 * h, "ddim", steps, requests),
                                 img2img.pixels_to_tensor(pictures), levels)
    return superres.run(model, job).numpy()


@pytest.mark.parametrize("model_id", UPSCALERS)
def test_superres_matches_the_diffusers_upscale_pipeline(model_id):
    spec = REGISTRY.get(model_id)
    model = loader.load(spec)
    side = spec.defaults.width // 4
    pictures = low_res(2, side)
    requests = [ImageRequest("a red circle on the left", "", 3, 6.0), ImageRequest("a large blue star", "green", 4, 1.0)]
    levels = [20, 150]
    ours = engine_run(model, pictures, requests, 12, levels)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(spec.path)
    for k, (request, level) in enumerate(zip(requests, levels)):
        ref = pipe(request.prompt, image=Image.fromarray(pictures[k]), negative_prompt=request.negative_prompt or None,
                   num_inference_steps=12, guidance_scale=request.guidance_scale, noise_level=level,
                   generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np").images[0]
        ref = (ref * 255).round().astype(np.uint8)
        assert ref.shape == (4 * side, 4 * side, 3) and ref.std() > 5
        assert psnr(ours[k], ref) >= 40, f"image {k}: {psnr(ours[k], ref):.1f} dB"
    other = pipe(requests[0].prompt, image=Image.fromarray(pictures[0]), num_inference_steps=12,
                 guidance_scale=requests[0].guidance_scale, noise_level=20,
                 generator=torch.Generator("cpu").manual_seed(99), output_type="np").images[0]
    assert psnr(ours[0], (other * 255).round().astype(np.uint8)) < 35  # the seed matters


# ------------------------------------------------------------------ through the service

def test_back_projection_makes_outputs_average_back_to_their_inputs():
    rng = random.Random(5)
    truth = np.stack([render(random_scene(rng), (64, 64), rng) for _ in range(2)])
    low = truth.reshape(2, 16, 4, 16, 4, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    kept = superres.back_project(truth, low).astype(int)  # consistent already (up to low's rounding): unchanged
    assert np.abs(kept - truth).max() <= 1
    off = np.clip(truth.astype(int) + 6, 0, 255).astype(np.uint8)  # a drifted background and shifted edges
    off[:, :, 1:] = off[:, :, :-1].copy()
    fixed = superres.back_project(off, low)
    assert psnr(fixed, truth) > psnr(off, truth) + 2, (psnr(fixed, truth), psnr(off, truth))
    averages = fixed.astype(float).reshape(2, 16, 4, 16, 4, 3).mean(axis=(2, 4))
    assert np.abs(averages - low).mean() < 0.5


def test_superres_through_the_service_equals_the_engine_tiled_or_not(api, start_worker, registry_path):
    """A 16x16 input -> 64x64 in one window; a 64x64 input -> 256x256 in 3x3 windows of 128;
    back-projected by default, the pipeline's image with back_projection false."""
    start_worker("tiny-x4", "x4-plain")
    model = loader.load(load_registry(registry_path).get("tiny-x4"))
    for side in (16, 64):
        picture = low_res(1, side)[0]
        direct = engine_run(model, picture[None], [ImageRequest("a green square", "", 8, 4.0)], 6, [30])
        for projected in (True, False):
            job = generate(api, model="tiny-x4", task="superres", prompt="a green square", image=b64png(picture),
                           seed=8, steps=6, noise_level=30, **({} if projected else {"back_projection": False})).json()
            assert job["status"] == "succeeded", job
            assert job["images"][0]["width"] == job["images"][0]["height"] == 4 * side
            expected = superres.back_project(direct, picture[None])[0] if projected else direct[0]
            assert np.abs(pixels_of(job) - expected).max() <= 2, (side, projected)
    response = generate(api, wait=False, model="tiny-ldm", prompt="a red circle", back_projection=True)
    assert response.status_code == 422 and response.json()["error"]["field"] == "back_projection", response.text


def test_upscale_chains_txt2img_and_x4_under_one_job(api, worker, start_worker):
    """`upscale: true`: tiny-ldm's images, each upscaled by tiny-x4, as one job whose progress
    counts both stages; the same as running the two tasks one after the other."""
    start_worker("tiny-x4", "x4-chain")
    body = dict(model="tiny-ldm", prompt="a red circle", width=32, height=32, num_images=2, seed=21, steps=6)
    chained = generate(api, upscale=True, **body).json()
    assert chained["status"] == "succeeded", chained
    assert [(i["width"], i["height"]) for i in chained["images"]] == [(128, 128)] * 2
    assert chained["progress"] == {"step": 16, "total": 16}  # 6 txt2img steps + tiny-x4's default 10
    first = generate(api, **body).json()
    for k in range(2):
        alone = generate(api, model="tiny-x4", task="superres", prompt="a red circle", seed=21 + k,
                         image=first["images"][k]["data"]).json()
        assert np.abs(pixels_of(chained, k) - pixels_of(alone)).max() <= 2, k
    assert np.abs(pixels_of(chained, 0) - pixels_of(chained, 1)).mean() > 1  # each its own input


def test_upscale_is_refused_where_it_cannot_run(api):
    response = generate(api, wait=False, model="tiny-mmdit", prompt="a red circle", upscale=True)
    assert response.status_code == 422 and response.json()["error"]["field"] == "upscale", response.text
    assert "no upscaler" in response.json()["error"]["message"]
    response = generate(api, wait=False, model="tiny-x4", task="superres", prompt="a red circle", upscale=True,
                        image=b64png(low_res(1)[0]))
    assert response.status_code == 422 and response.json()["error"]["field"] == "upscale", response.text


def test_chained_job_waits_between_stages_in_redis_and_survives_a_killed_upscaler(api, worker, start_worker, r):
    body = dict(model="tiny-ldm", prompt="a blue star", width=128, height=128, seed=2, steps=4, upscale=True)
    job_id = generate(api, wait=False, **body).json()["id"]
    # Stage 1 runs on the shared worker; no upscaler worker yet: the job waits in tiny-x4's stream.
    record = wait_until(lambda: (j := job_status(api, job_id))["model"] == "tiny-x4" and j, 60, "stage 2 queued")
    assert record["status"] == "queued" and record["task"] == "superres"
    assert record["stage"] == {"index": 2, "count": 2, "stages": [{"model": "tiny-ldm", "task": "txt2img"},
                                                                  {"model": "tiny-x4", "task": "superres"}]}
    assert r.xlen("latentserve:stream:tiny-ldm") == 0 and r.xlen("latentserve:stream:tiny-x4") == 1
    assert r.hexists(f"latentserve:input:{job_id}", "image:0")
    timing = dict(visibility_timeout_s=2, heartbeat_s=0.5)
    a = start_worker("tiny-x4", "x4-crash-a", **timing)
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] > 4, 60, "stage 2 progress on a")
    a.stop(signal.SIGKILL)
    assert job_status(api, job_id)["status"] == "running"  # killed mid-stage
    start_worker("tiny-x4", "x4-crash-b", **timing)
    final = wait_until(lambda: (j := job_status(api, job_id))["status"] in ("succeeded", "failed") and j, 120,
                       "the job to finish on b")
    assert final["status"] == "succeeded", final
    assert final["images"][0]["width"] == 512 and final["progress"] == {"step": 14, "total": 14}
    record = r.hgetall(f"latentserve:job:{job_id}")
    assert record[b"worker"] == b"x4-crash-b" and record[b"attempts"] == b"2"  # stage 2's attempts
    assert r.xlen("latentserve:stream:tiny-x4") == 0 and not r.exists(f"latentserve:input:{job_id}")
