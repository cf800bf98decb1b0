"""txt2video served end to end: the API, Redis and real workers with tiny-video (tiny-ldm plus
a random motion adapter). One file per video in the asked format (MP4 read back with PyAV,
WebP and GIF with Pillow) with its frames, size and fps; equal to engines.tasks.video run
directly with the same seed; videos batch among themselves with each frame weighing an image
against max_batch; clear 422s; a worker killed mid-video leaves the job to another."""

from __future__ import annotations

import base64
import io
import json
import signal

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from engines.registry import RegistryError, load_registry
from engines.tasks import video
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from service.config import ROOT
from service.video_media import encode_video
from tests.conftest import Workers, enqueue_together, generate, job_record, job_status, wait_until

PROMPT = "a red circle moving right"
SMALL = dict(model="tiny-video", task="txt2video", prompt=PROMPT, width=48, height=32, steps=3)


@pytest.fixture(scope="module")
def video_worker(redis_url, registry_path, tmp_path_factory):
    workers = Workers(redis_url, registry_path, tmp_path_factory.mktemp("video-worker"))
    yield workers("tiny-video", "video")
    workers.stop_all()


@pytest.fixture(scope="module")
def engine(registry_path):
    return video.load(load_registry(registry_path).get("tiny-video"))


def direct(model, seed: int, frames: int, width: int, height: int, steps: int, free_init: int = 1) -> np.ndarray:
    """uint8 [F, H, W, 3]: the video engines.tasks.video makes for this seed, alone."""
    spec = model.spec
    request = ImageRequest(PROMPT, "", seed, spec.defaults.guidance_scale)
    batch = Txt2ImgBatch(width, height, spec.defaults.sampler, steps, [request])
    return video.run(model, video.VideoBatch(batch, frames, free_init=free_init)).numpy()[0]


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, float]:
    """A video file -> (uint8 frames [F, H, W, 3], frames per second)."""
    if fmt == "mp4":
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            return np.stack(frames), float(stream.average_rate)
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt.upper() and image.info["loop"] == 0
    frames, durations = [], []
    for frame in ImageSequence.Iterator(image):
        frames.append(np.asarray(frame.convert("RGB")))  # loading the frame sets its duration
        durations.append(frame.info["duration"])
    return np.stack(frames), 1000 / float(np.mean(durations))


def video_of(api, job: dict, k: int = 0) -> tuple[bytes, str]:
    """Video k of a finished job as GET /v1/jobs/{id}/images/{k} serves it, checked against
    the job body's copy."""
    response = api.get(f"/v1/jobs/{job['id']}/images/{k}")
    assert response.status_code == 200
    assert response.content == base64.b64decode(job["images"][k]["data"])
    return response.content, response.headers["content-type"]


@pytest.mark.parametrize("fmt,mime,fps", [("mp4", "video/mp4", 12), ("webp", "image/webp", 8), ("gif", "image/gif", 10)])
def test_txt2video_in_each_format_has_its_frames_size_and_fps(api, video_worker, engine, fmt, mime, fps):
    seed, frames = 21, 6
    response = generate(api, **SMALL, num_frames=frames, fps=fps, output_format=fmt, seed=seed)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["task"] == "txt2video"
    assert job["progress"] == {"step": 3, "total": 3}
    [entry] = job["images"]  # one file per video
    assert {k: v for k, v in entry.items() if k != "data"} == {
        "mime": mime, "seed": seed, "width": 48, "height": 32, "frames": frames, "fps": fps}
    data, content_type = video_of(api, job)
    assert content_type == mime
    pixels, rate = decode(data, fmt)
    assert pixels.shape == (frames, 32, 48, 3)
    # GIF stores hundredths of a second: 10 fps is exactly 100 ms; MP4 and WebP keep the rate.
    assert rate == pytest.approx(fps, rel=0.01)
    ours = direct(engine, seed, frames, 48, 32, 3)
    assert ours.std() > 5, "the direct video is flat: the comparison would prove nothing"
    if fmt == "webp":  # lossless: what the engine made, to batch invariance's 2/255
        assert np.abs(pixels.astype(int) - ours.astype(int)).max() <= 2
    else:  # a palette or H.264 (lossy on these noise-like frames): what our frames encode to
        expected, _ = decode(encode_video(ours, fmt, fps)[0], fmt)
        assert np.abs(pixels.astype(int) - expected.astype(int)).mean() <= 1
        other = direct(engine, seed + 1, frames, 48, 32, 3)
        assert np.abs(pixels.astype(int) - other.astype(int)).mean() > 10  # and no other seed's
    # Frames differ from each other, and in their own order.
    assert np.abs(pixels[0].astype(int) - pixels[-1].astype(int)).mean() > 1


