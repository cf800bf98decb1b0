"""Which claimed jobs run together: pure functions over plain data (no Redis, no model).

Jobs share engine calls when they agree on everything that shapes the computation (model,
task and the task's compatibility key: size, sampler, steps); prompts, seeds and guidance
scales may differ row by row. A batch fixes each job's row range when it is built, and
results are read back by that range only: never by position in a list that changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from service.queue import Claimed, Job


@dataclass
class Admitted:
    """A claimed job whose request parsed: ready to be batched."""

    job: Job
    claimed: Claimed
    params: Any  # the task's typed parameters (service.runners)

    @property
    def key(self) -> Hashable:
        return (self.job.model, self.job.task, self.params.compatibility_key())


@dataclass
class Member:
    """One job of a batch and the rows it owns, fixed when the batch is built."""

    job: Job
    claimed: Claimed
    params: Any
    rows: range
    stopped: str | None = None  # "cancelled" or "gone" once it must not be delivered


@dataclass
class Batch:
    model: str
    task: str
    members: list[Member] = field(default_factory=list)

    @classmethod
    def build(cls, items: list[Admitted]) -> "Batch":
        batch, row = cls(items[0].job.model, items[0].job.task), 0
        for item in items:
            n = item.params.num_images
            batch.members.append(Member(item.job, item.claimed, item.params, range(row, row + n)))
            row += n
        return batch

    @property
    def rows(self) -> int:
        """Rows in each engine call: every member's, cancelled ones included."""
        return sum(len(m.rows) for m in self.members)

    def live(self) -> list[Member]:
        return [m for m in self.members if m.stopped is None]


def plan_batches(items: list[Admitted], max_batch: dict[str, int]) -> list[list[Admitted]]:
    """Group by compatibility key, oldest group first, and pack each group greedily (in arrival
    order) into batches of at most its model's `max_batch` images. A job larger than that
    runs alone rather than being split."""
    groups: dict[Hashable, list[Admitted]] = {}
    for item in items:
        groups.setdefault(item.key, []).append(item)
    batches: list[list[Admitted]] = []
    for group in groups.values():
        limit = max_batch[group[0].job.model]
        current: list[Admitted] = []
        images = 0
        for item in group:
            n = item.params.num_images
            if current and images + n > limit:
                batches.append(current)
                current, images = [], 0
            current.append(item)
            images += n
        batches.append(current)
    return batches
