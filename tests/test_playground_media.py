"""The playground's video, superres and upscale paths in Debian's chromium through Playwright,
against the real API and a worker serving tiny-video and tiny-x4: txt2video plays in a <video>
of the asked size and length and its MP4 downloads (read back with PyAV), GIF shows as an
image; superres from an uploaded image gives it 4x; the upscale checkbox chains the model's
upscaler (progress over both stages, the stage shown). Each request's curl and Python run."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import av
import pytest
from PIL import Image

from tests.conftest import Workers, job_status
from tests.test_playground import CHROMIUM, WATCH, chromium, choose, expect, snippet, submitted_job, visits

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (see tests/test_playground.py)")


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture()
def page(browser, api, worker):
    with visits(browser, api) as open_page:
        yield open_page()


@pytest.fixture(scope="module")
def media_worker(redis_url, registry_path, tmp_path_factory):
    """A worker for the models the shared one does not serve: tiny-video and tiny-x4."""
    workers = Workers(redis_url, registry_path, tmp_path_factory.mktemp("playground-media-worker"))
    yield workers("tiny-video,tiny-x4", "playground-media")
    workers.stop_all()


def mp4(path) -> tuple[int, tuple[int, int], float]:
    """An MP4 file's (frame count, (width, height), frames per second), decoded with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = list(container.decode(video=0))
        return len(frames), (frames[0].width, frames[0].height), float(stream.average_rate)


def test_txt2video_plays_in_a_video_element_and_downloads_its_mp4(page, api, media_worker, tmp_path):
    page.get_by_label("Model").select_option("tiny-video")
    # The video fields from the model's entry in /v1/models; image-only options out of the way.
    expect(page.get_by_label("Task")).to_have_value("txt2video")
    expect(page.get_by_label("Frames", exact=True)).to_have_value("4")  # defaults.num_frames
    expect(page.get_by_label("Frames", exact=True)).to_have_attribute("max", "8")  # limits.max_frames
    expect(page.get_by_label("Frames per second")).to_have_value("8")
    formats = page.get_by_label("Format").locator("option").evaluate_all("options => options.map(o => o.value)")
    assert formats == ["mp4", "webp", "gif"]
    expect(page.get_by_label("Live preview")).to_be_hidden()  # the API refuses previews for videos
    expect(page.get_by_label("Upscale x4", exact=False)).to_be_hidden()

    choose(page, "tiny-video", "a red circle moving right", Width=48, Height=32, Steps=3, Seed=5, Frames=6)
    page.get_by_label("Frames per second").fill("12")
    expect(page.get_by_label("FreeInit passes")).to_have_value("1")  # off unless asked
    page.get_by_label("FreeInit passes").fill("2")
    with page.expect_request(lambda r: r.url.endswith("/v1/generate")) as sent:
        job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())
    body = sent.value.post_data_json
    assert (body["num_frames"], body["fps"], body["output_format"]) == (6, 12, "mp4") and "preview" not in body
    assert body["free_init_iterations"] == 2

    video = page.locator("#results video")
    expect(video).to_be_visible(timeout=60_000)
    for attribute in ("controls", "loop", "autoplay", "muted"):
        expect(video).to_have_attribute(attribute, "")
    # Chromium decoded it: its size, and a length of 6 frames at 12 fps.
    page.wait_for_function("() => document.querySelector('#results video').readyState >= 1", timeout=10_000)
    width, height, duration = video.evaluate("v => [v.videoWidth, v.videoHeight, v.duration]")
    assert (width, height) == (48, 32) and duration == pytest.approx(6 / 12, abs=0.02)
    expect(page.get_by_text("48×32, 6 frames at 12 fps, seed 5")).to_be_visible()

    # The download link saves the job's own MP4.
    link = page.get_by_role("link", name="Download MP4")
    assert link.get_attribute("download").endswith(".mp4")
    with page.expect_download() as info:
        link.click()
    info.value.save_as(tmp_path / "saved.mp4")
    job = job_status(api, job_id)
    assert (tmp_path / "saved.mp4").read_bytes() == base64.b64decode(job["images"][0]["data"])
    assert mp4(tmp_path / "saved.mp4") == (6, (48, 32), 12.0)

    # The same request as a shell command (the file from the images route) and as Python (httpx).
    command = snippet(page, "curl")
    assert "/images/0" in command and "video-0.mp4" in command
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run
    assert mp4(tmp_path / "video-0.mp4") == (6, (48, 32), 12.0)
    program = snippet(page, "Python")
    assert "import httpx" in program and "openai" not in program
    (tmp_path / "video-0.mp4").unlink()
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert mp4(tmp_path / "video-0.mp4") == (6, (48, 32), 12.0)

    # An animated GIF shows as an image; both videos are in the gallery.
    page.get_by_label("Format").select_option("gif")
    page.keyboard.press("Control+Enter")
    gif = page.get_by_role("img", name=re.compile(r"^Result 1 of 1: a red circle moving right"))
    expect(gif).to_have_attribute("src", re.compile(r"^data:image/gif;base64,"), timeout=60_000)
    assert page.get_by_role("link", name="Download GIF").get_attribute("download").endswith(".gif")
    expect(page.get_by_role("list", name="Gallery").get_by_role("button")).to_have_count(2)
    page.get_by_role("button", name="View a red circle moving right (video seed 5)").first.click()
    expect(page.locator("#results video")).to_have_count(0)  # the newest entry: the GIF


