"""Submitting a job and waiting for its end: what every route that creates jobs shares (our
own /v1/generate, the OpenAI Images routes), so validation, admission and the queue's
protocol are applied one way.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from engines.registry import Registry
from service import image_inputs
from service.admission import admit
from service.chain import plan_upscale
from service.config import Settings
from service.queue import TERMINAL, ApiQueue, Job, QueueFull
from service.schemas import GenerateRequest
from service.uploads import UploadLimits
from service.validation import ApiError, model_for, resolve

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Submitter:
    registry: Registry
    settings: Settings
    uploads: UploadLimits

    async def submit(self, q: ApiQueue, body: GenerateRequest, files: dict[str, bytes],
                     job_id: str | None = None) -> Job:
        """Validate `body` (and its uploaded files), admit it and queue it; the queued job.
        To see all its events, subscribe to a `new_id()` first and pass it as `job_id`."""
        model_for(body, self.registry)  # an unknown model or task before anything uploaded is read
        pixels = await run_in_threadpool(image_inputs.decode_all, image_inputs.gather(body, files), self.uploads)
        resolved = resolve(body, self.registry, image_inputs.image_size(pixels, body.task))
        inputs = await run_in_threadpool(image_inputs.complete, body, resolved, pixels)
        if body.upscale:
            plan_upscale(body, resolved, self.registry)
        job = Job(id=job_id or new_id(), model=resolved.spec.id, task=body.task,
                  request=resolved.request, created_at=time.time(), warnings=resolved.warnings)
        await admit(q, resolved.spec, resolved.request, self.settings.heartbeat_ttl_s)
        try:
            await q.enqueue(job, resolved.spec.limits.max_queue, inputs)
        except QueueFull:
            raise ApiError(429, "queue_full", f"model {job.model} has {resolved.spec.limits.max_queue} "
                           "unfinished jobs; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
        return job


def new_id() -> str:
    return uuid.uuid4().hex


async def wait_for_end(q: ApiQueue, events, job_id: str, timeout: float) -> Job | None:
    """The job once it is finished (None if `timeout` passes first). `events` is a
    subscription to its id, opened before the job was queued."""
    deadline = time.monotonic() + timeout
    while True:
        job = await q.get(job_id)
        if job is None or job.status in TERMINAL:
            return job
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Re-read the record at least every few seconds: an event lost while the shared
        # subscription reconnected only delays the answer.
        while (event := await events.next_event(min(left, 5.0))) is not None and event["type"] != "done":
            left = deadline - time.monotonic()
