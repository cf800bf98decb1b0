"""The queue protocol on Redis Streams. The only module that knows a Redis key name.

Per model, one stream with one consumer group. A job is a hash (its record, with a TTL) plus
one stream entry {job, images}; enqueue writes both atomically. Workers claim entries with
XREADGROUP (COUNT n) and reclaim entries idle past the visibility timeout with XAUTOCLAIM;
a live worker keeps its claimed entries fresh with XCLAIM ... JUSTID from its heartbeat.
Finishing is one script: it writes the result only if the job is not already finished, then
XACKs and XDELs the entry (so XLEN is the number of unfinished jobs), then publishes the
completion event. A reclaimed duplicate therefore never overwrites a result, and its worker
learns it lost the race (so metrics count each job once).

Events go out on a per-job pub/sub channel as JSON; readers subscribe before they read the
record, so nothing is missed between the two. JSON everywhere on the wire, never pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

PREFIX = "latentserve"
GROUP = "workers"
TERMINAL = ("succeeded", "failed", "cancelled")


class Keys:
    @staticmethod
    def stream(model: str) -> str:
        return f"{PREFIX}:stream:{model}"

    @staticmethod
    def job(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    @staticmethod
    def result(job_id: str) -> str:
        return f"{PREFIX}:result:{job_id}"

    @staticmethod
    def events(job_id: str) -> str:
        return f"{PREFIX}:events:{job_id}"

    @staticmethod
    def workers(model: str) -> str:
        return f"{PREFIX}:workers:{model}"  # zset: worker id -> last heartbeat (unix s)

    @staticmethod
    def engines(model: str) -> str:
        return f"{PREFIX}:engines:{model}"  # hash: worker id -> JSON {engine, precision, device}

    DEAD = f"{PREFIX}:dead"  # stream of dead-lettered jobs, for operators


# ---------------------------------------------------------------- the job record and its codec


@dataclass
class Job:
    id: str
    model: str
    task: str
    request: dict[str, Any]  # validated, defaults filled: prompt, width, seed, ...
    status: str = "queued"
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    progress_step: int = 0
    progress_total: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    worker: str | None = None
    batch_size: int | None = None
    timings: dict[str, float] | None = None
    stream_id: str | None = None
    last_error: str | None = None  # the error of a failed attempt that will be retried

    @property
    def num_images(self) -> int:
        return int(self.request.get("num_images", 1))


_JSON_FIELDS = {"request", "warnings", "timings"}
_FLOAT_FIELDS = {"created_at", "started_at", "finished_at"}
_INT_FIELDS = {"attempts", "progress_step", "progress_total", "batch_size"}


def encode_job(job: Job) -> dict[str, str]:
    out = {}
    for name, value in asdict(job).items():
        if value is None:
            continue
        out[name] = json.dumps(value) if name in _JSON_FIELDS else str(value)
    return out


def decode_job(raw: dict) -> Job:
    data: dict[str, Any] = {}
    names = Job.__dataclass_fields__
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        if key not in names:
            continue  # e.g. cancel_requested: protocol-internal
        if key in _JSON_FIELDS:
            data[key] = json.loads(value)
        elif key in _FLOAT_FIELDS:
            data[key] = float(value)
        elif key in _INT_FIELDS:
            data[key] = int(value)
        else:
            data[key] = value
    return Job(**data)


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    mime: str
    seed: int
    width: int
    height: int


def _event(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


# ---------------------------------------------------------------- scripts (atomic steps)

# KEYS: stream, job; ARGV: max_queue, ttl, job id, images, field, value, ...
_ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local sid = redis.call('XADD', KEYS[1], '*', 'job', ARGV[3], 'images', ARGV[4])
redis.call('HSET', KEYS[2], 'stream_id', sid, unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return sid
"""

# KEYS: job, stream, events; ARGV: now, event json
# queued -> cancelled (entry deleted: no worker will run it); running -> flagged for the worker.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'stream_id'))
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
             'error', 'cancelled before it ran')
  redis.call('PUBLISH', KEYS[3], ARGV[2])
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return status
"""

# KEYS: job, events; ARGV: worker, now, event json
# Returns {status before, attempts after}; only a queued or (reclaimed) running job starts.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return {status, attempts}
"""

# KEYS: job, result, stream, events; ARGV: stream id, ttl, event json, n job fields, fields..,
# result fields...  Writes only if the job is not finished yet; always acks and deletes.
_FINISH = """
redis.call('XACK', KEYS[3], 'workers', ARGV[1])
redis.call('XDEL', KEYS[3], ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return 0
end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
if #ARGV > 4 + n then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5 + n))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[3])
return 1
"""


