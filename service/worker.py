"""The worker process: load models once, warm up, then loop schedule -> execute -> update.

Each iteration: claim what the scheduler has room for; decide at this step boundary who
joins, pauses, resumes or expires and which group steps next (service.scheduler, pure);
run that one engine call over the group's rows (each row at its own step, sampler and
guidance); hand each job back its own rows, report progress, stop cancelled jobs, and
decode and store the jobs that reached their end. A worker holds only what it runs or has
paused: entries it can't admit go straight back to the queue for idle workers.

    python -m service.worker            # serves LATENTSERVE_WORKER_MODELS (default: the default model)

SIGTERM or SIGINT: finish what is admitted, claim nothing new, exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import redis
from prometheus_client import CollectorRegistry, start_http_server

from engines.model import LoadedModel
from engines.registry import load_registry
from engines.tasks import txt2img
from service import failures
from service.active import Active, Call
from service.config import Settings, load_settings
from service.cost import CostMeter, row_units
from service.delivery import Deliveries
from service.job_params import JobInputError
from service.metrics import BatchRecord, JobRecord, WorkerExporter
from service.previews import Previews
from service.queue import Claimed, Outcome, WorkerQueue, check_redis_version, redis_version
from service.runners import RUNNERS
from service.worker_models import load_models
from service.scheduler import Decision, Scheduler

log = logging.getLogger("latentserve.worker")


class Worker:
    def __init__(self, settings: Settings, models: dict[str, LoadedModel], queue: WorkerQueue,
                 exporter: WorkerExporter):
        self.settings = settings
        self.models = models
        self.queue = queue
        self.exporter = exporter
        # Each model's row budget is its max_batch (the setting overrides every model's).
        budgets = {model_id: settings.max_batch or m.spec.max_batch for model_id, m in models.items()}
        self.scheduler = Scheduler(budgets, settings.scheduler)
        self.meters = {model_id: CostMeter(budget) for model_id, budget in budgets.items()}
        self.engines = {model_id: {"engine": m.engine, "precision": m.precision, "device": m.device}
                        for model_id, m in models.items()}
        self.idle_ms = int(settings.visibility_timeout_s * 1000)
        self.stopping = threading.Event()
        self.active: dict[str, Active] = {}  # job id -> the job and its rows
        self._peeked = 0.0  # when a full worker last read the high-priority lanes
        self._checked_paused = 0.0  # when paused jobs were last checked for cancels
        self._swept = 0.0  # when a busy worker last looked for reclaimable entries
        # The entries this worker holds, kept fresh by the heartbeat thread. The lock keeps a
        # heartbeat from touching an entry just released (which would hide it again).
        self._holding: list[Claimed] = []
        self._hold_lock = threading.Lock()
        self.deliveries = Deliveries(self._finish, settings.overlap_decoding())
        self.previews = Previews(models)  # live previews for the jobs that ask (service.previews)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        model_ids = list(self.models)
        for model_id in model_ids:
            self.queue.ensure_group(model_id)
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving %s (%s scheduler, budgets %s)", self.queue.worker_id, model_ids,
                 self.settings.scheduler, self.scheduler.budgets)
        while not (self.stopping.is_set() and not self._admitted() and not self.deliveries.busy):
            try:
                self._redeliver()
                self._take(self._claim())
                self._stop_paused()
                decision = self.scheduler.schedule(time.time())
                self._apply(decision)
                if decision.run is not None:
                    self._step(decision.run)
            except redis.ConnectionError as exc:  # Redis restarting: wait, don't die
                log.warning("redis unavailable (%s); retrying in 1s", exc)
                time.sleep(1)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                for model_id in model_ids:  # the stream was deleted (e.g. FLUSHALL)
                    self.queue.ensure_group(model_id)
        self.deliveries.close()
        self.queue.release([a.claimed for a in self.active.values()], self.idle_ms)  # waiting ones
        self.queue.leave(model_ids)
        log.info("worker %s stopped", self.queue.worker_id)

    def _admitted(self) -> bool:
        return any(a.rows is not None for a in self.active.values())

    def _claim(self) -> list[Claimed]:
        """As many new entries as the scheduler has room for: block briefly only when idle.
        Under the whole-request policy a fresh batch waits fill_window_s for company."""
        if self.stopping.is_set():
            return []
        models = list(self.models)
        room = sum(self.scheduler.free(m) for m in self.models)
        if room <= 0:
            # Full: only the high-priority lanes, which may pause lower-priority rows (at most
            # every 50 ms: two Redis calls, not per step of a fast model).
            if self.scheduler.preemptible() and time.monotonic() - self._peeked > 0.05:
                self._peeked = time.monotonic()
                return self.queue.claim(models, max(self.scheduler.budgets.values()), None, self.idle_ms,
                                        urgent_only=True)
            return []
        idle = not self.active
        # Busy, between steps: new entries and wake-ups only; a dead worker's entries (which
        # no wake entry announces) are looked for once a second.
        sweep = idle or time.monotonic() - self._swept > 1.0
        if sweep:
            self._swept = time.monotonic()
        if idle:
            claimed = self.queue.claim(models, room, 1000, self.idle_ms)
        else:  # each model only what it has room for: one model's backlog must not fill another's room
            claimed = [c for m in models if (free := self.scheduler.free(m)) > 0
                       for c in self.queue.claim([m], free, None, self.idle_ms, autoclaim=sweep)]
        fresh = claimed and not any(c.reclaimed for c in claimed)
        if (self.settings.scheduler == "request" and fresh and idle and len(claimed) < room
                and self.settings.fill_window_s > 0):
            # A plain sleep, not a blocking read: Redis checks BLOCK timeouts only `hz` times
            # a second (every 100 ms by default), far coarser than a fill window.
            time.sleep(self.settings.fill_window_s)
            claimed += self.queue.claim(models, room - len(claimed), None, self.idle_ms)
        return claimed

    def _take(self, claimed: list[Claimed]) -> None:
        """Claimed entries whose records parse join the scheduler as waiting; the rest end
        here, before any engine call."""
        failed = []
        for c, job in zip(claimed, self.queue.load(claimed)):
            if job is None or job.model not in self.models:
                self.queue.drop(c)  # expired record, or a stream we no longer serve
                continue
            runner = RUNNERS.get(job.task)
            if runner is None:
                failed.append((Outcome(job, c, "failed", f"task {job.task!r} has no runner on this worker "
                                       f"(serves: {', '.join(RUNNERS)})"), failures.UNSUPPORTED_TASK))
                continue
            try:
                active = Active(job, c, runner.parse(job.request, self.models[job.model], job.inputs))
            except JobInputError as exc:
                failed.append((Outcome(job, c, "failed", f"invalid request: {exc}"), failures.INVALID_INPUT))
                continue
            self.active[job.id] = active
            self.scheduler.add(active.entry(self.settings.scheduler))
        for outcome, reason in failed:
            self._finish([outcome], failure=reason)
        self._hold()

    def _hold(self) -> None:
        with self._hold_lock:
            self._holding = [a.claimed for a in self.active.values()] + self.deliveries.holding()

    def _heartbeat(self) -> None:
        while not self.stopping.wait(0) or self._holding:
            try:
                costs = {m: c.to_json() for m, meter in self.meters.items() if (c := meter.cost()) is not None}
                self.queue.heartbeat(list(self.models), self.settings.heartbeat_ttl_s, self.engines, costs)
                with self._hold_lock:
                    if self._holding:
                        self.queue.touch(self._holding)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    # ------------------------------------------------------------------ schedule decisions

    def _apply(self, d: Decision) -> None:
        for job_id in d.expire:
            a = self.active.pop(job_id)
            self._finish([Outcome(a.job, a.claimed, "failed",
                                  f"deadline: not finished within timeout_s={a.params.timeout_s:g}")],
                         failure=failures.DEADLINE)
        released = [self.active.pop(job_id).claimed for job_id in d.release]
        if released:
            with self._hold_lock:  # no heartbeat may touch them once released
                self._holding = [c for c in self._holding if all(c is not r for r in released)]
            self.queue.release(released, self.idle_ms)
        if d.admit:
            self._begin([self.active[job_id] for job_id in d.admit])
        self._hold()

    def _begin(self, admitted: list[Active]) -> None:
        """Mark admitted jobs running and give each its rows: prompts encoded, noise drawn."""
        now, ready = time.time(), []
        for a, attempt in zip(admitted, self.queue.start([a.claimed for a in admitted])):
            job = a.job
            if attempt is None:
                self._forget(job.id)
                self.queue.drop(a.claimed)  # cancelled or finished meanwhile
            elif attempt > self.settings.max_attempts:
                self._forget(job.id)
                reason = f"gave up after {attempt - 1} attempts"
                if job.last_error:
                    reason += f"; last error: {job.last_error}"
                self._finish([Outcome(job, a.claimed, "failed", reason)], failure=failures.DEAD_LETTER)
                self.queue.dead_letter(job, reason)
            else:
                job.attempts, job.started_at = attempt, now
                ready.append(a)
        by_runner: dict[tuple[str, str], list[Active]] = {}
        for a in ready:
            by_runner.setdefault((a.job.model, a.job.task), []).append(a)
        for (model_id, task), jobs in by_runner.items():
            try:
                rows = RUNNERS[task].begin(self.models[model_id], [a.params for a in jobs])
            except Exception as exc:
                if len(jobs) == 1:
                    self._forget(jobs[0].job.id)
                    self._fail_alone(jobs[0], exc)
                    continue
                rows = []
                for a in jobs:  # find the culprit: each alone
                    try:
                        rows.append(RUNNERS[task].begin(self.models[model_id], [a.params])[0])
                    except Exception as alone:
                        self._forget(a.job.id)
                        self._fail_alone(a, alone)
                        rows.append(None)
            for a, r in zip(jobs, rows):
                if r is not None:
                    a.rows = r

    def _stop_paused(self) -> None:
        """A paused job cancelled (or expired) leaves now, not when it resumes (every 0.2 s)."""
        paused = [self.active[e.id] for e in self.scheduler.entries.values() if e.state == "paused"]
        if not paused or time.monotonic() - self._checked_paused < 0.2:
            return
        self._checked_paused = time.monotonic()
        self._stop(paused, self.queue.stops([a.job for a in paused]))

    def _stop(self, jobs: list[Active], stops: dict[str, str]) -> None:
        for a in jobs:
            stop = stops.get(a.job.id)
            if stop is not None:
                self._forget(a.job.id)
                if stop == "gone":  # its record expired: nothing to store, ever
                    self.queue.drop(a.claimed)
                else:
                    self._finish([Outcome(a.job, a.claimed, "cancelled", "cancelled while running")])

    def _forget(self, job_id: str) -> Active | None:
        self.scheduler.remove(job_id)
        return self.active.pop(job_id, None)

    # ------------------------------------------------------------------ one step

    def _step(self, group) -> None:
        jobs = [self.active[e.id] for e in self.scheduler.running(group)]
        model = self.models[jobs[0].job.model]
        call = Call.assemble(jobs)
        for a in jobs:
            a.peak_rows = max(a.peak_rows, len(call.rows))
        counter = [0]
        started = time.perf_counter()
        self.exporter.busy.set(1)
        try:
            call.hand_back(txt2img.step(txt2img.evaluator_of(model, counter), call.rows))
        except Exception as exc:
            self._failed(jobs, exc)
            return
        finally:
            self.exporter.busy.set(0)
        self.scheduler.stepped(group, counter[0] * jobs[0].params.images_per_row)  # as Entry.cost counts
        self.meters[model.spec.id].call(counter[0] * row_units(model.spec.defaults, jobs[0].params), time.perf_counter() - started)
        self.exporter.batch(BatchRecord(model.spec.id, jobs[0].job.task, len(call.rows),
                                        [time.perf_counter() - started], counter[0]))
        self._stop(jobs, self.queue.report_progress([(a.job, *a.progress()) for a in jobs], self.previews.of(model, jobs)))
        for a in jobs:  # a pass over, more to run: the job's rows start its next one (FreeInit)
            if a.pass_done and not a.done and a.job.id in self.active:
                try:
                    a.rows, a.passes = RUNNERS[a.job.task].again(model, a.params, a.rows), a.passes + 1
                except Exception as exc:
                    self._failed([a], exc)
        done = [a for a in jobs if a.done and a.job.id in self.active]
        if done:
            self._deliver(model, done)
        self._hold()

    def _deliver(self, model: LoadedModel, jobs: list[Active]) -> None:
        """Hand finished jobs to the delivery thread (decode, encode, store, ack) and go on."""
        by_task: dict[str, list[Active]] = {}
        for a in jobs:
            self._forget(a.job.id)
            p = a.params
            self.meters[model.spec.id].job(p.rows_per_step * p.denoiser_calls * row_units(model.spec.defaults, p))
            by_task.setdefault(a.job.task, []).append(a)
        for same_task in by_task.values():  # each task decodes (and composites) its own way
            self.deliveries.submit(model, same_task)

    def _redeliver(self) -> None:
        """Deliveries that raised: an engine failure retries elsewhere; otherwise each job
        alone, to find the culprit."""
        for d in self.deliveries.failed(wait=self.stopping.is_set() and not self._admitted()):
            if failures.is_engine_failure(d.error) or len(d.jobs) == 1:
                self._failed(d.jobs, d.error)
            else:
                for a in d.jobs:
                    self.deliveries.submit(d.model, [a])

    def _failed(self, jobs: list[Active], exc: Exception) -> None:
        """A step (or decode) raised: retry elsewhere (engine/host), or isolate the job (anything else)."""
        error = f"{type(exc).__name__}: {exc}"
        if failures.is_engine_failure(exc):
            log.warning("a call over %d jobs hit an engine failure (%s); releasing them for retry", len(jobs), error)
            for a in jobs:
                self._forget(a.job.id)
            self._hold()  # before the release
            retry = [a for a in jobs if a.job.attempts < self.settings.max_attempts]
            self.queue.requeue([(a.job, a.claimed) for a in retry], error, self.idle_ms)
            self._give_up([a for a in jobs if a not in retry], error, failures.ENGINE_ERROR)
            return
        if len(jobs) > 1:
            log.exception("a step over %d jobs failed; stepping each alone to find the culprit", len(jobs))
        model = self.models[jobs[0].job.model]
        for a in jobs:
            try:
                if len(jobs) == 1:
                    raise exc
                a.rows = txt2img.step(txt2img.evaluator_of(model), a.rows)  # not the culprit: one step on
            except Exception as alone:
                self._forget(a.job.id)
                self._fail_alone(a, alone)

    def _fail_alone(self, a: Active, exc: Exception) -> None:
        log.error("job %s failed: %s", a.job.id, exc, exc_info=exc)
        self._give_up([a], f"internal error: {type(exc).__name__}: {exc}", failures.INTERNAL_ERROR)

    def _give_up(self, jobs: list[Active], error: str, reason: str) -> None:
        self._finish([Outcome(a.job, a.claimed, "failed", error) for a in jobs], failure=reason)
        for a in jobs:
            self.queue.dead_letter(a.job, f"{reason}: {error}")

    def _finish(self, outcomes: list[Outcome], failure: str | None = None) -> None:
        if not outcomes:
            return
        stored = self.queue.finish_many(outcomes)
        now = time.time()
        for o, was_stored in zip(outcomes, stored):
            if o.advance is not None:  # moved on to its next stage: counted when it ends
                continue
            if not was_stored:
                log.info("job %s already finished elsewhere (or expired); result discarded", o.job.id)
                continue
            self.exporter.job(JobRecord.finished(
                model=o.job.model, task=o.job.task if o.job.task in RUNNERS else "unknown", status=o.status,
                images=len(o.images), created_at=o.job.created_at, started_at=o.job.started_at, now=now,
                failure=failure))


def main() -> None:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    registry = load_registry(settings.registry)
    model_ids = settings.model_ids or [registry.default]
    registry_metrics = CollectorRegistry()
    exporter = WorkerExporter(registry_metrics)
    models = load_models(registry, model_ids, settings, exporter)

    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    version = redis_version(client)
    check_redis_version(version)
    log.info("redis %s at %s", version, settings.redis_url)
    server, _thread = start_http_server(settings.worker_metrics_port, registry=registry_metrics)
    log.info("metrics on :%d/metrics", server.server_port)
    worker = Worker(settings, models, WorkerQueue(client, worker_id, settings.job_ttl_s), exporter)

    def stop(signum, _frame):
        log.info("signal %d: finishing claimed work, then exiting", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


if __name__ == "__main__":
    main()
