"""Same request + same seed -> the same image, alone or in a batch (ARCHITECTURE.md invariant)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tests.conftest import generate

REQUEST = dict(model="tiny-ldm", prompt="a yellow star at the top", steps=10, seed=1234,
               guidance_scale=5.0, width=64, height=64)


def pixels(job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(job["images"][0]["data"])))).astype(int)


def test_same_request_twice_gives_identical_bytes(api, worker):
    first = generate(api, **REQUEST).json()
    second = generate(api, **REQUEST).json()
    assert first["batch"]["size"] == second["batch"]["size"] == 1
    assert first["images"][0]["data"] == second["images"][0]["data"]
    other_seed = generate(api, **{**REQUEST, "seed": 1235}).json()
    assert other_seed["images"][0]["data"] != first["images"][0]["data"]


def test_alone_vs_in_a_batch_of_four_within_two_levels(api, worker):
    alone = generate(api, **REQUEST).json()
    assert alone["batch"]["size"] == 1
    # Three other jobs with other prompts, seeds and guidance, sent at the same moment: the
    # worker's fill window puts all four in one batch.
    others = [
        {**REQUEST, "prompt": "a blue circle", "seed": 1, "guidance_scale": 3.0},
        {**REQUEST, "prompt": "a pink square on the left", "seed": 2, "negative_prompt": "red"},
        {**REQUEST, "prompt": "two green triangles", "seed": 3, "guidance_scale": 7.5},
    ]
    with ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda body: generate(api, **body).json(), [REQUEST, *others]))
    assert [job["batch"]["size"] for job in jobs] == [4, 4, 4, 4]
    diff = np.abs(pixels(jobs[0]) - pixels(alone))
    assert diff.max() <= 2, f"max pixel difference {diff.max()} between alone and batched"
    # ... and the batch-mates really differ from it (different prompts and seeds).
    assert all(np.abs(pixels(job) - pixels(alone)).mean() > 1 for job in jobs[1:])
