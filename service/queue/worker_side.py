"""The worker side of the queue (blocking): claim, release, start, progress, finish."""

from __future__ import annotations

import json
import time

import redis

from service.queue import scripts
from service.queue.keys import GROUP, Keys
from service.queue.records import Claimed, Job, Outcome, StoredImage, decode_job, flatten, make_event


class WorkerQueue:
    def __init__(self, client: redis.Redis, worker_id: str, job_ttl_s: int):
        self.r = client
        self.worker_id = worker_id
        self.ttl = job_ttl_s
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._progress = client.register_script(scripts.PROGRESS)
        self._requeue = client.register_script(scripts.REQUEUE)
        self._release = client.register_script(scripts.RELEASE)
        self._advance = client.register_script(scripts.ADVANCE)

    def ensure_group(self, model: str) -> None:
        for stream in Keys.grouped(model):
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def claim(self, models: list[str], count: int, block_ms: int | None, min_idle_ms: int,
              urgent_only: bool = False, autoclaim: bool = True) -> list[Claimed]:
        """Up to `count` entries, high-priority lanes first: first ones idle past `min_idle_ms`
        (released, or a dead worker's), then new ones, waiting up to `block_ms` for new ones
        (None: don't wait). A wake entry ends the wait and sends the worker back to
        XAUTOCLAIM. `urgent_only`: only the high-priority lanes (a worker with a full batch).
        `autoclaim=False` skips XAUTOCLAIM unless a wake entry says entries were released (a
        busy worker claiming between steps: one round trip instead of five)."""
        lanes = (True,) if urgent_only else (True, False)
        claimed = self._autoclaim(models, count, min_idle_ms, lanes) if autoclaim else []
        if len(claimed) >= count:
            return claimed
        streams = {Keys.stream(m, urgent): ">" for urgent in lanes for m in models}
        if not urgent_only:
            streams.update({Keys.wake(m): ">" for m in models})
        block = None if block_ms is None else max(1, block_ms)  # BLOCK 0 would wait forever
        reply = self.r.xreadgroup(GROUP, self.worker_id, streams, count=count - len(claimed), block=block)
        woken = False
        for stream, messages in reply or []:
            _prefix, kind, model = _text(stream).split(":", 2)
            if kind == "wake":
                woken = True
                self._consume(Keys.wake(model), [sid for sid, _ in messages])
            else:
                claimed += [_claimed(model, sid, fields, urgent=kind == "urgent") for sid, fields in messages if fields]
        if woken and len(claimed) < count:
            claimed += self._autoclaim(models, count - len(claimed), min_idle_ms, lanes)
        return claimed[:count]  # COUNT applies per stream

    def _autoclaim(self, models: list[str], count: int, min_idle_ms: int, lanes=(True, False)) -> list[Claimed]:
        claimed: list[Claimed] = []
        for urgent in lanes:
            for model in models:
                if len(claimed) >= count:
                    return claimed
                # Redis 7 replies [next, messages, deleted ids]; Redis 6.2 [next, messages], and
                # there an entry deleted while pending (a cancelled job) comes back without fields.
                stream = Keys.stream(model, urgent)
                reply = self.r.xautoclaim(stream, GROUP, self.worker_id, min_idle_ms, "0-0",
                                          count=count - len(claimed))
                messages = reply[1]
                gone = [sid for sid, fields in messages if not fields]
                if gone:
                    self._consume(stream, gone)
                claimed += [_claimed(model, sid, fields, reclaimed=True, urgent=urgent)
                            for sid, fields in messages if fields]
        return claimed

    def _consume(self, stream: str, ids: list) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()

    def release(self, held: list[Claimed], idle_ms: int) -> None:
        """Give back entries this worker will not run now: any worker's next XAUTOCLAIM
        (with `idle_ms` as its min idle time) takes them, and one blocked worker wakes."""
        by_stream: dict[tuple[str, str], list[str]] = {}
        for c in held:
            by_stream.setdefault((c.stream, c.model), []).append(c.stream_id)
        pipe = self.r.pipeline(transaction=False)
        for (stream, model), ids in by_stream.items():
            self._release(keys=[stream, Keys.wake(model)], args=[self.worker_id, idle_ms, *ids], client=pipe)
        pipe.execute()

    def requeue(self, jobs: list[tuple[Job, Claimed]], error: str, idle_ms: int) -> None:
        """Running jobs back to queued for an immediate retry (by any worker), keeping the
        error that stopped this attempt in `last_error`."""
        pipe = self.r.pipeline(transaction=False)
        event = make_event("status", status="queued")
        for job, _claimed_entry in jobs:
            self._requeue(keys=[Keys.job(job.id), Keys.events(job.id)], args=[error, event], client=pipe)
        pipe.execute()
        self.release([c for _, c in jobs], idle_ms)

    def touch(self, held: list[Claimed]) -> None:
        """Reset the idle time of held entries so no other worker reclaims them."""
        by_stream: dict[str, list[str]] = {}
        for c in held:
            by_stream.setdefault(c.stream, []).append(c.stream_id)
        for stream, ids in by_stream.items():
            self.r.xclaim(stream, GROUP, self.worker_id, 0, ids, justid=True)

    def load(self, claimed: list[Claimed]) -> list[Job | None]:
        """The job records of claimed entries (None where the record expired)."""
        pipe = self.r.pipeline(transaction=False)
        for c in claimed:
            pipe.hgetall(Keys.job(c.job_id))
            pipe.hgetall(Keys.inputs(c.job_id))
        raw = pipe.execute()
        jobs = [decode_job(record) for record in raw[0::2]]
        for job, inputs in zip(jobs, raw[1::2]):
            if job is not None:
                job.inputs = {(k.decode() if isinstance(k, bytes) else k): v for k, v in inputs.items()}
        return jobs

    def start(self, claimed: list[Claimed]) -> list[int | None]:
        """Mark jobs running; for each, its attempt number, or None if it must not run
        (finished, cancelled or expired meanwhile)."""
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for c in claimed:
            self._start(keys=[Keys.job(c.job_id), Keys.events(c.job_id)],
                        args=[self.worker_id, now, make_event("status", status="running")], client=pipe)
        out = []
        for previous, attempts in pipe.execute():
            previous = previous.decode() if isinstance(previous, bytes) else previous
            out.append(int(attempts) if previous in ("queued", "running") else None)
        return out

    def stops(self, jobs: list[Job]) -> dict[str, str]:
        """Without publishing anything (paused jobs): which must stop, as report_progress says."""
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            pipe.hget(Keys.job(job.id), "cancel_requested")
            pipe.exists(Keys.job(job.id))
        replies = pipe.execute()
        out = {}
        for job, flag, exists in zip(jobs, replies[::2], replies[1::2]):
            if not exists:
                out[job.id] = "gone"
            elif flag:
                out[job.id] = "cancelled"
        return out

    def report_progress(self, progress: list[tuple[Job, int, int]],
                        previews: dict[str, dict] | None = None) -> dict[str, str]:
        """Record and publish each job's (steps done, total), with its live preview where
        `previews` (job id -> service.previews' dict) has one: events only, never the record.
        Returns the jobs that must stop: id -> "cancelled" (a cancel was requested) or "gone"
        (the record expired or was deleted)."""
        pipe = self.r.pipeline(transaction=False)
        jobs = [job for job, _, _ in progress]
        previews = previews or {}
        for job, step, total in progress:
            extra = {"preview": previews[job.id]} if job.id in previews else {}
            event = make_event("progress", step=step, total=total, **extra)
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
            if o.advance is not None:
                self._advance_to(o, now, pipe)
                continue
            fields = {"status": o.status, "finished_at": now, **o.extra}
            if o.error:
                fields["error"] = o.error
            fields = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
            result = {}
            if o.images:
                meta = [i.meta() for i in o.images]
                result = {"meta": json.dumps(meta), **{f"image:{k}": i.data for k, i in enumerate(o.images)}}
            flat = flatten(fields)
            self._finish(
                keys=[Keys.job(o.job.id), Keys.result(o.job.id), o.claimed.stream, Keys.events(o.job.id),
                      Keys.inputs(o.job.id)],
                args=[o.claimed.stream_id, self.ttl, make_event("done", status=o.status), len(flat), *flat,
                      *flatten(result)],
                client=pipe,
            )
        # An advanced job counts as stored only if it moved on (1), not if it was cancelled (2).
        return [int(x) == 1 if o.advance is not None else bool(x) for o, x in zip(outcomes, pipe.execute())]

    def _advance_to(self, o: Outcome, now: float, pipe) -> None:
        """A chained job's stage done: on to its next stage (scripts.ADVANCE)."""
        a = o.advance
        fields = flatten({"model": a.model, "task": a.task, "request": json.dumps(a.request), **{
            k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in o.extra.items()}})
        self._advance(
            keys=[Keys.job(o.job.id), o.claimed.stream, Keys.stream(a.model, a.urgent), Keys.events(o.job.id),
                  Keys.inputs(o.job.id)],
            args=[o.claimed.stream_id, self.ttl, make_event("stage", model=a.model, task=a.task),
                  make_event("done", status="cancelled"), now, o.job.id, o.job.num_images, len(fields), *fields,
                  *flatten(a.inputs)],
            client=pipe,
        )

    def drop(self, claimed: Claimed) -> None:
        """Ack and delete an entry whose job must not run (already finished, or expired)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(claimed.stream, GROUP, claimed.stream_id)
        pipe.xdel(claimed.stream, claimed.stream_id)
        pipe.execute()

    def dead_letter(self, job: Job, reason: str) -> None:
        self.r.xadd(Keys.DEAD, {"job": job.id, "model": job.model, "reason": reason}, maxlen=10000)

    def heartbeat(self, models: list[str], ttl_s: float, engines: dict[str, dict] | None = None,
                  costs: dict[str, dict] | None = None) -> None:
        """Mark this worker live for each model; `engines` (model -> what it runs) and `costs`
        (model -> its measured service.cost.Cost) are published beside it for the API."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for model in models:
            pipe.zadd(Keys.workers(model), {self.worker_id: now})
            pipe.zremrangebyscore(Keys.workers(model), "-inf", now - 10 * ttl_s)
            if engines and model in engines:
                pipe.hset(Keys.engines(model), self.worker_id, json.dumps(engines[model], sort_keys=True))
            if costs and model in costs:
                pipe.hset(Keys.cost(model), self.worker_id, json.dumps(costs[model]))
        pipe.execute()

    def leave(self, models: list[str]) -> None:
        for model in models:
            self.r.zrem(Keys.workers(model), self.worker_id)
            self.r.hdel(Keys.engines(model), self.worker_id)
            self.r.hdel(Keys.cost(model), self.worker_id)

    def live_workers(self, model: str, ttl_s: float) -> int:
        return self.r.zcount(Keys.workers(model), time.time() - ttl_s, "+inf")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _claimed(model: str, sid, fields: dict, reclaimed: bool = False, urgent: bool = False) -> Claimed:
    get = lambda k: fields.get(k.encode(), fields.get(k))  # noqa: E731  bytes or str keys
    return Claimed(model, _text(sid), _text(get("job")), int(get("images") or 1), reclaimed, urgent)
