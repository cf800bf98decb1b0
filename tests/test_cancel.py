"""DELETE /v1/jobs/{id}: a queued job never runs; a running one stops at a step boundary."""

from __future__ import annotations

from tests.conftest import generate, job_status, wait_until

SLOW = dict(model="slow-ldm", prompt="an orange square", width=128, height=128, num_images=4,
            steps=40, seed=9)


def test_cancel_queued_and_running_jobs(api, start_worker, r):
    start_worker("slow-ldm", "cancel-w")
    running = generate(api, wait=False, **SLOW).json()["id"]
    wait_until(lambda: job_status(api, running)["progress"]["step"] > 0, 60, "the first job to run")
    # Queued behind it (another size, so it can't join the running batch).
    queued = generate(api, wait=False, **{**SLOW, "width": 64, "height": 64}).json()["id"]
    assert job_status(api, queued)["status"] == "queued"

    response = api.delete(f"/v1/jobs/{queued}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    response = api.delete(f"/v1/jobs/{running}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True

    final = wait_until(lambda: (j := job_status(api, running))["status"] != "running" and j, 60,
                       "the running job to stop")
    assert final["status"] == "cancelled" and "images" not in final
    assert 0 < final["progress"]["step"] < 40

    # The worker goes on serving; the cancelled queued job never ran.
    after = generate(api, **{**SLOW, "num_images": 1, "steps": 2}).json()
    assert after["status"] == "succeeded"
    never = job_status(api, queued)
    assert never["status"] == "cancelled" and never["progress"]["step"] == 0
    assert r.hget(f"latentserve:job:{queued}", "worker") is None
    assert r.xlen("latentserve:stream:slow-ldm") == 0

    assert api.delete(f"/v1/jobs/{after['id']}").status_code == 409  # already succeeded
    assert api.delete("/v1/jobs/nope").status_code == 404
