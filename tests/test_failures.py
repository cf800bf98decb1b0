"""How jobs fail: each kind of failure ends where it should, with real failures only (a job
record the runner can't read, a task nobody serves, a worker that really runs out of
memory, an engine call that really raises), never a mocked engine."""

from __future__ import annotations

import shutil
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.failures import REASONS
from tests.conftest import Proc, enqueue_together, generate, job_record, job_status, service_env, wait_until


def ended(api, job_id: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (j := job_status(api, job_id))["status"] not in ("queued", "running") and j,
                      timeout, f"job {job_id} to end")


def dead_lettered(r, job_id: str) -> list[dict]:
    return [fields for _, fields in r.xrange("latentserve:dead") if fields[b"job"] == job_id.encode()]


def test_a_task_without_a_runner_fails_at_once_and_is_never_retried(api, worker, r):
    job = job_record("tiny-mmdit", task="paint-by-numbers", sampler="flow_euler")
    enqueue_together(r, [job])
    final = ended(api, job.id, 30)
    assert final["status"] == "failed" and "paint-by-numbers" in final["error"] and "no runner" in final["error"]
    assert r.hget(f"latentserve:job:{job.id}", "attempts") in (None, b"0")  # never started
    assert r.xlen("latentserve:stream:tiny-mmdit") == 0
    # Its failure is counted under a reason from the closed set.
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    failures = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "latentserve_job_failures_total"}
    assert failures.get("unsupported_task", 0) >= 1 and set(failures) <= set(REASONS)


def test_a_job_whose_request_cannot_be_read_fails_alone_and_its_batch_mate_runs(api, start_worker, r):
    start_worker("slow-ldm", "input-errors", fill_window_s=0.3, visibility_timeout_s=60)
    good = job_record("slow-ldm", prompt="a yellow star", steps=4, seed=11)
    bad = job_record("slow-ldm", prompt="a red star", steps=4, seed=12)
    del bad.request["prompt"]
    bad2 = job_record("slow-ldm", steps=4, seed=13, guidance_scale="strong")
    started = time.monotonic()
    enqueue_together(r, [bad, good, bad2])
    assert ended(api, good.id, 30)["status"] == "succeeded"
    for job, field in ((bad, "prompt"), (bad2, "guidance_scale")):
        final = ended(api, job.id, 5)
        assert final["status"] == "failed" and field in final["error"], final
        assert not dead_lettered(r, job.id)  # the user's mistake, not an operator's problem
    assert time.monotonic() - started < 30  # at once, not after a visibility timeout
    assert r.hget(f"latentserve:job:{good.id}", "attempts") == b"1"
    assert job_status(api, good.id)["batch"]["size"] == 1  # the bad ones never joined it


def test_an_engine_error_fails_the_job_alone_at_once_and_is_dead_lettered(api, start_worker, r):
    """A 2x2 image passes the worker's type checks (sizes are the API's business) but not
    tiny-ldm's convolutions (a 0x0 latent): a real exception from the engine, and no retry can
    fix it. Two such jobs in one batch: each is rerun alone, fails once, and is dead-lettered."""
    w = start_worker("slow-ldm", "internal-errors", fill_window_s=0.3, visibility_timeout_s=60, max_attempts=3)
    jobs = [job_record("slow-ldm", width=2, height=2, steps=2, seed=s) for s in (1, 2)]
    enqueue_together(r, jobs)
    for job in jobs:
        final = ended(api, job.id, 30)
        assert final["status"] == "failed" and final["error"].startswith("internal error: RuntimeError"), final
        assert r.hget(f"latentserve:job:{job.id}", "attempts") == b"1"  # not retried as if transient
        assert dead_lettered(r, job.id)
    assert generate(api, model="slow-ldm", prompt="a star", steps=2).json()["status"] == "succeeded"
    assert w.alive()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_out_of_memory_releases_the_job_at_once_and_dead_letters_it_on_the_last_attempt(
        api, redis_url, registry_path, tmp_path, r):
    """A worker whose address space is capped (prlimit --as) really runs out of memory on a
    2048x2048 batch. The job goes back to the queue at once (no visibility timeout: 600 s
    here), is retried, and is dead-lettered when its attempts run out; the worker lives on."""
    env = service_env(redis_url, registry_path, worker_models="huge-ldm", worker_id="oom",
                      worker_metrics_port=0, visibility_timeout_s=600, max_attempts=2, fill_window_s=0)
    limit = 3 * 2**30  # a loaded, warmed-up worker maps ~1.4 GiB; a 2048x2048 batch needs far more
    proc = Proc(["prlimit", f"--as={limit}", sys.executable, "-m", "service.worker"], env, tmp_path / "oom.log")
    try:
        wait_until(lambda: proc.alive() and r.zscore("latentserve:workers:huge-ldm", "oom"), 60,
                   "the capped worker") or pytest.fail(proc.output())
        started = time.monotonic()
        job_id = generate(api, wait=False, model="huge-ldm", prompt="a star", width=2048, height=2048,
                          num_images=8, steps=2).json()["id"]
        final = ended(api, job_id, 120)
        assert final["status"] == "failed", (final, proc.output()[-3000:])
        assert "memory" in final["error"].lower(), final
        assert r.hget(f"latentserve:job:{job_id}", "attempts") == b"2"
        assert time.monotonic() - started < 120  # far below the 600 s visibility timeout
        assert dead_lettered(r, job_id)
        small = generate(api, model="huge-ldm", prompt="a star", steps=2).json()
        assert small["status"] == "succeeded" and proc.alive()
    finally:
        proc.stop()
