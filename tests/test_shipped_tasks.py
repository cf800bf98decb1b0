"""The shipped upscaler and video model served end to end (the API, Redis and a worker
process, real weights): a superres job on shapes-x4 and a txt2video job on shapes-video each
equal what the engines make for the same request, and show what was asked."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
from PIL import Image, ImageSequence

from engines import loader
from engines.registry import load_registry
from engines.tasks import img2img, superres, video
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from tests.conftest import generate
from tests.test_img2img import b64png
from training.clips import read_clip
from training.evaluate_superres import downsample, objects
from training.shapes import caption, random_scene, render


def decoded(job: dict) -> list[np.ndarray]:
    """The frames of the job's first image (one for a still image)."""
    with Image.open(io.BytesIO(base64.b64decode(job["images"][0]["data"]))) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def test_shapes_x4_upscales_a_scene_through_the_service(api, start_worker, registry_path):
    start_worker("shapes-x4", "x4-shipped")
    rng = random.Random(23)
    prompt, scene = caption(random_scene(rng), rng)
    low = downsample(render(scene, 256, rng)[None])
    job = generate(api, model="shapes-x4", task="superres", prompt=prompt, image=b64png(low[0]), seed=9,
                   steps=8).json()
    assert job["status"] == "succeeded", job
    (served,) = decoded(job)
    assert served.shape == (256, 256, 3)
    model = loader.load(load_registry(registry_path).get("shapes-x4"))
    job_batch = superres.SuperresBatch(Txt2ImgBatch(256, 256, "ddim", 8, [ImageRequest(prompt, "", 9, 1.0)]),
                                       img2img.pixels_to_tensor(low), [20])
    direct = superres.back_project(superres.run(model, job_batch).numpy(), low)[0]
    assert np.abs(served.astype(int) - direct).max() <= 2
    assert objects(served) == objects(low[0]) != []  # the scene the input shows, at 4x


def test_shapes_video_makes_the_asked_clip_through_the_service(api, start_worker, registry_path):
    prompt = "a large red circle moving right on a white background"
    # 8 to 16 frames: the lengths it trained on and was scored at (its card)
    refused = generate(api, wait=False, model="shapes-video", task="txt2video", prompt=prompt, num_frames=4)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "num_frames", refused.text
    assert "8..16" in refused.json()["error"]["message"]
    start_worker("shapes-video", "video-shipped", torch_threads=2)
    job = generate(api, model="shapes-video", task="txt2video", prompt=prompt, steps=12, seed=4,
                   output_format="webp").json()
    assert job["status"] == "succeeded", job
    frames = np.stack(decoded(job))
    assert frames.shape == (16, 64, 64, 3) and job["images"][0]["frames"] == 16
    model = video.load(load_registry(registry_path).get("shapes-video"))
    request = ImageRequest(prompt, "", 4, model.spec.defaults.guidance_scale)
    direct = video.run(model, video.VideoBatch(Txt2ImgBatch(64, 64, "ddim", 12, [request]), 16)).numpy()[0]
    assert np.abs(frames.astype(int) - direct).max() <= 2  # WebP is lossless
    reading = read_clip(frames)
    assert (reading.majority("color"), reading.majority("shape"), reading.motion) == ("red", "circle", "right")
    short = generate(api, model="shapes-video", task="txt2video", prompt=prompt, steps=12, seed=4, num_frames=8,
                     output_format="webp").json()
    assert short["status"] == "succeeded" and short["images"][0]["frames"] == 8, short
    reading = read_clip(np.stack(decoded(short)))
    assert (reading.majority("color"), reading.majority("shape"), reading.motion) == ("red", "circle", "right")
