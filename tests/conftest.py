"""Real components only: a redis-server on a free loopback port, the API and workers as
processes, and model weights loaded through a registry from diffusers-format directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from service.queue import Job

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SHIPPED = {m["id"]: m for m in json.loads((MODELS / "registry.json").read_text())["models"]}
# Engine caches built by tests (this process and the workers it starts) never touch ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="latentserve-test-cache-")


def redis_server(binary: str, data: Path):
    """A redis-server on a free loopback port, no persistence; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(up, 10, f"{binary}")
    return proc, url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: `make test` installs Debian's redis-server")
    proc, url = redis_server(binary, tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def r(redis_url):
    return redis.Redis.from_url(redis_url)


def model_entry(model_id: str, path: Path, family: str, **overrides) -> dict:
    entry = {
        "id": model_id,
        "path": str(path),
        "family": family,
        "tasks": ["txt2img", "img2img", "inpaint"],
        "samplers": ["flow_euler"] if family == "mmdit" else ["ddim", "euler"],
        "defaults": {"sampler": "flow_euler" if family == "mmdit" else "ddim", "steps": 20,
                     "guidance_scale": 4.0, "width": 64, "height": 64},
        "limits": {"min_size": 32, "max_size": 128, "size_multiple": 8, "max_steps": 50,
                   "max_guidance_scale": 30.0, "max_queue": 64},
        "max_batch": 8,
    }
    for key, value in overrides.items():
        entry[key] = {**entry.get(key, {}), **value} if isinstance(value, dict) else value
    return entry


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory) -> Path:
    """The shipped tiny models under several ids, each id its own stream:
    tiny-mmdit / tiny-ldm / pair-mmdit (max_batch 2) (served by the shared worker), tiny-x4
    (tiny-ldm's upscaler, windows of 128 pixels; served by workers a test starts), slow-ldm
    and huge-ldm (sizes to 2048) (served only by workers a test starts itself), limited (never
    served, max_queue 2), the shipped shapes-mmdit, tiny-video and slow-video (txt2video,
    up to 8 frames; max_batch 16: two 8-frame videos a call; served by workers a test starts),
    and, as shipped, shapes-mmdit-turbo, shapes-x4 and shapes-video."""
    path = tmp_path_factory.mktemp("registry") / "registry.json"
    models = [
        model_entry("tiny-mmdit", MODELS / "tiny-mmdit", "mmdit"),
        model_entry("tiny-ldm", MODELS / "tiny-ldm", "ldm", upscaler="tiny-x4"),
        model_entry("tiny-x4", MODELS / "tiny-x4", "ldm", tasks=["superres"], tile=128,
                    defaults={"steps": 10}, limits={"max_size": 512, "size_multiple": 16}),
        model_entry("slow-ldm", MODELS / "tiny-ldm", "ldm"),
        model_entry("limited", MODELS / "tiny-mmdit", "mmdit", limits={"max_queue": 2}),
        model_entry("pair-mmdit", MODELS / "tiny-mmdit", "mmdit", max_batch=2),
        model_entry("huge-ldm", MODELS / "tiny-ldm", "ldm", limits={"max_size": 2048}),
        model_entry("turbo-mmdit", MODELS / "tiny-mmdit", "mmdit",  # a distilled few-step model's limits
                    defaults={"steps": 4, "schedule": "turbo", "guidance": "none", "guidance_scale": 1.0},
                    limits={"max_steps": 4, "sizes": [[64, 64], [64, 96]], "guidance_modes": ["none"]}),
        model_entry("shapes-inpaint", MODELS / "shapes-inpaint", "ldm", tasks=["inpaint"],
                    limits={"min_size": 64, "max_size": 64, "size_multiple": 16}),
        model_entry("shapes-mmdit", MODELS / "shapes-mmdit", "mmdit", max_batch=16, guide="shapes-mmdit-guide",
                    options={"t5_sequence_length": 0}, limits={"min_size": 64, "max_size": 64}),
        model_entry("shapes-mmdit-guide", MODELS / "shapes-mmdit-guide", "mmdit",
                    options={"t5_sequence_length": 0}, limits={"min_size": 64, "max_size": 64}),
        *({**SHIPPED[shipped], "path": str(MODELS / shipped)}  # as shipped
          for shipped in ("shapes-mmdit-turbo", "shapes-x4", "shapes-video")),
        *(model_entry(video_id, MODELS / "tiny-video", "ldm", tasks=["txt2video"], max_batch=16,
                      defaults={"steps": 4, "num_frames": 4, "guidance_scale": 5.0}, limits={"max_frames": 8})
          for video_id in ("tiny-video", "slow-video")),
    ]
    path.write_text(json.dumps({"default": "tiny-mmdit", "models": models}))
    return path


