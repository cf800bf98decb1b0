"""The queue protocol on Redis Streams. The only module that knows a Redis key name.

Per model, one stream with one consumer group. A job is a hash (its record, with a TTL) plus
one stream entry {job, images}; enqueue writes both atomically. Workers claim entries with
XREADGROUP (COUNT n) and reclaim entries idle past the visibility timeout with XAUTOCLAIM;
a live worker keeps its claimed entries fresh with XCLAIM ... JUSTID from its heartbeat.
A worker holds only what it runs now: entries it cannot run are released (XCLAIM ... IDLE
<visibility timeout>, so the next XAUTOCLAIM of any worker takes them, in stream order) and a
wake entry on the model's wake stream ends some idle worker's blocking read at once.
Every write to a job record is a script that writes only while the record exists, so a
record that expired stays gone (HSET on a missing key would recreate it without a TTL).
Redis >= 6.2 (XAUTOCLAIM); nothing newer is used.
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

    @staticmethod
    def wake(model: str) -> str:
        return f"{PREFIX}:wake:{model}"  # stream: "entries were released", ends a blocking read

    @staticmethod
    def grouped(model: str) -> tuple[str, str]:
        """The streams a model's workers read through the consumer group."""
        return Keys.stream(model), Keys.wake(model)

    DEAD = f"{PREFIX}:dead"  # stream of dead-lettered jobs, for operators


MIN_REDIS = (6, 2)  # XAUTOCLAIM


class RedisTooOld(RuntimeError):
    pass


def redis_version(client: redis.Redis) -> str:
    return str(client.info("server")["redis_version"])


def check_redis_version(version: str) -> None:
    """Refuse a server older than 6.2 (no XAUTOCLAIM) with a message that says so."""
    parts = tuple(int(p) for p in version.split(".")[:2])
    if parts < MIN_REDIS:
        raise RedisTooOld(f"Redis {version} is too old: latentserve needs Redis >= "
                          f"{'.'.join(map(str, MIN_REDIS))} (XAUTOCLAIM)")


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


_REQUIRED = ("id", "model", "task", "request")


def decode_job(raw: dict) -> Job | None:
    """The job, or None for a record that is empty or lacks an identity field."""
    if not raw:
        return None
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
    if any(name not in data for name in _REQUIRED):
        return None
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
  local sid = redis.call('HGET', KEYS[1], 'stream_id')
  redis.call('XACK', KEYS[2], 'workers', sid)  -- a released entry is still pending
  redis.call('XDEL', KEYS[2], sid)
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


# KEYS: job, events; ARGV: step, total, event json
# Returns 0 (go on), 1 (cancel requested) or 2 (the record is gone: expired or deleted).
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 2 end
redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_total', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') then return 1 end
return 0
"""

# KEYS: job, events; ARGV: error, event json
# A running job goes back to queued for an immediate retry (its attempt stays counted).
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[1], 'progress_step', 0)
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: stream, wake; ARGV: consumer, idle ms, stream ids...
# Entries this worker holds but will not run: idle as if abandoned, so any worker's next
# XAUTOCLAIM takes them (JUSTID: no delivery counted), then wake one blocked reader.
_RELEASE = """
for i = 3, #ARGV do
  redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'IDLE', ARGV[2], 'JUSTID')
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100, '*', 'released', #ARGV - 2)
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
        for stream in Keys.grouped(model):
            try:
                await self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
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
    reclaimed: bool = False  # taken over by XAUTOCLAIM (released, or a dead worker's): it has waited


@dataclass
class Outcome:
    """How a job ended, as the finish script stores it."""

    job: Job
    claimed: Claimed
    status: str  # succeeded | failed | cancelled
    error: str | None = None
    images: list[StoredImage] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # record fields: timings, batch_size, progress


