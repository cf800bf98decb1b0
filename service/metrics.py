"""Metrics as plain records; Prometheus is one exporter of them (vLLM's stats/loggers split).

Names follow Prometheus conventions: the latentserve_ prefix, base units in the name, _total
on counters. Histograms of durations span 10 ms to 10 min.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from engines.cache import CacheEvent

disable_created_metrics()  # the *_created series only add noise to dashboards

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class JobRecord:
    """One finished job, counted once (only by the worker whose result was stored)."""

    model: str
    task: str
    status: str  # succeeded | failed | cancelled
    images: int
    queue_s: float | None
    inference_s: float | None
    end_to_end_s: float
    failure_reason: str | None = None

    @classmethod
    def finished(cls, *, model: str, task: str, status: str, images: int, created_at: float,
                 started_at: float | None, now: float, failure: str | None) -> "JobRecord":
        """A job's record at its end: queue time only if it started, inference time only if it
        succeeded, the failure reason only if it failed."""
        return cls(model=model, task=task, status=status, images=images,
                   queue_s=(started_at - created_at) if started_at else None,
                   inference_s=(now - started_at) if started_at and status == "succeeded" else None,
                   end_to_end_s=now - created_at,
                   failure_reason=failure if status == "failed" else None)


@dataclass(frozen=True)
class BatchRecord:
    model: str
    task: str
    images: int
    step_seconds: list[float]
    denoiser_rows: int = 0  # network rows computed for the batch (guidance halves, guide calls)


class WorkerExporter:
    def __init__(self, registry: CollectorRegistry):
        labels = ["model", "task"]
        self.jobs = Counter("latentserve_jobs_finished_total", "Jobs finished, by final status",
                            ["model", "task", "status"], registry=registry)
        self.failures = Counter("latentserve_job_failures_total", "Failed jobs, by reason",
                                ["model", "reason"], registry=registry)
        self.images = Counter("latentserve_images_generated_total", "Images generated",
                              labels, registry=registry)
        self.queue_wait = Histogram("latentserve_job_queue_wait_seconds", "Enqueue to start",
                                    labels, buckets=SECONDS_BUCKETS, registry=registry)
        self.inference = Histogram("latentserve_job_inference_seconds", "Engine time of the batch a job ran in",
                                   labels, buckets=SECONDS_BUCKETS, registry=registry)
        self.end_to_end = Histogram("latentserve_job_end_to_end_seconds", "Enqueue to finish",
                                    labels, buckets=SECONDS_BUCKETS, registry=registry)
        self.batch_size = Histogram("latentserve_batch_size_images", "Images per engine batch",
                                    labels, buckets=BATCH_BUCKETS, registry=registry)
        self.step = Histogram("latentserve_denoise_step_seconds", "Seconds per denoising step (whole batch)",
                              labels, buckets=STEP_BUCKETS, registry=registry)
        self.denoiser_rows = Counter("latentserve_denoiser_rows_total",
                                     "Network rows computed (over images generated: guidance's cost per image)",
                                     labels, registry=registry)
        self.busy = Gauge("latentserve_worker_busy", "1 while the worker runs a batch",
                          registry=registry)
        cache_labels = ["model", "component", "kind"]
        self.cache_hits = Counter("latentserve_engine_cache_hits_total", "Engine artefacts found in the cache",
                                  cache_labels, registry=registry)
        self.cache_misses = Counter("latentserve_engine_cache_misses_total", "Engine artefacts built (not cached)",
                                    cache_labels, registry=registry)
        self.build_seconds = Counter("latentserve_engine_build_seconds_total", "Seconds spent building engine artefacts",
                                     cache_labels, registry=registry)
        self.engine_info = Gauge("latentserve_engine_info", "1 for the engine and precision serving each model",
                                 ["model", "engine", "precision", "device"], registry=registry)

    def job(self, rec: JobRecord) -> None:
        self.jobs.labels(rec.model, rec.task, rec.status).inc()
        if rec.status == "succeeded":
            self.images.labels(rec.model, rec.task).inc(rec.images)
        if rec.failure_reason:
            self.failures.labels(rec.model, rec.failure_reason).inc()
        if rec.queue_s is not None:
            self.queue_wait.labels(rec.model, rec.task).observe(rec.queue_s)
        if rec.inference_s is not None:
            self.inference.labels(rec.model, rec.task).observe(rec.inference_s)
        self.end_to_end.labels(rec.model, rec.task).observe(rec.end_to_end_s)

    def engine_lookup(self, rec: CacheEvent) -> None:
        labels = (rec.model, rec.component, rec.kind)
        (self.cache_hits if rec.hit else self.cache_misses).labels(*labels).inc()
        self.build_seconds.labels(*labels).inc(rec.build_s)

    def batch(self, rec: BatchRecord) -> None:
        self.batch_size.labels(rec.model, rec.task).observe(rec.images)
        self.denoiser_rows.labels(rec.model, rec.task).inc(rec.denoiser_rows)
        for seconds in rec.step_seconds:
            self.step.labels(rec.model, rec.task).observe(seconds)


class ApiExporter:
    def __init__(self, registry: CollectorRegistry):
        self.http = Counter("latentserve_http_requests_total", "HTTP requests, by route and code",
                            ["method", "route", "code"], registry=registry)
        self.generate = Counter("latentserve_generate_requests_total",
                                "Generation requests, by model, task and HTTP code",
                                ["model", "task", "code"], registry=registry)
        self.queue_depth = Gauge("latentserve_queue_depth", "Unfinished jobs (queued + running)",
                                 ["model"], registry=registry)
        self.live_workers = Gauge("latentserve_live_workers", "Workers with a fresh heartbeat",
                                  ["model"], registry=registry)