def service_env(redis_url: str, registry_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(ROOT),
        "LATENTSERVE_REDIS_URL": redis_url,
        "LATENTSERVE_REGISTRY": str(registry_path),
        "LATENTSERVE_LOG_LEVEL": "warning",
        "LATENTSERVE_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    })
    env.update({f"LATENTSERVE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class Proc:
    def __init__(self, args, env, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()
        return self.popen.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


def start_api(redis_url: str, registry_path: Path, log_dir: Path) -> tuple[Proc, httpx.Client]:
    """The API as a process, and an httpx client bound to it once it answers."""
    port = free_port()
    env = service_env(redis_url, registry_path, port=port, wait_timeout_s=60)
    proc = Proc([sys.executable, "-m", "service.api"], env, log_dir / "api.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def healthy():
        assert proc.alive(), proc.output()
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, 30, "the API")
    return proc, client


@pytest.fixture(scope="session")
def api(redis_url, registry_path, tmp_path_factory):
    """The API as a process; yields an httpx client bound to it."""
    proc, client = start_api(redis_url, registry_path, tmp_path_factory.mktemp("api"))
    yield client
    client.close()
    proc.stop()


class Workers:
    """Starts worker processes: start(models="slow-ldm", worker_id="a", **settings)."""

    def __init__(self, redis_url: str, registry_path: Path, log_dir: Path):
        self.redis_url, self.registry_path, self.log_dir = redis_url, registry_path, log_dir
        self.procs: list[Proc] = []
        self.client = redis.Redis.from_url(redis_url)

    def __call__(self, models: str, worker_id: str, wait: bool = True, metrics_port: int = 0,
                 **settings) -> Proc:
        env = service_env(self.redis_url, self.registry_path, worker_models=models,
                          worker_id=worker_id, worker_metrics_port=metrics_port, **settings)
        proc = Proc([sys.executable, "-m", "service.worker"], env, self.log_dir / f"{worker_id}.log")
        proc.metrics_port = metrics_port
        self.procs.append(proc)
        if wait:  # ready once its heartbeat is in every served model's worker set
            def beating():
                assert proc.alive(), proc.output()
                return all(self.client.zscore(f"latentserve:workers:{m}", worker_id)
                           for m in models.split(","))

            wait_until(beating, 60, f"worker {worker_id}")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=10)


@pytest.fixture()
def start_worker(redis_url, registry_path, tmp_path):
    """Workers for one test; stopped when it ends."""
    workers = Workers(redis_url, registry_path, tmp_path)
    yield workers
    workers.stop_all()


@pytest.fixture(scope="session")
def worker(redis_url, registry_path, tmp_path_factory):
    """The shared worker for tiny-mmdit, tiny-ldm, pair-mmdit and turbo-mmdit. Its 0.5 s fill
    window lets concurrent requests meet in one batch."""
    workers = Workers(redis_url, registry_path, tmp_path_factory.mktemp("shared-worker"))
    yield workers("tiny-mmdit,tiny-ldm,pair-mmdit,turbo-mmdit", "shared", fill_window_s=0.5, metrics_port=free_port())
    workers.stop_all()


def generate(api: httpx.Client, wait: bool = True, **body) -> httpx.Response:
    return api.post("/v1/generate", params={"wait": "true"} if wait else None, json=body)


def job_status(api: httpx.Client, job_id: str) -> dict:
    response = api.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def job_record(model: str, task: str = "txt2img", **request) -> Job:
    """A job record as the API writes it (every request field filled in)."""

    full = {"prompt": "a red circle", "negative_prompt": "", "width": 64, "height": 64, "num_images": 1,
            "steps": 10, "sampler": "ddim", "guidance_scale": 4.0, "seed": 0, "output_format": "png",
            **request}
    return Job(id=uuid.uuid4().hex, model=model, task=task, request=full, created_at=time.time())


def enqueue_together(r: redis.Redis, jobs: list, ttl_s: int = 600) -> None:
    """Write jobs straight into Redis with the queue's own enqueue script, all in one
    transaction, so they arrive together: one blocked worker's read takes them all."""
    from service.queue import Keys, encode_job, scripts

    script = r.register_script(scripts.ENQUEUE)
    pipe = r.pipeline(transaction=True)
    for job in jobs:
        fields = [x for pair in encode_job(job).items() for x in pair]
        stored = [x for pair in job.inputs.items() for x in pair]
        script(keys=[Keys.stream(job.model), Keys.job(job.id), Keys.stream(job.model, urgent=True), Keys.inputs(job.id)],
               args=[1000, ttl_s, job.id, job.num_images, len(stored), *stored, *fields], client=pipe)
    assert all(pipe.execute())