class WorkerQueue:
    def __init__(self, client: redis.Redis, worker_id: str, job_ttl_s: int):
        self.r = client
        self.worker_id = worker_id
        self.ttl = job_ttl_s
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._progress = client.register_script(_PROGRESS)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)

    def ensure_group(self, model: str) -> None:
        for stream in Keys.grouped(model):
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def claim(self, models: list[str], count: int, block_ms: int | None, min_idle_ms: int) -> list[Claimed]:
        """Up to `count` entries: first ones idle past `min_idle_ms` (released, or a dead
        worker's), then new ones, waiting up to `block_ms` for new ones (None: don't wait).
        A wake entry ends the wait and sends the worker back to XAUTOCLAIM."""
        claimed = self._autoclaim(models, count, min_idle_ms)
        if len(claimed) >= count:
            return claimed
        streams = {**{Keys.stream(m): ">" for m in models}, **{Keys.wake(m): ">" for m in models}}
        block = None if block_ms is None else max(1, block_ms)  # BLOCK 0 would wait forever
        reply = self.r.xreadgroup(GROUP, self.worker_id, streams, count=count - len(claimed), block=block)
        woken = False
        for stream, messages in reply or []:
            _prefix, kind, model = _text(stream).split(":", 2)
            if kind == "wake":
                woken = True
                self._consume(Keys.wake(model), [sid for sid, _ in messages])
            else:
                claimed += [_claimed(model, sid, fields) for sid, fields in messages if fields]
        if woken and len(claimed) < count:
            claimed += self._autoclaim(models, count - len(claimed), min_idle_ms)
        return claimed

    def _autoclaim(self, models: list[str], count: int, min_idle_ms: int) -> list[Claimed]:
        claimed: list[Claimed] = []
        for model in models:
            if len(claimed) >= count:
                break
            # Redis 7 replies [next, messages, deleted ids]; Redis 6.2 [next, messages], and
            # there an entry deleted while pending (a cancelled job) comes back without fields.
            reply = self.r.xautoclaim(Keys.stream(model), GROUP, self.worker_id, min_idle_ms, "0-0",
                                      count=count - len(claimed))
            messages = reply[1]
            gone = [sid for sid, fields in messages if not fields]
            if gone:
                self._consume(Keys.stream(model), gone)
            claimed += [_claimed(model, sid, fields, reclaimed=True) for sid, fields in messages if fields]
        return claimed

    def _consume(self, stream: str, ids: list) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()

    def release(self, held: list[Claimed], idle_ms: int) -> None:
        """Give back entries this worker will not run now: any worker's next XAUTOCLAIM
        (with `idle_ms` as its min idle time) takes them, and one blocked worker wakes."""
        by_model: dict[str, list[str]] = {}
        for c in held:
            by_model.setdefault(c.model, []).append(c.stream_id)
        pipe = self.r.pipeline(transaction=False)
        for model, ids in by_model.items():
            self._release(keys=[Keys.stream(model), Keys.wake(model)],
                          args=[self.worker_id, idle_ms, *ids], client=pipe)
        pipe.execute()

    def requeue(self, jobs: list[tuple[Job, Claimed]], error: str, idle_ms: int) -> None:
        """Running jobs back to queued for an immediate retry (by any worker), keeping the
        error that stopped this attempt in `last_error`."""
        pipe = self.r.pipeline(transaction=False)
        event = _event("status", status="queued")
        for job, _claimed_entry in jobs:
            self._requeue(keys=[Keys.job(job.id), Keys.events(job.id)], args=[error, event], client=pipe)
        pipe.execute()
        self.release([c for _, c in jobs], idle_ms)

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
        return [decode_job(raw) for raw in pipe.execute()]

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

    def report_progress(self, jobs: list[Job], step: int, total: int) -> dict[str, str]:
        """Record and publish progress. Returns the jobs that must stop: id -> "cancelled"
        (a cancel was requested) or "gone" (the record expired or was deleted)."""
        pipe = self.r.pipeline(transaction=False)
        event = _event("progress", step=step, total=total)
        for job in jobs:
            self._progress(keys=[Keys.job(job.id), Keys.events(job.id)], args=[step, total, event], client=pipe)
        outcome = {1: "cancelled", 2: "gone"}
        return {job.id: outcome[int(x)] for job, x in zip(jobs, pipe.execute()) if int(x) in outcome}

    def finish(self, job: Job, claimed: Claimed, status: str, *, error: str | None = None,
               images: list[StoredImage] = (), extra: dict | None = None) -> bool:
        """Store the outcome unless the job already has one; ack the entry. True if stored."""
        return self.finish_many([Outcome(job, claimed, status, error, list(images), extra or {})])[0]

    def finish_many(self, outcomes: list[Outcome]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for o in outcomes:
            fields = {"status": o.status, "finished_at": now, **o.extra}
            if o.error:
                fields["error"] = o.error
            fields = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
            result = {}
            if o.images:
                meta = [{"mime": i.mime, "seed": i.seed, "width": i.width, "height": i.height} for i in o.images]
                result = {"meta": json.dumps(meta), **{f"image:{k}": i.data for k, i in enumerate(o.images)}}
            flat = _flatten(fields)
            self._finish(
                keys=[Keys.job(o.job.id), Keys.result(o.job.id), Keys.stream(o.claimed.model), Keys.events(o.job.id)],
                args=[o.claimed.stream_id, self.ttl, _event("done", status=o.status), len(flat), *flat,
                      *_flatten(result)],
                client=pipe,
            )
        return [bool(x) for x in pipe.execute()]

    def drop(self, claimed: Claimed) -> None:
        """Ack and delete an entry whose job must not run (already finished, or expired)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(Keys.stream(claimed.model), GROUP, claimed.stream_id)
        pipe.xdel(Keys.stream(claimed.model), claimed.stream_id)
        pipe.execute()

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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _claimed(model: str, sid, fields: dict, reclaimed: bool = False) -> Claimed:
    get = lambda k: fields.get(k.encode(), fields.get(k))  # noqa: E731  bytes or str keys
    return Claimed(model, _text(sid), _text(get("job")), int(get("images") or 1), reclaimed)
