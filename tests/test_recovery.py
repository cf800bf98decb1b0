"""A job is never lost: a worker SIGKILLed mid-job leaves it to another, which finishes it once."""

from __future__ import annotations

import signal

from tests.conftest import generate, job_status, wait_until

SLOW = dict(model="slow-ldm", prompt="a purple circle", width=128, height=128, num_images=4,
            steps=20, seed=5)


def test_killed_worker_job_is_finished_by_another(api, start_worker, r):
    timing = dict(visibility_timeout_s=2, heartbeat_s=0.5)
    a = start_worker("slow-ldm", "crash-a", **timing)
    job_id = generate(api, wait=False, **SLOW).json()["id"]
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] > 0, 60, "progress on worker a")
    assert r.hget(f"latentserve:job:{job_id}", "worker") == b"crash-a"
    b = start_worker("slow-ldm", "crash-b", **timing)
    a.stop(signal.SIGKILL)

    final = wait_until(lambda: (j := job_status(api, job_id))["status"] in ("succeeded", "failed") and j,
                       120, "the job to finish on worker b")
    assert final["status"] == "succeeded", final
    assert len(final["images"]) == 4 and final["progress"] == {"step": 20, "total": 20}
    record = r.hgetall(f"latentserve:job:{job_id}")
    assert record[b"worker"] == b"crash-b" and record[b"attempts"] == b"2"
    # Nothing left behind: the entry is acked and deleted, so no one runs the job again.
    assert r.xlen("latentserve:stream:slow-ldm") == 0
    assert r.xpending("latentserve:stream:slow-ldm", "workers")["pending"] == 0
    b.stop()


def test_sigterm_finishes_the_running_batch_then_exits(api, start_worker, r):
    w = start_worker("slow-ldm", "graceful")
    job_id = generate(api, wait=False, **{**SLOW, "steps": 8}).json()["id"]
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] > 0, 60, "progress")
    assert w.stop(signal.SIGTERM, timeout=60) == 0
    assert job_status(api, job_id)["status"] == "succeeded"
    assert r.zscore("latentserve:workers:slow-ldm", "graceful") is None
