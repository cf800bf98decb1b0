"""A txt2img job through the real API, Redis and a worker process, to a decodable image."""

from __future__ import annotations

import base64
import io
import json
import subprocess

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import generate, job_status


@pytest.mark.parametrize("model,fmt,size", [
    ("tiny-mmdit", "png", (64, 48)),
    ("tiny-ldm", "webp", (48, 64)),
    ("tiny-mmdit", "jpeg", (128, 32)),
])
def test_txt2img_returns_decodable_image_of_requested_size_and_format(api, worker, model, fmt, size):
    width, height = size
    response = generate(api, model=model, prompt="a red circle on the left", width=width,
                        height=height, steps=8, seed=7, num_images=2, output_format=fmt)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert [image["seed"] for image in job["images"]] == [7, 8]
    for k, image in enumerate(job["images"]):
        assert image["mime"] == f"image/{fmt}"
        decoded = Image.open(io.BytesIO(base64.b64decode(image["data"])))
        assert decoded.format == fmt.upper() and decoded.size == (width, height)
        raw = api.get(f"/v1/jobs/{job['id']}/images/{k}")
        assert raw.status_code == 200 and raw.headers["content-type"] == f"image/{fmt}"
        assert raw.content == base64.b64decode(image["data"])
    assert set(job["timings"]) == {"queue_s", "inference_s", "decode_s", "total_s"}
    assert job["batch"]["size"] >= 2
    assert api.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404


def test_default_reply_is_202_with_location_then_job_completes(api, worker):
    response = generate(api, wait=False, prompt="a blue square", steps=4)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    events = stream_events(api, body["id"])
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    final = job_status(api, body["id"])
    assert final["status"] == "succeeded" and final["progress"] == {"step": 4, "total": 4}
    assert final["model"] == "tiny-mmdit"  # the registry default


def stream_events(api: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    events, name = [], None
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "done":
                    break
    return events


def test_events_stream_progress_then_done(api, worker):
    job_id = generate(api, wait=False, model="tiny-ldm", prompt="a star", steps=30, width=128,
                      height=128).json()["id"]
    events = stream_events(api, job_id)
    names = [name for name, _ in events]
    assert names[-1] == "done" and events[-1][1]["images"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == 30
    # A finished job's stream answers at once with `done`.
    assert [name for name, _ in stream_events(api, job_id)] == ["done"]


def test_unknown_words_become_warnings_not_errors(api, worker):
    response = generate(api, prompt="a red zorblax circle", steps=2)
    assert response.status_code == 200
    warnings = response.json()["warnings"]
    assert len(warnings) == 1 and "zorblax" in warnings[0] and "red" not in warnings[0].split(":")[-1]


def test_models_lists_ids_tasks_defaults_limits(api, worker):
    body = api.get("/v1/models").json()
    assert body["default"] == "tiny-mmdit"
    models = {m["id"]: m for m in body["models"]}
    assert {"tiny-mmdit", "tiny-ldm", "slow-ldm", "limited"} <= set(models)
    m = models["tiny-ldm"]
    assert m["tasks"] == ["txt2img", "img2img", "inpaint"] and m["defaults"]["sampler"] == "ddim"
    assert m["limits"]["size_multiple"] == 8 and m["engine"] == "torch"
    assert m["live_workers"] == 1 and models["limited"]["live_workers"] == 0


def test_health_and_readiness(api, worker):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["live_workers"] >= 1


def test_metrics_parse_and_pass_promtool(api, worker):
    generate(api, prompt="a green triangle", steps=3)
    api_text = api.get("/metrics").text
    worker_text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    names = set()
    for text in (api_text, worker_text):
        names |= {family.name for family in text_string_to_metric_families(text)}
        lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    expected = {
        "latentserve_http_requests", "latentserve_generate_requests", "latentserve_queue_depth",
        "latentserve_live_workers", "latentserve_jobs_finished", "latentserve_job_failures",
        "latentserve_images_generated", "latentserve_job_queue_wait_seconds",
        "latentserve_job_inference_seconds", "latentserve_job_end_to_end_seconds",
        "latentserve_batch_size_images", "latentserve_denoise_step_seconds", "latentserve_engine_info",
    }
    assert expected <= names, expected - names
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(worker_text) for s in f.samples}
    finished = samples[("latentserve_jobs_finished_total",
                        (("model", "tiny-mmdit"), ("status", "succeeded"), ("task", "txt2img")))]
    assert finished >= 1
