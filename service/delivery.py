"""Finished jobs to stored images, overlapped with the next denoising step.

When a step finishes jobs, the worker hands them here and goes on stepping the others: their
rows are decoded (one VAE call for the jobs of one shape; a video's frames in chunks), encoded
as PNG / WebP / JPEG (a video as one MP4 / WebP / GIF file) and stored (one Redis script) on a
delivery thread. torch and Pillow release the GIL while they compute, so the loop's own Python
work (the sampler steps, the scheduler, Redis round trips) and the next denoiser call run
meanwhile. On CUDA the thread decodes on its own stream, after an event that marks the finished
latents ready on the loop's stream.

A delivery that raises is handed back to the loop (`failed`), which owns retry and isolation;
the thread never touches the scheduler.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engines.model import LoadedModel
from service import chain
from service.active import Active, Call
from service.queue import Claimed, Outcome
from service.runners import RUNNERS


def outcomes_of(model: LoadedModel, jobs: list[Active]) -> list[Outcome]:
    """Decode the finished jobs' rows in one call (they share a shape) and encode each job's
    images from its own range of the call."""
    started = time.perf_counter()
    call = Call.assemble(jobs)
    pixels = RUNNERS[jobs[0].job.task].finish(model, call.rows).numpy()  # jobs of one task: Worker._step
    decode_s = time.perf_counter() - started
    finished_at = time.time()
    outcomes = []
    for a, span in zip(call.jobs, call.ranges):  # each job reads only its own range
        p, job = a.params, a.job
        own = pixels[span.start:span.stop]
        composite = RUNNERS[job.task].composite
        if composite is not None:
            own = composite(p, own)
        then = job.request.get("then")  # a chained job's next stage reads lossless PNGs
        fmt = "png" if then else p.output_format
        output = RUNNERS[job.task].output  # an image file, or one file per video (all its frames)
        images = [output(p, np.ascontiguousarray(image), seed, fmt) for image, seed in zip(own, p.seeds())]
        started_at = job.started_at or finished_at
        timings = {"queue_s": round(max(0.0, started_at - job.created_at), 4),
                   "inference_s": round(finished_at - started_at, 4), "decode_s": round(decode_s, 4),
                   "total_s": round(finished_at - job.created_at, 4)}
        step, total = a.progress()
        outcome = Outcome(job, a.claimed, "succeeded", None, images, {
            "timings": timings, "batch_size": a.peak_rows, "denoiser_calls": p.denoiser_calls,
            "progress_step": step, "progress_total": total})
        outcome.advance = chain.advance(job, images)
        if outcome.advance is not None:  # on to the next stage: the images are its inputs, not a result
            outcome.images, outcome.extra = [], {"progress_step": step, "progress_total": total}
        outcomes.append(outcome)
    return outcomes


@dataclass
class Delivery:
    model: LoadedModel
    jobs: list[Active]
    future: Future | None = None
    error: Exception | None = None


class Deliveries:
    """Decode, encode and store finished jobs: on one background thread (`overlap`), or inline."""

    def __init__(self, store: Callable[[list[Outcome]], None], overlap: bool = True):
        self.store = store
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deliver") if overlap else None
        self._pending: list[Delivery] = []
        self._streams: dict[str, object] = {}  # CUDA device -> the delivery thread's stream

    def submit(self, model: LoadedModel, jobs: list[Active]) -> None:
        d = Delivery(model, jobs)
        if self._pool is None:
            d.error = self._run(model, jobs, None)
        else:
            ready = None
            if model.device.startswith("cuda"):
                import torch

                ready = torch.cuda.Event()
                ready.record()  # the finished latents, on the loop's stream
            d.future = self._pool.submit(self._run, model, jobs, ready)
        self._pending.append(d)

    def _run(self, model: LoadedModel, jobs: list[Active], ready) -> Exception | None:
        try:
            if ready is None:
                outcomes = outcomes_of(model, jobs)
            else:
                import torch

                stream = self._streams.setdefault(model.device, torch.cuda.Stream(model.device))
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    outcomes = outcomes_of(model, jobs)  # ends in a copy to the host: synchronised
            self.store(outcomes)
            return None
        except Exception as exc:  # handed back to the loop, which decides
            return exc

    def holding(self) -> list[Claimed]:
        """Entries still being delivered: the heartbeat keeps them claimed."""
        return [a.claimed for d in self._pending for a in d.jobs]

    def failed(self, wait: bool = False) -> list[Delivery]:
        """Forget finished deliveries; return those that raised (`error` set). `wait`: all of them."""
        done, failed = [], []
        for d in self._pending:
            if d.future is not None and (wait or d.future.done()):
                d.error = d.future.result()
                d.future = None
            if d.future is None:
                done.append(d)
                if d.error is not None:
                    failed.append(d)
        self._pending = [d for d in self._pending if all(d is not e for e in done)]
        return failed

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

