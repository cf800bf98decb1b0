"""Which claimed jobs run together: pure functions over plain data (no Redis, no model).

Jobs share engine calls when they agree on everything that shapes the computation (model,
task, size, sampler, steps); prompts, seeds and guidance scales may differ row by row.
"""

from __future__ import annotations

from typing import Hashable, TypeVar

from service.queue import Job

T = TypeVar("T")


def compatibility_key(job: Job) -> Hashable:
    r = job.request
    return (job.model, job.task, r["width"], r["height"], r["sampler"], r["steps"])


def plan_batches(items: list[tuple[Job, T]], max_images: int) -> list[list[tuple[Job, T]]]:
    """Group by compatibility key, oldest group first, and pack each group greedily (in arrival
    order) into batches of at most `max_images` images. A job larger than `max_images` runs
    alone rather than being split."""
    groups: dict[Hashable, list[tuple[Job, T]]] = {}
    for item in items:
        groups.setdefault(compatibility_key(item[0]), []).append(item)
    batches: list[list[tuple[Job, T]]] = []
    for group in groups.values():
        current: list[tuple[Job, T]] = []
        images = 0
        for item in group:
            n = item[0].num_images
            if current and images + n > max_images:
                batches.append(current)
                current, images = [], 0
            current.append(item)
            images += n
        batches.append(current)
    return batches