def _flatten(mapping: dict) -> list:
    return [item for pair in mapping.items() for item in pair]


# ---------------------------------------------------------------- the API side (asyncio)


class QueueFull(Exception):
    pass


class ApiQueue:
    def __init__(self, client: aioredis.Redis, job_ttl_s: int):
        self.r = client
        self.ttl = job_ttl_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._cancel = client.register_script(_CANCEL)

    async def ensure_group(self, model: str) -> None:
        try:
            await self.r.xgroup_create(Keys.stream(model), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, job: Job, max_queue: int) -> Job:
        fields = _flatten(encode_job(job))
        sid = await self._enqueue(
            keys=[Keys.stream(job.model), Keys.job(job.id)],
            args=[max_queue, self.ttl, job.id, job.num_images, *fields],
        )
        if sid is None:
            raise QueueFull(job.model)
        job.stream_id = sid.decode() if isinstance(sid, bytes) else sid
        return job

    async def get(self, job_id: str) -> Job | None:
        raw = await self.r.hgetall(Keys.job(job_id))
        return decode_job(raw) if raw else None

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
        event = _event("status", status="cancelled")
        out = await self._cancel(
            keys=[Keys.job(job_id), Keys.stream(await self._model_of(job_id)), Keys.events(job_id)],
            args=[time.time(), event],
        )
        return out.decode() if isinstance(out, bytes) else out

    async def _model_of(self, job_id: str) -> str:
        model = await self.r.hget(Keys.job(job_id), "model")
        return model.decode() if model else "_"

    async def depth(self, model: str) -> int:
        return await self.r.xlen(Keys.stream(model))

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

    def subscribe(self, job_id: str):
        """A pub/sub handle already subscribed to the job's events (use as async context)."""
        return _Subscription(self.r, Keys.events(job_id))


