"""Step-level scheduling through the service (real Redis, API and worker processes): a job
that joins a running batch mid-way, shares calls with rows of other step counts and samplers,
or is paused for a high-priority one gives the same image as alone (within 2/255); deadlines
end jobs; the new request fields are validated."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from tests.conftest import generate, job_status, wait_until

LONG = dict(model="slow-ldm", prompt="a yellow star at the top", steps=50, seed=7, sampler="ddim")
SHORT = dict(model="slow-ldm", prompt="a blue circle", steps=10, seed=8, sampler="euler", guidance_scale=6.0)


def pixels(job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(job["images"][0]["data"])))).astype(int)


def progress(api, job_id: str) -> int:
    return (job_status(api, job_id).get("progress") or {}).get("step", 0)


def finished(api, job_id: str) -> dict:
    return wait_until(lambda: (j := job_status(api, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                      120, f"job {job_id} to finish")


def test_a_job_joining_mid_way_with_another_step_count_gets_its_solo_image(api, start_worker):
    start_worker("slow-ldm", "join-w")
    long_id = generate(api, wait=False, **LONG).json()["id"]
    wait_until(lambda: progress(api, long_id) >= 3, 60, "the long job to be under way")
    short = generate(api, **SHORT).json()
    assert short["status"] == "succeeded" and short["batch"]["size"] == 2  # it shared the long job's calls
    long = finished(api, long_id)
    assert long["status"] == "succeeded"
    assert float(long["timings"]["total_s"]) > float(short["timings"]["total_s"])
    short_alone, long_alone = generate(api, **SHORT).json(), generate(api, **LONG).json()
    assert short_alone["batch"]["size"] == long_alone["batch"]["size"] == 1
    for joined, alone in ((short, short_alone), (long, long_alone)):
        assert np.abs(pixels(joined) - pixels(alone)).max() <= 2


def test_a_high_priority_job_pauses_a_low_one_which_resumes_and_gives_its_solo_image(api, start_worker):
    start_worker("huge-ldm", "prio-w", max_batch=1)
    body = {**LONG, "model": "huge-ldm", "width": 192, "height": 192}  # long enough to be caught running
    low_id = generate(api, wait=False, **body, priority="low").json()["id"]
    wait_until(lambda: progress(api, low_id) >= 3, 60, "the low-priority job to be under way")
    high = generate(api, **{**SHORT, "model": "huge-ldm"}, priority="high").json()
    assert high["status"] == "succeeded" and high["batch"]["size"] == 1
    low = finished(api, low_id)
    assert low["status"] == "succeeded"
    assert float(job_status(api, low_id)["created_at"]) + float(low["timings"]["total_s"]) > \
        float(high["created_at"]) + float(high["timings"]["total_s"])  # the high one finished first
    alone = generate(api, **body).json()
    assert np.abs(pixels(low) - pixels(alone)).max() <= 2


def test_a_job_past_its_timeout_fails_with_the_deadline_reason(api, start_worker):
    start_worker("slow-ldm", "deadline-w")
    job = generate(api, **{**LONG, "steps": 50, "width": 128, "height": 128}, timeout_s=0.05).json()
    assert job["status"] == "failed" and job["error"].startswith("deadline"), job


def test_priority_and_timeout_are_validated(api):
    for body, field in (({"priority": "urgent"}, "priority"), ({"timeout_s": 0}, "timeout_s")):
        response = generate(api, model="tiny-mmdit", prompt="a circle", **body)
        assert response.status_code == 422 and field in response.text, response.text


def test_a_paused_job_cancelled_leaves_at_once_not_when_it_would_resume(api, start_worker):
    start_worker("huge-ldm", "pause-cancel-w", max_batch=1)
    body = {**LONG, "model": "huge-ldm", "width": 192, "height": 192}
    low_id = generate(api, wait=False, **body, priority="low").json()["id"]
    wait_until(lambda: progress(api, low_id) >= 3, 60, "the low-priority job to be under way")
    high_id = generate(api, wait=False, **{**body, "seed": 9}, priority="high").json()["id"]
    wait_until(lambda: progress(api, high_id) >= 2, 60, "the high-priority job to run (the low one paused)")
    assert api.delete(f"/v1/jobs/{low_id}").status_code == 202
    low = finished(api, low_id)
    assert low["status"] == "cancelled", low
    assert job_status(api, high_id)["status"] == "running"  # it left while the high one still ran
    assert finished(api, high_id)["status"] == "succeeded"


def test_a_job_that_cannot_finish_in_time_gets_429_with_retry_after_and_never_reaches_a_worker(
        api, start_worker, r):
    start_worker("slow-ldm", "admit-w")
    assert generate(api, **LONG).json()["status"] == "succeeded"  # the worker has measured a job
    wait_until(lambda: r.hget("latentserve:cost:slow-ldm", "admit-w"), 10, "the worker's cost to be published")
    refused = generate(api, **LONG, timeout_s=0.01)
    assert refused.status_code == 429, refused.text
    body = refused.json()["error"]
    assert body["code"] == "deadline_unreachable" and body["field"] == "timeout_s", body
    assert int(refused.headers["Retry-After"]) >= 1
    assert r.xlen("latentserve:stream:slow-ldm") == 0  # nothing was queued
    admitted = generate(api, **LONG, timeout_s=600).json()
    assert admitted["status"] == "succeeded", admitted


def test_decoding_on_the_delivery_thread_gives_the_inline_image(api, start_worker):
    """LATENTSERVE_DECODE_OVERLAP=on (the CUDA default) against off (the CPU default)."""
    start_worker("slow-ldm", "thread-w", decode_overlap="on")
    threaded = generate(api, **SHORT).json()
    assert threaded["status"] == "succeeded", threaded
    start_worker("huge-ldm", "inline-w", decode_overlap="off")
    inline = generate(api, **{**SHORT, "model": "huge-ldm"}).json()
    assert inline["status"] == "succeeded", inline
    assert np.abs(pixels(threaded) - pixels(inline)).max() == 0
