"""The step-level scheduler: which jobs' rows take the next denoising step. Plain data and
pure decisions (no Redis, no model), as vLLM v1's scheduler: the worker loop is
`schedule -> execute -> update`, one engine call per iteration.

- A job's rows join the running set at any step boundary (admission) and leave at their own
  end, when cancelled, or past their deadline (eviction); rows of different step counts,
  samplers and guidance share each call of their group.
- A group is what one engine call can hold: the model and the latent shape (and, under the
  whole-request policy, everything the old batches had to agree on).
- Budget: a group's running rows (images), i.e. one engine call, never exceed its model's max
  batch; a model holds at most HOLD_GROUPS budgets of rows across its groups.
- Fairness: the groups a worker holds take turns by deficit round robin over denoising cost
  (network rows per step; Shreedhar & Varghese 1996), so each gets an equal share of the
  engine whatever its image size or guidance, and none starves. A job of a new group that
  reaches a busy worker is first given back for idle workers (released once); if it comes
  back (nobody else took it), this worker admits it beside its running groups.
- Priority: high before normal before low (then arrival order). A waiting job that does not
  fit pauses running jobs of lower priority (latest arrivals first) to make room; paused
  jobs keep their rows and resume where they stopped.
- Policies: "step" (the default) admits at every boundary; "request" is the whole-request
  baseline: a model admits only into an empty batch, and only jobs of one group, whose key
  then includes the step count, so the batch runs start to end together.
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass, field
from typing import Hashable

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
# A step's call holds one group's rows, up to the model's budget; a worker holds at most this
# many budgets' worth of rows across groups, so each shape's calls can be full while others
# wait their turn (measured: sharing one budget between shapes made every call smaller).
HOLD_GROUPS = 2
POLICIES = ("step", "request")


@dataclass
class Entry:
    """One job in a worker's hands, as the scheduler sees it."""

    id: str
    model: str
    group: Hashable  # jobs whose rows can share an engine call
    images: int  # rows it holds in the running set
    cost: int  # network rows per step (images, doubled where guidance runs an unconditional half)
    priority: int = PRIORITIES["normal"]
    arrival: float = 0.0  # created_at: the order within a priority
    deadline: float | None = None  # absolute time; past it the job fails
    offered: bool = False  # already given back once for other workers (it came back reclaimed)
    state: str = "waiting"  # waiting | running | paused

    def order(self) -> tuple:
        return self.priority, self.arrival


@dataclass
class Decision:
    """What to change at this step boundary, and which group runs next. Lists of job ids."""

    admit: list[str] = field(default_factory=list)  # waiting -> running: start their rows
    resume: list[str] = field(default_factory=list)  # paused -> running
    pause: list[str] = field(default_factory=list)  # running -> paused (rows kept)
    expire: list[str] = field(default_factory=list)  # past their deadline: fail them
    release: list[str] = field(default_factory=list)  # waiting ones that can't run here now: back to the queue
    run: Hashable | None = None  # the group whose running rows take the next step