def test_a_plain_request_gets_the_defaults(api, video_worker):
    """No num_frames, fps or output_format: the model's frames (tiny-video here: 4), 8 fps, MP4."""
    job = generate(api, **SMALL, seed=5).json()
    assert {k: v for k, v in job["images"][0].items() if k != "data"} == {
        "mime": "video/mp4", "seed": 5, "width": 48, "height": 32, "frames": 4, "fps": 8}


def test_video_jobs_batch_among_themselves_with_frames_counted_against_max_batch(api, video_worker, engine, r):
    """Three 8-frame videos arrive together at a worker whose max_batch is 16 images: two share
    each call (16 frames), the third runs alone after them (counted as one image each, all three
    would have shared). Each job gets its own video: its seed's, as if made alone."""
    jobs = [job_record("tiny-video", "txt2video", prompt=PROMPT, width=32, height=32, steps=3, seed=seed,
                       guidance_scale=5.0, num_frames=8, fps=8, output_format="webp") for seed in (1, 2, 3)]
    enqueue_together(r, jobs)
    done = [wait_until(lambda j=j: (s := job_status(api, j.id))["status"] in ("succeeded", "failed") and s,
                       120, f"job {j.id}") for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 3, [d.get("error") for d in done]
    assert [d["batch"]["size"] for d in done] == [2, 2, 1]
    videos = []
    for d, j in zip(done, jobs):
        pixels, _ = decode(video_of(api, d)[0], "webp")
        ours = direct(engine, j.request["seed"], 8, 32, 32, 3)
        assert np.abs(pixels.astype(int) - ours.astype(int)).max() <= 2
        videos.append(pixels)
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 5  # batch-mates differ


def test_free_init_jobs_run_their_passes_beside_plain_ones(api, video_worker, engine, r):
    """A FreeInit job (3 passes) and a plain one of the same shape arrive together and share
    calls: the plain one finishes after its pass, the other restarts its rows twice. Each
    gets the video the engine makes for it alone; progress and denoiser calls count passes."""
    jobs = [job_record("tiny-video", "txt2video", prompt=PROMPT, width=32, height=32, steps=3, seed=seed,
                       guidance_scale=5.0, num_frames=4, fps=8, output_format="webp", free_init_iterations=passes)
            for seed, passes in ((7, 3), (8, 1))]
    enqueue_together(r, jobs)
    done = [wait_until(lambda j=j: (s := job_status(api, j.id))["status"] in ("succeeded", "failed") and s,
                       120, f"job {j.id}") for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 2, [d.get("error") for d in done]
    assert [d["progress"] for d in done] == [{"step": 9, "total": 9}, {"step": 3, "total": 3}]
    assert [d["denoiser_calls"] for d in done] == [9, 3]
    assert [d["batch"]["size"] for d in done] == [2, 2]  # they shared the first pass's calls
    for d, j in zip(done, jobs):
        pixels, _ = decode(video_of(api, d)[0], "webp")
        passes = j.request["free_init_iterations"]
        ours = direct(engine, j.request["seed"], 4, 32, 32, 3, free_init=passes)
        assert np.abs(pixels.astype(int) - ours.astype(int)).max() <= 2
    plain_pass = direct(engine, 7, 4, 32, 32, 3)  # what the FreeInit job's first pass alone would make
    assert np.abs(decode(video_of(api, done[0])[0], "webp")[0].astype(int) - plain_pass.astype(int)).mean() > 5


def test_a_record_past_the_frame_limit_fails_at_parse(api, video_worker, r):
    """A record written straight to Redis (no API) with more frames than the adapter's limit
    fails alone, as invalid input, before any engine call."""
    job = job_record("tiny-video", "txt2video", prompt=PROMPT, width=32, height=32, steps=3, num_frames=64,
                     fps=8, output_format="mp4")
    enqueue_together(r, [job])
    final = wait_until(lambda: (s := job_status(api, job.id))["status"] in ("succeeded", "failed") and s,
                       60, "the job to fail")
    assert final["status"] == "failed" and final["error"] == "invalid request: num_frames: must be in 1..8"


@pytest.mark.parametrize("change,field", [
    ({"num_frames": 9}, "num_frames"),  # tiny-video's limits.max_frames is 8
    ({"num_frames": 0}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"fps": 61}, "fps"),
    ({"output_format": "png"}, "output_format"),  # an image format for a video
    ({"output_format": "avi"}, "output_format"),
    ({"task": "txt2img"}, "task"),  # a video model asked for images
    ({"task": "video"}, "task"),  # the old name
    ({"model": "tiny-ldm"}, "task"),  # an image model asked for a video
    ({"preview": True}, "preview"),
    ({"upscale": True}, "upscale"),
    ({"strength": 0.5}, "strength"),
    ({"width": 50}, "width"),
    ({"free_init_iterations": 0}, "free_init_iterations"),
    ({"free_init_iterations": 5}, "free_init_iterations"),
])
def test_bad_video_requests_are_422s_naming_the_field(api, r, change, field):
    before = r.xlen("latentserve:stream:tiny-video")
    response = generate(api, wait=False, **{**SMALL, **change})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["code"] == "invalid_request", error
    assert r.xlen("latentserve:stream:tiny-video") == before  # nothing was queued


@pytest.mark.parametrize("change,field", [({"output_format": "mp4"}, "output_format"),
                                          ({"output_format": "gif"}, "output_format"),
                                          ({"num_frames": 4}, "num_frames"), ({"fps": 8}, "fps"),
                                          ({"free_init_iterations": 2}, "free_init_iterations")])
def test_video_fields_on_an_image_task_are_422s(api, change, field):
    response = generate(api, wait=False, model="tiny-ldm", prompt=PROMPT, **change)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_models_lists_the_video_task_and_its_frame_limit(api):
    models = {m["id"]: m for m in api.get("/v1/models").json()["models"]}
    listed = models["tiny-video"]
    assert listed["tasks"] == ["txt2video"]
    assert listed["limits"]["max_frames"] == 8 and listed["defaults"]["num_frames"] == 4


def test_the_shipped_entry_and_the_registry_checks_of_a_video_model(tmp_path):
    """models/registry.json's tiny-video loads; an entry whose frames exceed the adapter's
    temporal positions, or that mixes image tasks in, is refused when the registry loads."""
    shipped = load_registry(ROOT / "models" / "registry.json").get("tiny-video")
    assert shipped.tasks == ("txt2video",) and shipped.limits.max_frames == 16
    entry = {"id": "v", "path": str(ROOT / "models" / "tiny-video"), "family": "ldm", "tasks": ["txt2video"],
             "defaults": {"sampler": "ddim", "steps": 4, "guidance_scale": 5.0, "width": 64, "height": 64,
                          "num_frames": 8}, "limits": {"max_frames": 32}}
    path = tmp_path / "registry.json"
    for change, message in [({"limits": {"max_frames": 33}}, "motion_max_seq_length"),
                            ({"limits": {"max_frames": 4}}, "num_frames"),
                            ({"tasks": ["txt2video", "txt2img"]}, "only txt2video"),
                            ({"engine": "onnxruntime"}, "torch"),
                            ({"path": str(ROOT / "models" / "tiny-ldm")}, "motion_adapter")]:
        path.write_text(json.dumps({"default": "v", "models": [{**entry, **change}]}))
        with pytest.raises(RegistryError, match=message):
            load_registry(path)
    path.write_text(json.dumps({"default": "v", "models": [entry]}))
    assert load_registry(path).get("v").limits.max_frames == 32


def test_killed_worker_video_is_finished_by_another(api, start_worker, r, engine):
    timing = dict(visibility_timeout_s=2, heartbeat_s=0.5)
    a = start_worker("slow-video", "video-crash-a", **timing)
    request = dict(SMALL, model="slow-video", width=32, height=32, steps=30, num_frames=8, seed=9,
                   output_format="webp")
    job_id = generate(api, wait=False, **request).json()["id"]
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] > 0, 60, "progress on worker a")
    a.stop(signal.SIGKILL)
    assert job_status(api, job_id)["status"] == "running"  # killed mid-video
    assert r.hget(f"latentserve:job:{job_id}", "worker") == b"video-crash-a"
    start_worker("slow-video", "video-crash-b", **timing)
    final = wait_until(lambda: (j := job_status(api, job_id))["status"] in ("succeeded", "failed") and j,
                       120, "the job to finish on worker b")
    assert final["status"] == "succeeded", final
    assert final["progress"] == {"step": 30, "total": 30} and final["images"][0]["frames"] == 8
    record = r.hgetall(f"latentserve:job:{job_id}")
    assert record[b"worker"] == b"video-crash-b" and record[b"attempts"] == b"2"
    assert r.xlen("latentserve:stream:slow-video") == 0
    assert r.xpending("latentserve:stream:slow-video", "workers")["pending"] == 0
    pixels, _ = decode(video_of(api, final)[0], "webp")  # the same video as an uninterrupted run
    assert np.abs(pixels.astype(int) - direct(engine, 9, 8, 32, 32, 30).astype(int)).max() <= 2
