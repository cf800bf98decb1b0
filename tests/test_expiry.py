"""A job record that expires mid-run stays gone: the worker's progress and result writes
never recreate it, and GET answers 404, never 500 (finding 8 of the correctness issue)."""

from __future__ import annotations

from service.queue import decode_job
from tests.conftest import generate, job_status, wait_until


def test_a_record_expired_while_running_stays_gone(api, start_worker, r):
    start_worker("slow-ldm", "expiry", fill_window_s=0)
    job_id = generate(api, wait=False, model="slow-ldm", prompt="a red star", width=128, height=128,
                      steps=40, seed=3).json()["id"]
    wait_until(lambda: job_status(api, job_id)["progress"]["step"] >= 2, 60, "the job to run")
    r.delete(f"latentserve:job:{job_id}")  # what its TTL would do
    wait_until(lambda: r.xpending("latentserve:stream:slow-ldm", "workers")["pending"] == 0
               and r.xlen("latentserve:stream:slow-ldm") == 0, 60, "the worker to let go of it")
    assert not r.exists(f"latentserve:job:{job_id}") and not r.exists(f"latentserve:result:{job_id}")
    response = api.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "job_not_found"
    # The worker goes on serving.
    assert generate(api, model="slow-ldm", prompt="a star", steps=2).json()["status"] == "succeeded"


def test_a_partial_record_reads_as_missing(api, r):
    r.hset("latentserve:job:partial", mapping={"progress_step": 3, "progress_total": 10})
    assert decode_job(r.hgetall("latentserve:job:partial")) is None
    assert api.get("/v1/jobs/partial").status_code == 404
    r.delete("latentserve:job:partial")
