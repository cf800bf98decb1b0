"""The jobs a worker holds and their rows: what the scheduler's decisions act on.

Each job keeps its own rows (engines.sampling.Row: latent, schedule position, sampler memory,
generator, conditioning, guidance). A step assembles the rows of its group's running jobs,
computes them in one engine call, and hands each job back exactly the rows it gave, by the
range recorded when the call was assembled, so no job can ever receive another's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.sampling import Row
from service import chain
from service.queue import Claimed, Job
from service.scheduler import PRIORITIES, Entry


@dataclass
class Active:
    job: Job
    claimed: Claimed
    params: Any  # the task's typed parameters (service.runners)
    rows: list[Row] | None = None  # None until admitted
    peak_rows: int = 0  # the most rows of any engine call it shared (its job's batch size)
    passes: int = 1  # passes over the schedule begun (params.passes in all: txt2video's FreeInit)

    @property
    def pass_done(self) -> bool:
        return self.rows is not None and all(r.done for r in self.rows)

    @property
    def done(self) -> bool:
        return self.pass_done and self.passes >= self.params.passes

    def progress(self) -> tuple[int, int]:
        """(steps done, total) as progress events count them: the job's slowest row, over all
        its passes (and both stages of a chained job, service.chain)."""
        steps = max(r.steps for r in self.rows)
        return chain.progress(self.job, (self.passes - 1) * steps + min(r.step for r in self.rows),
                              self.params.passes * steps)

    def entry(self, policy: str) -> Entry:
        p = self.params
        group = (self.job.model, p.request_key() if policy == "request" else p.shape_key())
        deadline = None if p.timeout_s is None else self.job.created_at + p.timeout_s
        # Budgets and turns count images: a video row of F frames weighs F (its network call
        # runs all F frames through every layer), so max_batch bounds frames per call.
        per_row = p.images_per_row
        return Entry(self.job.id, self.job.model, group, p.num_images * per_row, p.rows_per_step * per_row,
                     PRIORITIES[p.priority], self.job.created_at, deadline, offered=self.claimed.reclaimed)


@dataclass(frozen=True)
class Call:
    """The rows of one step, and which range of them belongs to which job."""

    jobs: list[Active]
    ranges: list[range]
    rows: list[Row]

    @classmethod
    def assemble(cls, jobs: list[Active]) -> "Call":
        rows, ranges = [], []
        for job in jobs:
            ranges.append(range(len(rows), len(rows) + len(job.rows)))
            rows += job.rows
        return cls(jobs, ranges, rows)

    def hand_back(self, stepped: list[Row]) -> None:
        assert len(stepped) == len(self.rows)
        for job, span in zip(self.jobs, self.ranges):
            job.rows = stepped[span.start:span.stop]