class Scheduler:
    def __init__(self, budgets: dict[str, int], policy: str = "step"):
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {POLICIES}, got {policy!r}")
        self.budgets = budgets  # model -> max running images
        self.policy = policy
        self.entries: dict[str, Entry] = {}
        self.deficit: dict[Hashable, float] = {}
        self.ring: list[Hashable] = []  # groups in the order they are visited
        self.current: Hashable | None = None

    # ------------------------------------------------------------------ bookkeeping

    def add(self, entry: Entry) -> None:
        self.entries[entry.id] = entry

    def remove(self, job_id: str) -> Entry | None:
        return self.entries.pop(job_id, None)

    def running(self, group: Hashable | None = None) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "running" and (group is None or e.group == group)]

    def used(self, model: str, group: Hashable | None = None) -> int:
        """Running images of the model (of one group, if given)."""
        return sum(e.images for e in self.running(group) if e.model == model)

    def free(self, model: str) -> int:
        """Images the model can still admit now (what a worker should claim)."""
        if self.policy == "request" and self.used(model):
            return 0  # the running batch admits nothing until it ends
        hold = self.budgets[model] * (1 if self.policy == "request" else HOLD_GROUPS)
        return max(0, hold - self.used(model) - self.waiting_images(model))

    def waiting_images(self, model: str) -> int:
        return sum(e.images for e in self.entries.values() if e.state == "waiting" and e.model == model)

    def preemptible(self) -> bool:
        """Whether a high-priority job could pause something here (step policy only)."""
        return self.policy == "step" and any(e.priority > PRIORITIES["high"] for e in self.running())

    def idle(self) -> bool:
        return not self.entries

    # ------------------------------------------------------------------ schedule

    def schedule(self, now: float) -> Decision:
        d = Decision()
        for e in list(self.entries.values()):
            if e.deadline is not None and now > e.deadline:
                d.expire.append(e.id)
                del self.entries[e.id]
        for model in {e.model for e in self.entries.values()}:
            self._admit(model, d)
        for job_id in d.release:  # they leave this worker's hands
            del self.entries[job_id]
        d.run = self._pick()
        return d

    def _admit(self, model: str, d: Decision) -> None:
        candidates = sorted((e for e in self.entries.values() if e.model == model and e.state != "running"),
                            key=Entry.order)
        budget = self.budgets[model]
        if self.policy == "request":
            if self.used(model) == 0 and candidates:
                group, room = candidates[0].group, budget
                for e in candidates:  # one group, up to the budget; a job larger than it runs alone
                    if e.group == group and (e.images <= room or room == budget):
                        self._start(e, d)
                        room -= e.images
                        if room <= 0:
                            break
            d.release += [e.id for e in candidates if e.state == "waiting"]
            return
        hold = HOLD_GROUPS * budget
        for e in candidates:  # in order; the first that can't be made to fit ends admission (no overtaking)
            running_groups = {r.group for r in self.running() if r.model == model}
            if e.state == "waiting" and not e.offered and running_groups and e.group not in running_groups:
                continue  # a new shape while busy: offered to idle workers first (released below)
            # Room in its group's calls (the budget), then in what the model holds (HOLD_GROUPS budgets).
            for group, limit in ((e.group, budget), (None, hold)):
                used = self.used(model, group)
                if e.images > limit - used and used > 0:
                    victims = self._victims(model, e, e.images - (limit - used), group)
                    if victims is None:
                        break
                    for v in victims:
                        v.state = "paused"
                        d.pause.append(v.id)
            else:
                self._start(e, d)  # fits now, or is larger than the budget and runs alone
                continue
            break
        d.release += [e.id for e in candidates if e.state == "waiting"]

    def _victims(self, model: str, for_entry: Entry, need: int, group: Hashable | None) -> list[Entry] | None:
        """Running jobs (of `group`, if given) of lower priority than `for_entry` to pause,
        lowest priority and latest arrival first, freeing at least `need` images; None if
        they can't."""
        lower = sorted((e for e in self.running(group) if e.model == model and e.priority > for_entry.priority),
                       key=Entry.order, reverse=True)
        chosen, freed = [], 0
        for e in lower:
            if freed >= need:
                break
            chosen.append(e)
            freed += e.images
        return chosen if freed >= need else None

    def _start(self, e: Entry, d: Decision) -> None:
        (d.resume if e.state == "paused" else d.admit).append(e.id)
        e.state = "running"
        if e.group not in self.deficit:
            self.deficit[e.group] = 0.0
            self.ring.append(e.group)

    # ------------------------------------------------------------------ fairness

    def cost(self, group: Hashable) -> int:
        return sum(e.cost for e in self.running(group))

    def _pick(self) -> Hashable | None:
        """Deficit round robin: the current group runs while its deficit covers a step's
        cost; then the next group with running rows gets its quantum (the largest group
        cost, so every visit affords at least one step)."""
        active = {e.group for e in self.running()}
        self.ring = [g for g in self.ring if g in active]
        for g in list(self.deficit):
            if g not in active:
                del self.deficit[g]  # an emptied group keeps no credit (as DRR)
        if not self.ring:
            self.current = None
            return None
        quantum = max(self.cost(g) for g in self.ring)
        if self.current in active and self.deficit[self.current] >= self.cost(self.current):
            return self.current
        # Rounds until a group affords its step: a step's measured cost can exceed its group's
        # estimate many times over (an upscaler's tiled rows run one network row per window),
        # leaving a deficit that takes several quanta to pay back.
        start = self.ring.index(self.current) + 1 if self.current in self.ring else 0
        for k in itertools.count():
            g = self.ring[(start + k) % len(self.ring)]
            self.deficit[g] += quantum
            if self.deficit[g] >= self.cost(g):
                self.current = g
                return g

    def stepped(self, group: Hashable, cost: float) -> None:
        """Charge a step's measured cost (network rows computed) to its group."""
        if group in self.deficit:
            self.deficit[group] -= cost
