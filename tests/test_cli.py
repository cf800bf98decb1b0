"""The `latentserve` console script, run as a subprocess against the real API and worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Workers, free_port, generate, job_status, wait_until

CLI = Path(sys.executable).parent / "latentserve"
# Served by no worker in this file (conftest's shared worker serves tiny-mmdit, tiny-ldm,
# pair-mmdit, turbo-mmdit): its jobs stay queued until cancelled, as every one here is.
IDLE = "slow-ldm"


@pytest.fixture(scope="module")
def url(api, worker) -> str:
    return str(api.base_url).rstrip("/")


@pytest.fixture(scope="module")
def media_worker(redis_url, registry_path, tmp_path_factory):
    """A worker for the models the shared one does not serve: tiny-video and tiny-x4."""
    workers = Workers(redis_url, registry_path, tmp_path_factory.mktemp("cli-media-worker"))
    yield workers("tiny-video,tiny-x4", "cli-media")
    workers.stop_all()


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "LATENTSERVE_URL"}
    return {**out, **extra}


def cli(*args: str, url: str | None = None, timeout: float = 120, **extra_env) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"no console script at {CLI}: install the project (pip install -e .)"
    command = [str(CLI), *args] + (["--url", url] if url else [])
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def start_cli(*args: str, url: str) -> tuple[subprocess.Popen, str]:
    """The CLI running in the background; returns it with its job's id (from its stderr)."""
    # SIGINT as a terminal delivers it: a shell starting a background job without job
    # control makes it ignore SIGINT, which the CLI (as Python) would inherit, and Ctrl+C
    # would then do nothing (CI run as `bash .ci/run &` failed the Ctrl+C test so)
    proc = subprocess.Popen([str(CLI), *args, "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.readline()
    found = re.match(r"latentserve: job ([0-9a-f]+) queued", first)
    assert found, first + proc.stderr.read()
    return proc, found.group(1)


def outputs(stdout: str) -> list[tuple[Path, int]]:
    """The "PATH<TAB>SEED" lines generate prints."""
    return [(Path(path), int(seed)) for path, seed in (line.split("\t") for line in stdout.splitlines())]


def test_generate_writes_the_image_and_prints_path_and_seed_with_a_progress_bar(url, tmp_path):
    out = tmp_path / "out.png"
    done = cli("generate", "a red circle", "-o", str(out), "--size", "64x48", "--steps", "12", "--seed", "7",
               "--model", "tiny-ldm", url=url)
    assert done.returncode == 0, done.stderr
    assert outputs(done.stdout) == [(out, 7)]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 48)
    assert re.search(r"\b12/12\b", done.stderr), done.stderr  # tqdm's bar, with the step total

    # The same seed again, with the server named by LATENTSERVE_URL alone: the same bytes.
    again = cli("generate", "a red circle", "-o", str(tmp_path / "again.png"), "--size", "64x48", "--steps", "12",
                "--seed", "7", "--model", "tiny-ldm", "--quiet", LATENTSERVE_URL=url)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    assert "12/12" not in again.stderr  # --quiet: no bar


def test_several_images_get_numbered_files_and_json(url, tmp_path):
    done = cli("generate", "a blue square", "-n", "2", "--steps", "4", "--seed", "40", "--json",
               "-o", str(tmp_path / "img.webp"), url=url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["model"] == "tiny-mmdit"  # the registry default
    written = [(Path(i["path"]), i["seed"]) for i in job["images"]]
    assert written == [(tmp_path / "img-0.webp", 40), (tmp_path / "img-1.webp", 41)]
    assert all("data" not in image for image in job["images"])
    for path, _ in written:
        with Image.open(path) as image:  # the format follows the suffix
            assert image.format == "WEBP" and image.size == (64, 64)

    # -o a directory: <job id>-<k>.<ext> inside it.
    done = cli("generate", "a blue square", "--steps", "2", "--format", "jpeg", "-o", str(tmp_path), url=url)
    assert done.returncode == 0, done.stderr
    [(path, _)] = outputs(done.stdout)
    assert path.parent == tmp_path and re.fullmatch(r"[0-9a-f]+-0\.jpg", path.name)
    with Image.open(path) as image:
        assert image.format == "JPEG"


def test_img2img_uploads_the_input_image(url, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (48, 64), (200, 30, 30)).save(source)
    done = cli("generate", "a green star", "--image", str(source), "--strength", "0.5", "--steps", "6",
               "--json", "-o", str(tmp_path / "out.png"), url=url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["task"] == "img2img" and job["status"] == "succeeded"
    with Image.open(job["images"][0]["path"]) as image:
        assert image.size == (48, 64)  # the input's size


def mp4(path: Path) -> tuple[int, tuple[int, int], float]:
    """An MP4 file's (frame count, (width, height), frames per second), decoded with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("mov") and stream.codec_context.name == "h264"
        frames = list(container.decode(video=0))
        return len(frames), (frames[0].width, frames[0].height), float(stream.average_rate)


def test_txt2video_writes_an_mp4_with_its_frames_and_the_suffix_picks_the_format(url, media_worker, tmp_path):
    clip = tmp_path / "clip.mp4"  # the suffix makes it a txt2video job, in MP4
    done = cli("generate", "a red circle moving right", "--model", "tiny-video", "--frames", "6", "--fps", "12",
               "--size", "48x32", "--steps", "3", "--seed", "5", "-o", str(clip), url=url)
    assert done.returncode == 0, done.stderr
    assert outputs(done.stdout) == [(clip, 5)] and re.search(r"\b3/3\b", done.stderr), done.stderr
    assert mp4(clip) == (6, (48, 32), 12.0)

    # -o *.gif alone: a txt2video job (the model's default 4 frames), two videos numbered;
    # --free-init 2: two passes of the 2 steps.
    done = cli("generate", "a blue square moving up", "--model", "tiny-video", "-n", "2", "--size", "32x32",
               "--steps", "2", "--seed", "8", "--free-init", "2", "--json", "-o", str(tmp_path / "anim.gif"), url=url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["task"] == "txt2video" and [i["frames"] for i in job["images"]] == [4, 4]
    assert job["progress"] == {"step": 4, "total": 4} and job["denoiser_calls"] == 4
    for k, image in enumerate(job["images"]):
        assert image["path"] == str(tmp_path / f"anim-{k}.gif") and image["mime"] == "image/gif"
        with Image.open(image["path"]) as gif:
            assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (32, 32)


def test_superres_and_upscale_write_images_4x_the_input(url, media_worker, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (24, 16), (30, 120, 200)).save(small)
    done = cli("generate", "a blue square", "--task", "superres", "--model", "tiny-x4", "--image", str(small),
               "--noise-level", "30", "--steps", "3", "--json", "-o", str(tmp_path / "big.png"), url=url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["task"] == "superres" and job["status"] == "succeeded"
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (96, 64)
    for name, flags in (("kept", []), ("raw", ["--no-back-projection"])):  # the same seed, projected or not
        done = cli("generate", "a blue square", "--task", "superres", "--model", "tiny-x4", "--image", str(small),
                   "--steps", "3", "--seed", "5", *flags, "-o", str(tmp_path / f"{name}.png"), url=url)
        assert done.returncode == 0, done.stderr
    kept, raw = (np.asarray(Image.open(tmp_path / f"{name}.png")).astype(float) for name in ("kept", "raw"))
    target = np.array([30, 120, 200])  # the input's one color: back-projection brings each 4x4 block's mean to it
    errors = [float(np.abs(x.reshape(16, 4, 24, 4, 3).mean((1, 3)) - target).mean()) for x in (kept, raw)]
    assert errors[0] < errors[1] / 4, errors  # (tiny-x4's noise clips at 0 and 255, so not exactly 0)

    up = tmp_path / "up.webp"  # txt2img on tiny-ldm, then its upscaler tiny-x4: one job
    done = cli("generate", "a red circle", "--model", "tiny-ldm", "--upscale", "--size", "32x48", "--steps", "3",
               "--seed", "4", "-o", str(up), url=url)
    assert done.returncode == 0, done.stderr
    assert outputs(done.stdout) == [(up, 4)]
    assert re.search(r"\b13/13\b", done.stderr), done.stderr  # the bar counts both stages: 3 + tiny-x4's 10
    with Image.open(up) as image:
        assert image.format == "WEBP" and image.size == (128, 192)


def test_a_refused_request_exits_3_with_the_apis_message(url, api, tmp_path):
    refused = generate(api, wait=False, prompt="a red circle", width=13, height=13).json()["error"]
    done = cli("generate", "a red circle", "--size", "13x13", "-o", str(tmp_path / "x.png"), url=url)
    assert done.returncode == 3, done.stderr
    assert refused["message"] in done.stderr and f"[field: {refused['field']}]" in done.stderr
    assert refused["field"] == "width" and done.stdout == "" and not list(tmp_path.iterdir())

    assert cli("jobs", "get", "no-such-job", url=url).returncode == 3
    assert cli("generate", "x", "--size", "13", url=url).returncode == 2  # argparse: not WxH


def test_an_unreachable_server_exits_4():
    done = cli("models", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 4 and "no answer from" in done.stderr


def test_models_lists_the_registry(url, registry_path):
    done = cli("models", "--json", url=url)
    assert done.returncode == 0, done.stderr
    models = {m["id"]: m for m in json.loads(done.stdout)["models"]}
    assert set(models) == {m["id"] for m in json.loads(registry_path.read_text())["models"]}
    assert models["tiny-mmdit"]["live_workers"] >= 1 and models[IDLE]["live_workers"] == 0

    table = cli("models", url=url).stdout.splitlines()
    assert table[0].split() == ["ID", "TASKS", "SIZE", "STEPS", "SAMPLER", "UPSCALER", "WORKERS"]
    row = next(line.split() for line in table if line.startswith("tiny-mmdit "))
    assert row[:2] == ["tiny-mmdit", "*"] and row[3:] == ["64x64", "20", "flow_euler", "-",
                                                          str(models["tiny-mmdit"]["live_workers"])]
    assert next(line.split() for line in table if line.startswith("tiny-ldm "))[5] == "tiny-x4"


def test_jobs_get_and_cancel_a_queued_job_and_its_waiter_exits_5(url, api):
    waiter, job_id = start_cli("generate", "an orange square", "--model", IDLE, url=url)
    try:
        got = cli("jobs", "get", job_id, url=url)
        assert got.returncode == 0 and json.loads(got.stdout)["status"] == "queued"
        cancelled = cli("jobs", "cancel", job_id, url=url)
        assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
        assert json.loads(cli("jobs", "get", job_id, url=url).stdout)["status"] == "cancelled"
        _, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 5 and f"job {job_id} was cancelled" in stderr
        assert re.search(r"queued \(position \d+\)", stderr), stderr  # the bar's label while queued
    finally:
        waiter.kill()


def test_ctrl_c_cancels_the_job_and_exits_130(url, api):
    proc, job_id = start_cli("generate", "an orange square", "--model", IDLE, url=url)
    try:
        wait_until(lambda: job_status(api, job_id)["status"] == "queued", 10, "the job")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130 and f"job {job_id} cancelled" in stderr
        assert job_status(api, job_id)["status"] == "cancelled"
    finally:
        proc.kill()


class DroppingProxy:
    """A TCP proxy on loopback in front of the API: `drop()` breaks every open connection, as
    a network blip or a proxy's idle timeout would; `close()` also stops accepting new ones."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.upstream, self.open, self.requested = port, [], b""  # requested: what clients sent
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.open += [client, server]
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client:
                    self.requested += data
                sink.sendall(data)
        except OSError:
            pass
        self.shut(source, sink)

    def drop(self) -> None:
        self.shut(*self.open)
        self.open = []

    def close(self) -> None:
        self.shut(self.listener)  # wakes the blocked accept(): close() alone would not stop it
        self.listener.close()
        self.drop()

    @staticmethod
    def shut(*sockets: socket.socket) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_dropped_event_stream_is_reopened_once(api):
    proxy, waiters = DroppingProxy(api.base_url.port), []

    def waiting() -> tuple[subprocess.Popen, str, bytes]:
        waiter, job_id = start_cli("generate", "an orange square", "--model", IDLE, url=proxy.url)
        waiters.append((waiter, job_id))
        stream = f"GET /v1/jobs/{job_id}/events".encode()
        wait_until(lambda: stream in proxy.requested, 10, "the event stream")
        return waiter, job_id, stream

    try:
        waiter, job_id, stream = waiting()
        proxy.drop()
        wait_until(lambda: proxy.requested.count(stream) == 2, 10, "the stream to be reopened")
        api.delete(f"/v1/jobs/{job_id}")  # its end arrives through the reopened stream
        _, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 5, stderr

        # Dropped with nothing to reconnect to: the server is unreachable (the job goes on).
        waiter, job_id, _ = waiting()
        proxy.close()
        _, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 4 and f"lost the event stream of job {job_id}" in stderr, stderr
        assert job_status(api, job_id)["status"] == "queued"
    finally:
        proxy.close()
        for waiter, job_id in waiters:
            waiter.kill()
            api.delete(f"/v1/jobs/{job_id}")


def test_help_documents_the_exit_codes():
    done = cli("--help")
    assert done.returncode == 0
    for code in ("0", "1", "2", "3", "4", "5", "130"):
        assert re.search(rf"^\s+{code}\s+\w", done.stdout, re.M), code
