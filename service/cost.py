"""What a step costs, measured by workers, and the finish time the API predicts from it.

Work is counted in *units*: network rows of one denoiser call, scaled by latent area to the
model's default size (a 128x128 row is four 64x64 rows) and by frames (a video row of F frames
is F image rows: each of its layers, spatial or temporal, runs once per frame). A worker fits
its calls' seconds as `call_s + unit_s * units` (fixed cost per call, marginal cost per unit:
least squares over its recent calls) and tracks the units of a finished job; it publishes that
beside its heartbeat. The API predicts a new job's finish time as the work queued ahead of it
drained at the live workers' full-batch capacity, plus the job's own calls in sequence. Both
parts are optimistic (no idle gaps, no shape mixing), so a job refused on the prediction could
not have finished in time: admission control turns "waits in vain" into a 429 with Retry-After.
Pure: no Redis, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass


def network_rows(num_images: int, guidance: str, guidance_scale: float) -> int:
    """Network rows one step of a job computes: guidance's unconditional half included."""
    guided = guidance != "none" and guidance_scale != 1
    return num_images * (2 if guided else 1)


def row_units(defaults, params) -> float:
    """One row's units: its area relative to the model's default size (`defaults`: the
    registry's), times its frames (`params.images_per_row`: a video row's F)."""
    return params.width * params.height / (defaults.width * defaults.height) * params.images_per_row


@dataclass(frozen=True)
class Cost:
    """One worker's measurements for one model (published as JSON)."""

    call_s: float  # fixed seconds per denoiser call
    unit_s: float  # marginal seconds per unit
    budget: int  # units of a full call (the model's row budget at the default size)
    job_units: float  # mean units of a finished job (all its calls)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Cost":
        return cls(float(data["call_s"]), float(data["unit_s"]), int(data["budget"]), float(data["job_units"]))


class CostMeter:
    """A worker's running fit for one model, over its last `window` calls and jobs."""

    def __init__(self, budget: int, window: int = 200):
        self.budget = budget
        self.calls: deque[tuple[float, float]] = deque(maxlen=window)  # (units, seconds)
        self.jobs: deque[float] = deque(maxlen=window)

    def call(self, units: float, seconds: float) -> None:
        self.calls.append((units, seconds))

    def job(self, units: float) -> None:
        self.jobs.append(units)

    def cost(self) -> Cost | None:
        if not self.calls or not self.jobs:
            return None
        n = len(self.calls)
        mu = sum(u for u, _ in self.calls) / n
        mt = sum(t for _, t in self.calls) / n
        var = sum((u - mu) ** 2 for u, _ in self.calls)
        if var > 1e-9:
            slope = sum((u - mu) * (t - mt) for u, t in self.calls) / var
            unit_s = max(slope, 0.0)
            call_s = max(mt - unit_s * mu, 0.0)
        else:  # every call the same size: all of it counts as marginal (the pessimistic split)
            unit_s, call_s = mt / max(mu, 1e-9), 0.0
        return Cost(call_s, unit_s, self.budget, sum(self.jobs) / len(self.jobs))


@dataclass(frozen=True)
class Prediction:
    finish_s: float  # from now until the job is done, at best
    drain_s: float  # the queued work ahead of it, at the workers' full-batch capacity
    own_s: float  # its own calls, one after another


def predict(costs: list[Cost], depth: int, job_units_per_call: float, job_calls: int) -> Prediction | None:
    """The earliest a new job can finish behind `depth` unfinished jobs; None until measured."""
    if not costs:
        return None
    capacity = sum(c.budget / (c.call_s + c.unit_s * c.budget) for c in costs)  # units per second
    queued = depth * sum(c.job_units for c in costs) / len(costs)
    best = min(costs, key=lambda c: c.call_s + c.unit_s * job_units_per_call)
    own_s = job_calls * (best.call_s + best.unit_s * job_units_per_call)
    drain_s = queued / capacity
    return Prediction(drain_s + own_s, drain_s, own_s)


def retry_after_s(prediction: Prediction, limit_s: float) -> int:
    """Seconds until the work ahead has drained enough for the job to fit in `limit_s`."""
    return max(1, math.ceil(prediction.finish_s - limit_s))
