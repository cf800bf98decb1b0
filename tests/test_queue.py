"""The queue protocol against a real redis-server (service/queue.py)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from service.queue import ApiQueue, Job, Keys, QueueFull, StoredImage, WorkerQueue
from tests.conftest import generate, job_status, wait_until


def new_job(model: str, **request) -> Job:
    return Job(id=uuid.uuid4().hex, model=model, task="txt2img",
               request={"num_images": 1, **request}, created_at=time.time())


def enqueue(redis_url: str, job: Job, max_queue: int = 100) -> Job:
    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            q = ApiQueue(client, job_ttl_s=60)
            await q.ensure_group(job.model)
            return await q.enqueue(job, max_queue)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_enqueue_writes_record_and_entry_together_and_respects_the_limit(redis_url, r):
    model = "q-" + uuid.uuid4().hex[:6]
    job = enqueue(redis_url, new_job(model, prompt="x"), max_queue=1)
    assert r.hget(Keys.job(job.id), "status") == b"queued"
    assert 0 < r.ttl(Keys.job(job.id)) <= 60
    assert r.xlen(Keys.stream(model)) == 1
    with pytest.raises(QueueFull):
        enqueue(redis_url, new_job(model, prompt="y"), max_queue=1)
    assert r.xlen(Keys.stream(model)) == 1  # the refused job left no trace


def test_idle_entries_are_reclaimed_unless_touched_and_finish_happens_once(redis_url, r):
    model = "q-" + uuid.uuid4().hex[:6]
    job = enqueue(redis_url, new_job(model, prompt="x"))
    a, b = WorkerQueue(r, "a", 60), WorkerQueue(r, "b", 60)
    [claimed] = a.claim([model], 4, None, min_idle_ms=200)
    assert claimed.job_id == job.id and a.start([claimed]) == [1]
    time.sleep(0.15)
    a.touch([claimed])  # a live worker's heartbeat keeps the entry
    time.sleep(0.1)
    assert b.claim([model], 4, None, min_idle_ms=200) == []
    time.sleep(0.25)  # a goes silent: b reclaims
    [again] = b.claim([model], 4, None, min_idle_ms=200)
    assert again.stream_id == claimed.stream_id and b.start([again]) == [2]

    image = StoredImage(b"png-b", "image/png", 1, 64, 64)
    assert b.finish(job, again, "succeeded", images=[image]) is True
    late = StoredImage(b"png-a", "image/png", 1, 64, 64)
    assert a.finish(job, claimed, "succeeded", images=[late]) is False  # the duplicate loses
    assert r.hget(Keys.result(job.id), "image:0") == b"png-b"
    assert r.xlen(Keys.stream(model)) == 0
    assert a.start([claimed]) == [None]  # a finished job never starts again


def test_job_abandoned_max_attempts_times_is_dead_lettered(api, start_worker, r):
    """Two workers die holding a job (claimed and started, never finished); the third
    delivery exceeds max_attempts=2, so the real worker fails it instead of looping."""
    response = generate(api, wait=False, model="slow-ldm", prompt="a red star", steps=2)
    job_id = response.json()["id"]
    for dead in ("dead-1", "dead-2"):
        q = WorkerQueue(r, dead, 60)
        claimed = wait_until(lambda: q.claim(["slow-ldm"], 1, None, min_idle_ms=50), 5, "a claim")
        assert q.start(claimed)[0] is not None
        time.sleep(0.1)
    start_worker("slow-ldm", "survivor", max_attempts=2, visibility_timeout_s=0.05)
    final = wait_until(lambda: (j := job_status(api, job_id))["status"] != "running" and j, 30, "dead letter")
    assert final["status"] == "failed" and "gave up after 2 attempts" in final["error"]
    dead = r.xrange(Keys.DEAD)
    assert any(fields[b"job"] == job_id.encode() for _, fields in dead)
    assert r.xlen(Keys.stream("slow-ldm")) == 0
