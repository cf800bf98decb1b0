"""The worker process: load models once, warm up, then claim -> batch -> run -> store -> ack.

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
from service.batching import plan_batches
from service.config import Settings, load_settings
from service.media import encode_image
from service.metrics import BatchRecord, JobRecord, WorkerExporter
from service.queue import Claimed, Job, StoredImage, WorkerQueue

log = logging.getLogger("latentserve.worker")

Held = tuple[Job, Claimed]


class BatchCancelled(Exception):
    """Every job of the running batch was cancelled: stop sampling."""


class Worker:
    def __init__(self, settings: Settings, models: dict[str, LoadedModel], queue: WorkerQueue,
                 exporter: WorkerExporter):
        self.settings = settings
        self.models = models
        self.queue = queue
        self.exporter = exporter
        self.max_batch = settings.max_batch or max(m.spec.max_batch for m in models.values())
        self.engines = {model_id: {"engine": m.engine, "precision": m.precision, "device": m.device}
                        for model_id, m in models.items()}
        self.stopping = threading.Event()
        self._holding: list[Claimed] = []  # entries to keep fresh (read by the heartbeat thread)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        model_ids = list(self.models)
        for model_id in model_ids:
            self.queue.ensure_group(model_id)
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        held: list[Held] = []
        log.info("worker %s serving %s (max_batch=%d)", self.queue.worker_id, model_ids, self.max_batch)
        while held or not self.stopping.is_set():
            if not self.stopping.is_set():
                try:
                    held += self._claim(held)
                except redis.ConnectionError as exc:  # Redis restarting: wait, don't die
                    log.warning("redis unavailable (%s); retrying in 1s", exc)
                    time.sleep(1)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    for model_id in model_ids:  # the stream was deleted (e.g. FLUSHALL)
                        self.queue.ensure_group(model_id)
                self._holding = [c for _, c in held]
            if not held:
                continue
            batch = plan_batches(held, self.max_batch)[0]
            held = [h for h in held if not any(h is b for b in batch)]
            self._run_batch(batch)
            self._holding = [c for _, c in held]
        self.queue.leave(model_ids)
        log.info("worker %s stopped", self.queue.worker_id)

    def _claim(self, held: list[Held]) -> list[Held]:
        """New entries up to max_batch images: block briefly for the first, then give others
        fill_window_s to arrive. With jobs already held, only take what is waiting now."""
        capacity = self.max_batch - sum(job.num_images for job, _ in held)
        if capacity <= 0:
            return []
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        models = list(self.models)
        claimed = self.queue.claim(models, capacity, None if held else 1000, min_idle_ms)
        images = sum(c.images for c in claimed)
        if claimed and not held and images < capacity and self.settings.fill_window_s > 0:
            # A plain sleep, not a blocking read: Redis checks BLOCK timeouts only `hz` times
            # a second (every 100 ms by default), far coarser than a fill window.
            time.sleep(self.settings.fill_window_s)
            claimed += self.queue.claim(models, capacity - images, None, min_idle_ms)
        out = []
        for c, job in zip(claimed, self.queue.load(claimed)):
            if job is None or job.model not in self.models:
                self.queue.drop(c)  # expired record, or a stream we no longer serve
            else:
                out.append((job, c))
        return out

    def _heartbeat(self) -> None:
        while not self.stopping.wait(0) or self._holding:
            try:
                self.queue.heartbeat(list(self.models), self.settings.heartbeat_ttl_s, self.engines)
                if self._holding:
                    self.queue.touch(self._holding)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    # ------------------------------------------------------------------ one batch

    def _run_batch(self, batch: list[Held]) -> None:
        attempts = self.queue.start([c for _, c in batch])
        active: list[Held] = []
        for (job, claimed), attempt in zip(batch, attempts):
            if attempt is None:
                self.queue.drop(claimed)  # cancelled or finished meanwhile
            elif attempt > self.settings.max_attempts:
                reason = f"gave up after {attempt - 1} attempts"
                if job.last_error:
                    reason += f"; last error: {job.last_error}"
                self._finish([(job, claimed, "failed", reason, [], {})], failure="dead_letter")
                self.queue.dead_letter(job, reason)
            else:
                job.attempts, job.started_at = attempt, time.time()
                active.append((job, claimed))
        if not active:
            return
        self.exporter.busy.set(1)
        try:
            self._generate(active)
        finally:
            self.exporter.busy.set(0)

    def _generate(self, active: list[Held]) -> None:
        first = active[0][0]
        model = self.models[first.model]
        r = first.request
        rows = [
            txt2img.ImageRequest(job.request["prompt"], job.request.get("negative_prompt", ""),
                                 (job.request["seed"] + k) % 2**32, job.request["guidance_scale"])
            for job, _ in active
            for k in range(job.num_images)
        ]
        batch = txt2img.Txt2ImgBatch(r["width"], r["height"], r["sampler"], r["steps"], rows)
        step_times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, total: int) -> None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            cancelled = self.queue.report_progress([job for job, _ in active], step, total)
            if cancelled:
                done = [(job, c, "cancelled", "cancelled while running", [], {})
                        for job, c in active if job.id in cancelled]
                self._finish(done)
                active[:] = [(job, c) for job, c in active if job.id not in cancelled]
                if not active:
                    raise BatchCancelled
            last[0] = time.perf_counter()

        started = time.perf_counter()
        try:
            pixels = txt2img.run(model, batch, on_step).numpy()
        except BatchCancelled:
            return
        except Exception as exc:  # the batch failed: retry each job later, up to max_attempts
            log.exception("batch of %d jobs failed", len(active))
            self._holding = [c for c in self._holding if all(c is not h for _, h in active)]
            retry = []
            for job, claimed in active:
                error = f"{type(exc).__name__}: {exc}"
                if job.attempts >= self.settings.max_attempts:
                    retry.append((job, claimed, "failed", error, [], {}))
                else:
                    self.queue.record_error(job, error)  # left pending: reclaimed after the timeout
            self._finish(retry, failure=type(exc).__name__)
            return
        inference_s = time.perf_counter() - started
        self.exporter.batch(BatchRecord(model.spec.id, first.task, len(rows), step_times))

        outcomes, row = [], 0
        finished_at = time.time()
        for job, claimed in active:
            images = []
            for k in range(job.num_images):
                data, mime = encode_image(np.ascontiguousarray(pixels[row]), job.request["output_format"])
                images.append(StoredImage(data, mime, rows[row].seed, r["width"], r["height"]))
                row += 1
            started_at = job.started_at or finished_at
            timings = {
                "queue_s": round(max(0.0, started_at - job.created_at), 4),
                "inference_s": round(inference_s, 4),
                "total_s": round(finished_at - job.created_at, 4),
            }
            outcomes.append((job, claimed, "succeeded", None, images,
                             {"timings": timings, "batch_size": len(rows),
                              "progress_step": r["steps"], "progress_total": r["steps"]}))
        self._finish(outcomes, inference_s=inference_s)

    def _finish(self, outcomes: list[tuple], failure: str | None = None,
                inference_s: float | None = None) -> None:
        if not outcomes:
            return
        stored = self.queue.finish_many(outcomes)
        now = time.time()
        for (job, _c, status, _e, images, extra), was_stored in zip(outcomes, stored):
            if not was_stored:
                log.info("job %s already finished elsewhere; result discarded", job.id)
                continue
            started_at = job.started_at
            self.exporter.job(JobRecord(
                model=job.model, task=job.task, status=status, images=len(images),
                queue_s=(started_at - job.created_at) if started_at else None,
                inference_s=inference_s, end_to_end_s=now - job.created_at,
                failure_reason=failure if status == "failed" else None,
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
        model = loader.load(
            registry.get(model_id), engine=settings.engine, precision=settings.precision,
            device=settings.device, cache=cache, on_event=exporter.engine_lookup,
            threads=settings.torch_threads, cuda_graphs=bool(settings.cuda_graphs),
        )
        exporter.engine_info.labels(model_id, model.engine, model.precision, model.device).set(1)
        models[model_id] = model
        log.info("loaded %s on %s %s (%s) in %.2fs; warm-up %.2fs", model_id, model.engine, model.precision,
                 model.device, time.perf_counter() - started, warm_up(model))

    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
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