def test_superres_of_an_uploaded_image_shows_it_4x(page, api, media_worker, tmp_path):
    Image.new("RGB", (24, 16), (30, 120, 200)).save(tmp_path / "small.png")
    page.get_by_label("Model").select_option("tiny-x4")
    expect(page.get_by_label("Task")).to_have_value("superres")
    # The job's size is the input's, x4: no width and height to give.
    expect(page.get_by_label("Width", exact=True)).to_be_hidden()
    expect(page.get_by_label("Height", exact=True)).to_be_hidden()
    expect(page.get_by_label("Noise level")).to_have_value("20")
    page.get_by_label("Image", exact=True).set_input_files(tmp_path / "small.png")
    expect(page.locator("#size-hint")).to_contain_text("this 24×16 image gives about 96×64")
    choose(page, "tiny-x4", "a blue square", Steps=3, Seed=2)
    page.get_by_label("Noise level").fill("30")
    job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())
    result = page.get_by_role("img", name=re.compile(r"^Result 1 of 1"))
    expect(result).to_be_visible(timeout=60_000)
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 64]
    job = job_status(api, job_id)
    assert job["task"] == "superres" and (job["images"][0]["width"], job["images"][0]["height"]) == (96, 64)

    # As curl (a multipart upload naming the file) and as Python (httpx): the same image.
    command = snippet(page, "curl")
    assert "-F 'image=@small.png'" in command and "--form-string 'noise_level=30'" in command
    assert "width=" not in command
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert json.loads(run.stdout)["images"][0]["data"] == job["images"][0]["data"], run
    program = snippet(page, "Python")
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "image-0.png").read_bytes() == base64.b64decode(job["images"][0]["data"])


def test_upscale_checkbox_chains_the_upscaler_and_counts_both_stages(page, api, media_worker, tmp_path):
    choose(page, "tiny-mmdit", "a red circle")
    expect(page.get_by_label("Upscale x4", exact=False)).to_be_hidden()  # tiny-mmdit has no upscaler
    choose(page, "tiny-ldm", "a red circle", Width=32, Height=48, Steps=20, Seed=3)
    page.get_by_label("Upscale x4 (tiny-x4)").check()
    expect(page.locator("#upscale-hint")).to_have_text("then tiny-x4 makes it 128×192")
    page.evaluate(WATCH)
    job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())
    result = page.get_by_role("img", name=re.compile(r"^Result 1 of 1"))
    expect(result).to_be_visible(timeout=60_000)
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 192]
    job = job_status(api, job_id)
    assert job["stage"]["index"] == 2 and job["progress"] == {"step": 30, "total": 30}  # 20 + tiny-x4's 10
    seen = page.evaluate("window.seen")
    assert max(seen["progress"]) == 30 and any(20 < v < 30 for v in seen["progress"]), seen["progress"]
    assert any(re.fullmatch(r"Running: step 2\d of 30 · stage 2 of 2: upscaling \(tiny-x4\)", text)
               for text in seen["status"]), seen["status"]

    # Python: the openai SDK, upscale in extra_body; the answer is the upscaled image.
    program = snippet(page, "Python")
    assert '"upscale": True' in program and 'size="32x48"' in program
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "image-0.png") as image:
        assert image.size == (128, 192)
