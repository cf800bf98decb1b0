"""A throwaway service stack for a load test: redis-server, the API and one worker as
processes on free loopback ports, with the worker's settings per configuration."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.serve import redis_server_binary

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, models: list[str], worker_env: dict[str, str], log_dir: Path, ready_timeout_s: float = 180):
        self.dir = Path(tempfile.mkdtemp(prefix="latentserve-load-"))
        self.models = list(models)
        self.log_dir = log_dir
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        base = {**os.environ, "LATENTSERVE_REDIS_URL": redis_url, "LATENTSERVE_WORKER_MODELS": ",".join(models),
                "LATENTSERVE_PORT": str(self.api_port), "LATENTSERVE_WORKER_METRICS_PORT": "0",
                "LATENTSERVE_LOG_LEVEL": "warning", "XDG_CACHE_HOME": str(self.dir / "cache")}
        binary, _ = redis_server_binary()
        self.procs = [self._spawn("redis", [binary, "--port", str(self.redis_port), "--save", "",
                                            "--appendonly", "no", "--dir", str(self.dir)], base)]
        try:
            self._wait(lambda: _redis_up(self.redis_port), "redis")
            self.procs.append(self._spawn("api", [sys.executable, "-m", "service.api"], base))
            self.procs.append(self._spawn("worker", [sys.executable, "-m", "service.worker"], {**base, **worker_env}))
            self._wait(self._ready, "the API and a live worker", ready_timeout_s)  # loading + warm-up
        except BaseException:  # a stack that never came up leaves no processes behind
            self.close()
            raise

    def _spawn(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _ready(self) -> bool:
        """Every model the stack serves has a live worker (/readyz asks for the default model's
        only, which a stack serving other models never has)."""
        try:
            listed = httpx.get(self.url + "/v1/models", timeout=2).json()["models"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        live = {m["id"] for m in listed if m.get("live_workers", 0) > 0}
        return set(self.models) <= live

    def _wait(self, ready, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process of the stack died waiting for {what} (logs: {self.log_dir})")
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready in {timeout}s (logs: {self.log_dir})")

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
