"""The shipped shapes models: they load in their diffusers pipelines and generate, the VAE
keeps the scorer's reading of scenes, and the default model draws what the prompt says when
asked through the running service."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from service.config import ROOT
from training.evaluate import shuffled_cases, validate_scorer
from training.scorer import score_image
from tests.conftest import free_port, generate

MODELS = ROOT / "models"


def test_the_shipped_family_stays_within_100_mb_with_shared_files_stored_once():
    """What git stores for models/: each distinct file once (shapes-video's VAE is shapes-ldm's
    bytes, so it counts once), at most 100 MB in all."""
    tracked = subprocess.run(["git", "ls-files", "-z", "models"], cwd=ROOT, capture_output=True, check=True).stdout
    sizes = {}
    for name in filter(None, tracked.decode().split("\0")):
        data = (ROOT / name).read_bytes()
        sizes[hashlib.sha256(data).hexdigest()] = len(data)
    assert len(sizes) > 50 and sum(sizes.values()) <= 100_000_000, sum(sizes.values())


def test_scorer_reads_shapes_vae_reconstructions_at_least_99_percent():
    result = validate_scorer(MODELS / "shapes-vae", n=384)
    assert min(result["rendered"].values()) >= 0.99, result
    assert min(result["vae_reconstruction"].values()) >= 0.99, result


@pytest.mark.parametrize("model_id", ["shapes-mmdit", "shapes-mmdit-guide"])
def test_shapes_mmdit_generates_in_the_sd3_pipeline(model_id):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(MODELS / model_id, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=__import__("torch").float32)
    image = pipe("a large red circle in the center on a white background", num_inference_steps=20,
                 guidance_scale=4.0, height=64, width=64, max_sequence_length=0, output_type="np",
                 generator=__import__("torch").Generator().manual_seed(0)).images[0]
    pixels = (image * 255).round().astype(np.uint8)
    assert pixels.std() > 10  # a scene, not a flat or empty image
    if model_id == "shapes-mmdit":  # the guide is deliberately undertrained: only the main model must be right
        det = score_image(pixels)
        assert det.background == "white" and det.objects and det.objects[0].color == "red"


def test_shapes_mmdit_turbo_draws_the_prompt_in_4_unguided_steps_in_the_sd3_pipeline():
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(MODELS / "shapes-mmdit-turbo", text_encoder_3=None,
                                                    tokenizer_3=None, dtype=torch.float32)
    for k, (color, width, height) in enumerate([("red", 64, 64), ("blue", 128, 64), ("green", 96, 128)]):
        image = pipe(f"a large {color} circle in the center on a white background", num_inference_steps=4,
                     sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, height=height, width=width,
                     max_sequence_length=0, output_type="np", generator=torch.Generator().manual_seed(k)).images[0]
        det = score_image((image * 255).round().astype(np.uint8))
        assert det.background == "white" and det.objects and det.objects[0].color == color, (color, det)


def test_service_serves_the_turbo_model_in_4_rows_and_refuses_guidance_and_more_steps(api, start_worker):
    worker = start_worker("shapes-mmdit-turbo", "turbo-worker", metrics_port=free_port(), fill_window_s=0)
    prompt = "a large red circle in the center on a white background"
    before = denoiser_rows(worker.metrics_port, "shapes-mmdit-turbo")
    job = generate(api, model="shapes-mmdit-turbo", prompt=prompt, seed=3).json()
    assert job["status"] == "succeeded" and job["steps"] == 4 and job["denoiser_calls"] == 4, job
    assert denoiser_rows(worker.metrics_port, "shapes-mmdit-turbo") - before == 4  # unguided: one row per step
    det = score_image(np.asarray(Image.open(io.BytesIO(base64.b64decode(job["images"][0]["data"])))))
    assert det.objects and det.objects[0].color == "red", det
    for body, field in (({"guidance": "cfg"}, "guidance"), ({"steps": 8}, "steps")):
        response = generate(api, model="shapes-mmdit-turbo", prompt=prompt, **body)
        assert response.status_code == 422 and field in response.text, response.text


def test_shapes_ldm_generates_in_the_sd_pipeline():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "shapes-ldm", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, dtype=torch.float32)
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a large red circle in the center on a white background", num_inference_steps=20,
                 guidance_scale=4.0, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    pixels = (image * 255).round().astype(np.uint8)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 10  # a scene, not a flat or empty image
    det = score_image(pixels)
    assert det.background == "white" and det.objects and det.objects[0].color == "red", det


def test_service_draws_the_prompted_colors(api, start_worker):
    """The first 16 prompts of a seeded shuffle of the evaluation set, through API + Redis + a
    worker serving the shipped default model: color accuracy >= 90%."""
    start_worker("shapes-mmdit", "shapes-worker")
    correct = []
    for case in shuffled_cases(16):
        response = generate(api, model="shapes-mmdit", prompt=case.prompt, seed=case.seed % 2**32)
        assert response.status_code == 200, response.text
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["data"]))))
        det = score_image(pixels)
        found = {o.position: o for o in det.objects}
        for obj in case.scene.objects:
            correct.append(obj.position in found and found[obj.position].color == obj.color
                           if case.kind == "two" else bool(det.objects) and det.objects[0].color == obj.color)
    assert np.mean(correct) >= 0.9, f"color accuracy {np.mean(correct):.2f} over {len(correct)} objects"


def test_service_serves_guidance_modes_and_counts_their_rows(api, start_worker):
    """Autoguidance with the registry's guide model, APG and a guidance interval through the
    service; the worker's denoiser-row counter shows what each costs."""
    worker = start_worker("shapes-mmdit", "guidance-worker", metrics_port=free_port(), fill_window_s=0)
    prompt = "a large red circle in the center on a white background"

    def rows_for(**body) -> float:
        before = denoiser_rows(worker.metrics_port)
        job = generate(api, model="shapes-mmdit", prompt=prompt, seed=1, steps=10, **body).json()
        assert job["status"] == "succeeded", job
        det = score_image(np.asarray(Image.open(io.BytesIO(base64.b64decode(job["images"][0]["data"])))))
        assert det.objects and det.objects[0].color == "red", (body, det)
        return denoiser_rows(worker.metrics_port) - before

    assert rows_for(guidance="cfg") == 20
    assert rows_for(guidance="autoguidance", guidance_scale=2.0) == 20  # 10 main + 10 guide rows
    assert rows_for(guidance="apg", guidance_scale=6.0) == 20
    assert rows_for(guidance_interval_fraction=[0.2, 0.7]) == 15  # guided in 5 of 10 steps
    assert rows_for(guidance="none") == 10


def denoiser_rows(port: int, model: str = "shapes-mmdit") -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "latentserve_denoiser_rows_total" and s.labels.get("model") == model)
