"""The API side of the queue (asyncio): enqueue, read, cancel, subscribe."""

from __future__ import annotations

import json
import time

import redis
import redis.asyncio as aioredis

from service.queue import scripts
from service.queue.events import EventHub, Subscription
from service.queue.keys import GROUP, Keys
from service.queue.records import Job, StoredImage, decode_images, decode_job, encode_job, flatten, make_event


class QueueFull(Exception):
    pass


class ApiQueue:
    def __init__(self, client: aioredis.Redis, job_ttl_s: int):
        self.r = client
        self.ttl = job_ttl_s
        self.events = EventHub(client)  # started and stopped with the app (service.api)
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._cancel = client.register_script(scripts.CANCEL)

    async def ensure_group(self, model: str) -> None:
        for stream in Keys.grouped(model):
            try:
                await self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, job: Job, max_queue: int, inputs: dict[str, bytes] | None = None) -> Job:
        """Queue the job (and its uploads, under their own key); QueueFull at max_queue."""
        fields = flatten(encode_job(job))
        stored = flatten(inputs or {})
        urgent = job.request.get("priority") == "high"
        sid = await self._enqueue(
            keys=[Keys.stream(job.model, urgent), Keys.job(job.id), Keys.stream(job.model, not urgent),
                  Keys.inputs(job.id)],
            args=[max_queue, self.ttl, job.id, job.num_images, len(stored), *stored, *fields],
        )
        if sid is None:
            raise QueueFull(job.model)
        job.stream_id = sid.decode() if isinstance(sid, bytes) else sid
        return job

    async def get(self, job_id: str) -> Job | None:
        return decode_job(await self.r.hgetall(Keys.job(job_id)))

    async def images(self, job_id: str) -> list[StoredImage]:
        raw = await self.r.hgetall(Keys.result(job_id))
        return decode_images(raw)

    async def image(self, job_id: str, k: int) -> StoredImage | None:
        meta, data = await self.r.hmget(Keys.result(job_id), "meta", f"image:{k}")
        if meta is None or data is None:
            return None
        return StoredImage(data=data, **json.loads(meta)[k])

    async def cancel(self, job_id: str) -> str | None:
        """'cancelled' (was queued), 'cancelling' (running), a terminal status, or None."""
        event = make_event("status", status="cancelled")
        out = await self._cancel(
            keys=[Keys.job(job_id), await self._stream_of(job_id), Keys.events(job_id)],
            args=[time.time(), event],
        )
        return out.decode() if isinstance(out, bytes) else out

    async def _stream_of(self, job_id: str) -> str:
        job = await self.get(job_id)
        return Keys.stream(job.model, job.request.get("priority") == "high") if job else Keys.stream("_")

    async def queue_position(self, job: Job) -> int | None:
        """How many jobs workers will take before this one (0: it is next), or None unless
        it is queued. Ahead of it: the queued jobs of its own lane that entered it earlier
        (released and requeued entries keep their place), and, for a job not of high
        priority, every queued job of the high-priority lane, which workers read first. A
        job a worker has claimed but not started counts as queued: it has not run yet."""
        if job.status != "queued" or not job.stream_id:
            return None
        urgent = job.request.get("priority") == "high"
        pipe = self.r.pipeline(transaction=False)
        pipe.xrange(Keys.stream(job.model, urgent), "-", f"({job.stream_id}")  # exclusive: Redis >= 6.2
        if not urgent:
            pipe.xrange(Keys.stream(job.model, urgent=True), "-", "+")
        ahead = [fields.get(b"job", fields.get("job")) for entries in await pipe.execute() for _, fields in entries]
        pipe = self.r.pipeline(transaction=False)
        for other in ahead:
            pipe.hget(Keys.job(other.decode() if isinstance(other, bytes) else other), "status")
        return sum(status in (b"queued", "queued") for status in await pipe.execute())

    async def depth(self, model: str) -> int:
        return await self.r.xlen(Keys.stream(model)) + await self.r.xlen(Keys.stream(model, urgent=True))

    async def live_workers(self, model: str, ttl_s: float) -> int:
        return await self.r.zcount(Keys.workers(model), time.time() - ttl_s, "+inf")

    async def live_engines(self, model: str, ttl_s: float) -> list[dict]:
        """What the live workers of a model run: [{engine, precision, device, workers}]."""
        live = await self.r.zrangebyscore(Keys.workers(model), time.time() - ttl_s, "+inf")
        if not live:
            return []
        counts: dict[str, int] = {}
        for raw in await self.r.hmget(Keys.engines(model), live):
            if raw:
                raw = raw.decode() if isinstance(raw, bytes) else raw
                counts[raw] = counts.get(raw, 0) + 1
        return [{**json.loads(k), "workers": n} for k, n in sorted(counts.items())]

    async def live_costs(self, model: str, ttl_s: float) -> list[dict]:
        """The measured costs (service.cost.Cost JSON) the live workers of a model publish."""
        live = await self.r.zrangebyscore(Keys.workers(model), time.time() - ttl_s, "+inf")
        raw = await self.r.hmget(Keys.cost(model), live) if live else []
        return [json.loads(r) for r in raw if r]

    def subscribe(self, job_id: str) -> Subscription:
        """The job's events through the process's shared subscription (an async context)."""
        return self.events.subscribe(job_id)
