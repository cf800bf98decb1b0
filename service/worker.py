"""The worker process: load models once, warm up, then claim -> admit -> batch -> run -> store -> ack.

A worker holds only the batch it runs: what it claimed for other groups goes straight back to
the queue for idle workers. Results are tied to jobs by the row ranges fixed when the batch
is built (service.batching), so a cancelled batch-mate can never shift another job's images.

    python -m service.worker            # serves LATENTSERVE_WORKER_MODELS (default: the default model)

SIGTERM or SIGINT: finish what is claimed, claim nothing new, exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import numpy as np
import redis
from prometheus_client import CollectorRegistry, start_http_server

from engines import loader
from engines.cache import EngineCache
from engines.model import LoadedModel
from engines.registry import load_registry
from engines.tasks import txt2img
from service import failures
from service.batching import Admitted, Batch, Member, plan_batches
from service.config import Settings, load_settings
from service.media import encode_image
from service.metrics import BatchRecord, JobRecord, WorkerExporter
from service.queue import Claimed, Outcome, StoredImage, WorkerQueue, check_redis_version, redis_version
from service.runners import RUNNERS, JobInputError

log = logging.getLogger("latentserve.worker")

class BatchStopped(Exception):
    """Every job of the running batch was cancelled (or its record is gone): stop sampling."""


class Worker:
    def __init__(self, settings: Settings, models: dict[str, LoadedModel], queue: WorkerQueue,
                 exporter: WorkerExporter):
        self.settings = settings
        self.models = models
        self.queue = queue
        self.exporter = exporter
        # Each model batches up to its own max_batch (the setting overrides every model's).
        self.max_batch = {model_id: settings.max_batch or m.spec.max_batch for model_id, m in models.items()}
        self.engines = {model_id: {"engine": m.engine, "precision": m.precision, "device": m.device}
                        for model_id, m in models.items()}
        self.idle_ms = int(settings.visibility_timeout_s * 1000)
        self.stopping = threading.Event()
        # The entries this worker runs now, kept fresh by the heartbeat thread. The lock keeps
        # a heartbeat from touching an entry just released (which would hide it again).
        self._holding: list[Claimed] = []
        self._hold_lock = threading.Lock()

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        model_ids = list(self.models)
        for model_id in model_ids:
            self.queue.ensure_group(model_id)
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving %s (max_batch %s)", self.queue.worker_id, model_ids, self.max_batch)
        while not self.stopping.is_set():
            try:
                admitted = self._admit(self._claim())
            except redis.ConnectionError as exc:  # Redis restarting: wait, don't die
                log.warning("redis unavailable (%s); retrying in 1s", exc)
                time.sleep(1)
                continue
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                for model_id in model_ids:  # the stream was deleted (e.g. FLUSHALL)
                    self.queue.ensure_group(model_id)
                continue
            if not admitted:
                continue
            # Hold only what runs now: every other group goes back at once, for any worker.
            first, *others = plan_batches(admitted, self.max_batch)
            self._hold([item.claimed for item in first])
            self.queue.release([item.claimed for batch in others for item in batch], self.idle_ms)
            self._run_batch(first)
            self._hold([])
        self.queue.leave(model_ids)
        log.info("worker %s stopped", self.queue.worker_id)

    def _claim(self) -> list[Claimed]:
        """New entries: block briefly for the first, then give others fill_window_s to arrive.
        Entries taken over with XAUTOCLAIM have waited already, so they skip the window."""
        capacity = max(self.max_batch.values())
        models = list(self.models)
        claimed = self.queue.claim(models, capacity, 1000, self.idle_ms)
        fresh = claimed and not any(c.reclaimed for c in claimed)
        if fresh and len(claimed) < capacity and self.settings.fill_window_s > 0:
            # A plain sleep, not a blocking read: Redis checks BLOCK timeouts only `hz` times
            # a second (every 100 ms by default), far coarser than a fill window.
            time.sleep(self.settings.fill_window_s)
            claimed += self.queue.claim(models, capacity - len(claimed), None, self.idle_ms)
        return claimed

    def _admit(self, claimed: list[Claimed]) -> list[Admitted]:
        """Claimed entries whose records parse; the rest end here, before any engine call."""
        admitted, failed = [], []
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
                admitted.append(Admitted(job, c, runner.parse(job.request, self.models[job.model])))
            except JobInputError as exc:
                failed.append((Outcome(job, c, "failed", f"invalid request: {exc}"), failures.INVALID_INPUT))
        for outcome, reason in failed:
            self._finish([outcome], failure=reason)
        return admitted

    def _hold(self, claimed: list[Claimed]) -> None:
        with self._hold_lock:
            self._holding = claimed

    def _heartbeat(self) -> None:
        while not self.stopping.wait(0) or self._holding:
            try:
                self.queue.heartbeat(list(self.models), self.settings.heartbeat_ttl_s, self.engines)
                with self._hold_lock:
                    if self._holding:
                        self.queue.touch(self._holding)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    # ------------------------------------------------------------------ one batch

    def _run_batch(self, items: list[Admitted]) -> None:
        attempts = self.queue.start([item.claimed for item in items])
        runnable = []
        for item, attempt in zip(items, attempts):
            job = item.job
            if attempt is None:
                self.queue.drop(item.claimed)  # cancelled or finished meanwhile
            elif attempt > self.settings.max_attempts:
                reason = f"gave up after {attempt - 1} attempts"
                if job.last_error:
                    reason += f"; last error: {job.last_error}"
                self._finish([Outcome(job, item.claimed, "failed", reason)], failure=failures.DEAD_LETTER)
                self.queue.dead_letter(job, reason)
            else:
                job.attempts, job.started_at = attempt, time.time()
                runnable.append(item)
        if not runnable:
            return
        self.exporter.busy.set(1)
        try:
            self._execute(Batch.build(runnable))
        finally:
            self.exporter.busy.set(0)

    def _execute(self, batch: Batch) -> None:
        model = self.models[batch.model]
        step_times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, total: int) -> None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            stops = self.queue.report_progress([m.job for m in batch.live()], step, total)
            stopping = [m for m in batch.live() if m.job.id in stops]
            for member in stopping:
                member.stopped = stops[member.job.id]
                if member.stopped == "gone":  # its record expired: nothing to store, ever
                    self.queue.drop(member.claimed)
            self._finish([Outcome(m.job, m.claimed, "cancelled", "cancelled while running")
                          for m in stopping if m.stopped == "cancelled"])
            if not batch.live():
                raise BatchStopped
            last[0] = time.perf_counter()

        stats = txt2img.RunStats()
        started = time.perf_counter()
        try:
            pixels = RUNNERS[batch.task].run(model, [m.params for m in batch.members], on_step, stats).numpy()
        except BatchStopped:
            return
        except Exception as exc:
            self._failed(batch, exc)
            return
        inference_s = time.perf_counter() - started
        self.exporter.batch(BatchRecord(batch.model, batch.task, batch.rows, step_times, stats.denoiser_rows))
        finished_at = time.time()
        outcomes = []
        for member in batch.live():  # rows are read by each job's own range, fixed at build time
            p, job = member.params, member.job
            images = [StoredImage(*encode_image(np.ascontiguousarray(pixels[row]), p.output_format),
                                  seed, p.width, p.height)
                      for row, seed in zip(member.rows, p.seeds())]
            started_at = job.started_at or finished_at
            timings = {
                "queue_s": round(max(0.0, started_at - job.created_at), 4),
                "inference_s": round(inference_s, 4),
                "total_s": round(finished_at - job.created_at, 4),
            }
            outcomes.append(Outcome(job, member.claimed, "succeeded", None, images, {
                "timings": timings, "batch_size": batch.rows, "denoiser_calls": p.denoiser_calls,
                "progress_step": p.steps, "progress_total": p.steps}))
        self._finish(outcomes, inference_s=inference_s)

    def _failed(self, batch: Batch, exc: Exception) -> None:
        """An engine call raised: retry elsewhere (engine/host), or isolate the job (anything else)."""
        live = batch.live()
        error = f"{type(exc).__name__}: {exc}"
        if failures.is_engine_failure(exc):
            log.warning("batch of %d jobs hit an engine failure (%s); releasing them for retry", len(live), error)
            retry = [m for m in live if m.job.attempts < self.settings.max_attempts]
            self._hold([c for c in self._holding if all(c is not m.claimed for m in retry)])  # before release
            self.queue.requeue([(m.job, m.claimed) for m in retry], error, self.idle_ms)
            self._give_up([m for m in live if m not in retry], error, failures.ENGINE_ERROR)
        elif len(live) > 1:
            log.exception("batch of %d jobs failed; rerunning each alone to find the culprit", len(live))
            for m in live:
                self._execute(Batch.build([Admitted(m.job, m.claimed, m.params)]))
        else:
            log.exception("job %s failed", live[0].job.id)
            self._give_up(live, f"internal error: {error}", failures.INTERNAL_ERROR)

    def _give_up(self, members: list[Member], error: str, reason: str) -> None:
        self._finish([Outcome(m.job, m.claimed, "failed", error) for m in members], failure=reason)
        for m in members:
            self.queue.dead_letter(m.job, f"{reason}: {error}")

    def _finish(self, outcomes: list[Outcome], failure: str | None = None,
                inference_s: float | None = None) -> None:
        if not outcomes:
            return
        stored = self.queue.finish_many(outcomes)
        now = time.time()
        for o, was_stored in zip(outcomes, stored):
            if not was_stored:
                log.info("job %s already finished elsewhere (or expired); result discarded", o.job.id)
                continue
            started_at = o.job.started_at
            self.exporter.job(JobRecord(
                model=o.job.model, task=o.job.task if o.job.task in RUNNERS else "unknown",
                status=o.status, images=len(o.images),
                queue_s=(started_at - o.job.created_at) if started_at else None,
                inference_s=inference_s, end_to_end_s=now - o.job.created_at,
                failure_reason=failure if o.status == "failed" else None,
            ))


def warm_up(model: LoadedModel) -> float:
    """One short generation at the default size, so the first request pays no first-call costs."""
    d = model.spec.defaults
    batch = txt2img.Txt2ImgBatch(d.width, d.height, d.sampler, 2,
                                 [txt2img.ImageRequest("warm up", "", 0, d.guidance_scale)])
    started = time.perf_counter()
    txt2img.run(model, batch)
    return time.perf_counter() - started


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
    cache = EngineCache(settings.engine_cache or None)
    models = {}
    for model_id in model_ids:
        started = time.perf_counter()
        model = loader.load_with_guide(
            registry, registry.get(model_id), engine=settings.engine, precision=settings.precision,
            device=settings.device, cache=cache, on_event=exporter.engine_lookup,
            threads=settings.torch_threads, cuda_graphs=bool(settings.cuda_graphs),
        )
        exporter.engine_info.labels(model_id, model.engine, model.precision, model.device).set(1)
        models[model_id] = model
        log.info("loaded %s on %s %s (%s) in %.2fs; warm-up %.2fs", model_id, model.engine, model.precision,
                 model.device, time.perf_counter() - started, warm_up(model))

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
