"""No request ever sees another's image: cancelling one job of a shared batch, whichever its
position, leaves every other job with its own image and seed (finding 1 of the correctness
issue: the survivor used to receive the cancelled job's image)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import generate, job_status, wait_until

# tiny-ldm at its largest size and 50 steps: slow enough that a cancel after step 2 lands
# mid-run every time.
JOBS = [dict(model="slow-ldm", prompt=prompt, width=128, height=128, steps=50, seed=seed)
        for prompt, seed in (("a red circle", 1), ("a blue square", 2), ("a green star", 3))]


def pixels(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def solo(api, redis_url, registry_path, tmp_path_factory):
    """Each job's image when it runs alone."""
    from tests.conftest import Workers

    workers = Workers(redis_url, registry_path, tmp_path_factory.mktemp("solo"))
    workers("slow-ldm", "solo")
    try:
        out = []
        for body in JOBS:
            job = generate(api, **body).json()
            assert job["status"] == "succeeded" and job["batch"]["size"] == 1, job
            out.append(pixels(job["images"][0]))
        return out
    finally:
        workers.stop_all()


@pytest.mark.parametrize("victim", [0, 1, 2], ids=["first", "middle", "last"])
def test_cancelling_one_job_of_a_batch_leaves_the_others_their_own_images(api, start_worker, r, solo, victim):
    start_worker("slow-ldm", f"isolation-{victim}", fill_window_s=1.5)
    ids = [generate(api, wait=False, **body).json()["id"] for body in JOBS]
    wait_until(lambda: job_status(api, ids[victim])["progress"]["step"] >= 2, 60, "the batch to run")
    assert api.delete(f"/v1/jobs/{ids[victim]}").status_code == 202

    finals = [wait_until(lambda i=i: (j := job_status(api, i))["status"] not in ("queued", "running") and j,
                         120, "the batch to end") for i in ids]
    for k, (job, body) in enumerate(zip(finals, JOBS)):
        if k == victim:
            assert job["status"] == "cancelled" and "images" not in job
            assert 2 <= job["progress"]["step"] < 50
            assert not r.exists(f"latentserve:result:{ids[k]}")  # nothing of it is stored
            continue
        assert job["status"] == "succeeded", job
        assert job["batch"]["size"] == 3  # it really shared the engine calls
        [image] = job["images"]
        assert image["seed"] == body["seed"]
        assert np.abs(pixels(image) - solo[k]).max() <= 2  # its own image (batch rounding only)
