"""The job record and its codec, and the plain data the queue hands out. JSON on the wire, never pickle."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Job:
    id: str
    model: str
    task: str
    request: dict[str, Any]  # validated, defaults filled: prompt, width, seed, ...
    status: str = "queued"
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    progress_step: int = 0
    progress_total: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    worker: str | None = None
    batch_size: int | None = None
    denoiser_calls: int | None = None  # network evaluations per image
    timings: dict[str, float] | None = None
    stream_id: str | None = None
    last_error: str | None = None  # the error of a failed attempt that will be retried
    # An image task's uploads (name -> normalised PNG): stored under their own key, not in the record.
    inputs: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return int(self.request.get("num_images", 1))


_JSON_FIELDS = {"request", "warnings", "timings"}
_FLOAT_FIELDS = {"created_at", "started_at", "finished_at"}
_INT_FIELDS = {"attempts", "progress_step", "progress_total", "batch_size", "denoiser_calls"}


def encode_job(job: Job) -> dict[str, str]:
    out = {}
    for name, value in asdict(job).items():
        if value is None or name == "inputs":
            continue
        out[name] = json.dumps(value) if name in _JSON_FIELDS else str(value)
    return out


_REQUIRED = ("id", "model", "task", "request")


def decode_job(raw: dict) -> Job | None:
    """The job, or None for a record that is empty or lacks an identity field."""
    if not raw:
        return None
    data: dict[str, Any] = {}
    names = Job.__dataclass_fields__
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        if key not in names:
            continue  # e.g. cancel_requested: protocol-internal
        if key in _JSON_FIELDS:
            data[key] = json.loads(value)
        elif key in _FLOAT_FIELDS:
            data[key] = float(value)
        elif key in _INT_FIELDS:
            data[key] = int(value)
        else:
            data[key] = value
    if any(name not in data for name in _REQUIRED):
        return None
    return Job(**data)


@dataclass(frozen=True)
class StoredImage:
    """One output file: an image, or a whole video (its frames and fps set)."""

    data: bytes
    mime: str
    seed: int
    width: int
    height: int
    frames: int | None = None
    fps: int | None = None

    def meta(self) -> dict:
        """What the result's `meta` JSON keeps of it (all but the bytes; a video's frames and fps)."""
        return {k: v for k, v in asdict(self).items() if k != "data" and v is not None}


def make_event(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


def decode_images(raw: dict) -> list[StoredImage]:
    raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "meta" not in raw:
        return []
    meta = json.loads(raw["meta"])
    return [StoredImage(data=raw[f"image:{k}"], **m) for k, m in enumerate(meta)]


@dataclass(frozen=True)
class Claimed:
    """A stream entry this worker holds: the job id, and how many images it asks for."""

    model: str
    stream_id: str
    job_id: str
    images: int
    reclaimed: bool = False  # taken over by XAUTOCLAIM (released, or a dead worker's): it has waited
    urgent: bool = False  # from the high-priority lane

    @property
    def stream(self) -> str:
        from service.queue.keys import Keys

        return Keys.stream(self.model, self.urgent)


@dataclass(frozen=True)
class Advance:
    """A finished stage's job moving on to its next stage (service.chain): the model, task and
    request it runs next, and the inputs (the stage's images) that stage reads."""

    model: str
    task: str
    request: dict[str, Any]
    inputs: dict[str, bytes]
    urgent: bool = False


@dataclass
class Outcome:
    """How a job ended, as the finish script stores it, or (`advance`) how it moves on."""

    job: Job
    claimed: Claimed
    status: str  # succeeded | failed | cancelled
    error: str | None = None
    images: list[StoredImage] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # record fields: timings, batch_size, progress
    advance: Advance | None = None


def flatten(mapping: dict) -> list:
    return [item for pair in mapping.items() for item in pair]