class _Subscription:
    def __init__(self, client: aioredis.Redis, channel: str):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.channel = channel

    async def __aenter__(self):
        await self.pubsub.subscribe(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.pubsub.unsubscribe(self.channel)
        await self.pubsub.aclose()

    async def next_event(self, timeout: float) -> dict | None:
        """The next event, or None when `timeout` seconds pass without one."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await self.pubsub.get_message(timeout=left)
            if message and message["type"] == "message":
                return json.loads(message["data"])
        return None


def decode_images(raw: dict) -> list[StoredImage]:
    raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "meta" not in raw:
        return []
    meta = json.loads(raw["meta"])
    return [StoredImage(data=raw[f"image:{k}"], **m) for k, m in enumerate(meta)]


# ---------------------------------------------------------------- the worker side (blocking)


@dataclass(frozen=True)
class Claimed:
    """A stream entry this worker holds: the job id, and how many images it asks for."""

    model: str
    stream_id: str
    job_id: str
    images: int


class WorkerQueue:
    def __init__(self, client: redis.Redis, worker_id: str, job_ttl_s: int):
        self.r = client
        self.worker_id = worker_id
        self.ttl = job_ttl_s
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    def ensure_group(self, model: str) -> None:
        try:
            self.r.xgroup_create(Keys.stream(model), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self, models: list[str], count: int, block_ms: int | None, min_idle_ms: int) -> list[Claimed]:
        """Up to `count` entries: first ones idle past `min_idle_ms` (a dead worker's), then new
        ones, waiting up to `block_ms` for new ones (None: don't wait)."""
        claimed: list[Claimed] = []
        for model in models:
            if len(claimed) >= count:
                break
            _next, messages, _deleted = self.r.xautoclaim(
                Keys.stream(model), GROUP, self.worker_id, min_idle_ms, "0-0", count=count - len(claimed)
            )
            claimed += [_claimed(model, sid, fields) for sid, fields in messages if fields]
        if len(claimed) < count:
            streams = {Keys.stream(m): ">" for m in models}
            block = None if block_ms is None else max(1, block_ms)  # BLOCK 0 would wait forever
            reply = self.r.xreadgroup(GROUP, self.worker_id, streams, count=count - len(claimed), block=block)
            for stream, messages in reply or []:
                model = (stream.decode() if isinstance(stream, bytes) else stream).split(":", 2)[2]
                claimed += [_claimed(model, sid, fields) for sid, fields in messages if fields]
        return claimed

    def touch(self, held: list[Claimed]) -> None:
        """Reset the idle time of held entries so no other worker reclaims them."""
        by_model: dict[str, list[str]] = {}
        for c in held:
            by_model.setdefault(c.model, []).append(c.stream_id)
        for model, ids in by_model.items():
            self.r.xclaim(Keys.stream(model), GROUP, self.worker_id, 0, ids, justid=True)

    def load(self, claimed: list[Claimed]) -> list[Job | None]:
        """The job records of claimed entries (None where the record expired)."""
        pipe = self.r.pipeline(transaction=False)
        for c in claimed:
            pipe.hgetall(Keys.job(c.job_id))
        return [decode_job(raw) if raw else None for raw in pipe.execute()]

    def start(self, claimed: list[Claimed]) -> list[int | None]:
        """Mark jobs running; for each, its attempt number, or None if it must not run
        (finished, cancelled or expired meanwhile)."""
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for c in claimed:
            self._start(keys=[Keys.job(c.job_id), Keys.events(c.job_id)],
                        args=[self.worker_id, now, _event("status", status="running")], client=pipe)
        out = []
        for previous, attempts in pipe.execute():
            previous = previous.decode() if isinstance(previous, bytes) else previous
            out.append(int(attempts) if previous in ("queued", "running") else None)
        return out

    def report_progress(self, jobs: list[Job], step: int, total: int) -> set[str]:
        """Record and publish progress; returns the ids of jobs whose cancel was requested."""
        pipe = self.r.pipeline(transaction=False)
        event = _event("progress", step=step, total=total)
        for job in jobs:
            pipe.hset(Keys.job(job.id), mapping={"progress_step": step, "progress_total": total})
            pipe.publish(Keys.events(job.id), event)
            pipe.hget(Keys.job(job.id), "cancel_requested")
        replies = pipe.execute()
        return {job.id for job, flag in zip(jobs, replies[2::3]) if flag}

    def finish(self, job: Job, claimed: Claimed, status: str, *, error: str | None = None,
               images: list[StoredImage] = (), extra: dict | None = None) -> bool:
        """Store the outcome unless the job already has one; ack the entry. True if stored."""
        return self.finish_many([(job, claimed, status, error, list(images), extra or {})])[0]

    def finish_many(self, outcomes: list[tuple]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for job, claimed, status, error, images, extra in outcomes:
            fields = {"status": status, "finished_at": now, **extra}
            if error:
                fields["error"] = error
            fields = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
            result = {}
            if images:
                meta = [{"mime": i.mime, "seed": i.seed, "width": i.width, "height": i.height} for i in images]
                result = {"meta": json.dumps(meta), **{f"image:{k}": i.data for k, i in enumerate(images)}}
            flat = _flatten(fields)
            self._finish(
                keys=[Keys.job(job.id), Keys.result(job.id), Keys.stream(claimed.model), Keys.events(job.id)],
                args=[claimed.stream_id, self.ttl, _event("done", status=status), len(flat), *flat, *_flatten(result)],
                client=pipe,
            )
        return [bool(x) for x in pipe.execute()]

    def drop(self, claimed: Claimed) -> None:
        """Ack and delete an entry whose job must not run (already finished, or expired)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(Keys.stream(claimed.model), GROUP, claimed.stream_id)
        pipe.xdel(Keys.stream(claimed.model), claimed.stream_id)
        pipe.execute()

    def record_error(self, job: Job, error: str) -> None:
        self.r.hset(Keys.job(job.id), "last_error", error)

    def dead_letter(self, job: Job, reason: str) -> None:
        self.r.xadd(Keys.DEAD, {"job": job.id, "model": job.model, "reason": reason}, maxlen=10000)

    def heartbeat(self, models: list[str], ttl_s: float, engines: dict[str, dict] | None = None) -> None:
        """Mark this worker live for each model; `engines` (model -> what it runs) is published
        beside it so the API can show which engine serves each model."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for model in models:
            pipe.zadd(Keys.workers(model), {self.worker_id: now})
            pipe.zremrangebyscore(Keys.workers(model), "-inf", now - 10 * ttl_s)
            if engines and model in engines:
                pipe.hset(Keys.engines(model), self.worker_id, json.dumps(engines[model], sort_keys=True))
        pipe.execute()

    def leave(self, models: list[str]) -> None:
        for model in models:
            self.r.zrem(Keys.workers(model), self.worker_id)
            self.r.hdel(Keys.engines(model), self.worker_id)

    def live_workers(self, model: str, ttl_s: float) -> int:
        return self.r.zcount(Keys.workers(model), time.time() - ttl_s, "+inf")


def _claimed(model: str, sid, fields: dict) -> Claimed:
    get = lambda k: fields.get(k.encode(), fields.get(k))  # noqa: E731  bytes or str keys
    sid = sid.decode() if isinstance(sid, bytes) else sid
    job_id = get("job")
    job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
    return Claimed(model, sid, job_id, int(get("images") or 1))
