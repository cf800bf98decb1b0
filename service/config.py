"""Settings from environment variables prefixed LATENTSERVE_ (REDIS_URL and PORT accepted too)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 8000
    registry: str = str(ROOT / "models" / "registry.json")
    # Which models a worker serves (comma-separated ids; empty: the registry default).
    worker_models: str = ""
    worker_metrics_port: int = 9101  # 0: pick a free port
    worker_id: str = ""  # empty: host-pid
    max_batch: int = 0  # images per engine call; 0: each model's registry value
    # step: rows join and leave a running batch at every denoising step (service.scheduler);
    # request: the whole-request baseline (a batch runs start to end; for comparisons).
    scheduler: str = "step"
    # Whole-request policy only: after its first job, how long a worker waits for more to fill
    # the batch. Step-level admission needs none (a later job joins at the next step).
    fill_window_s: float = 0.02
    # Decode, encode and store finished jobs on a thread while the next step runs: on | off |
    # auto (on for CUDA workers; off on CPUs, where the thread's torch work competes with the
    # denoiser's for the same cores: measured 2x slower on 2 cores, loadtests/reports).
    decode_overlap: str = "auto"

    def overlap_decoding(self) -> bool:
        value = self.decode_overlap.lower()
        if value in ("auto", ""):
            return self.device.startswith("cuda")
        return value in ("1", "on", "true", "yes")
    visibility_timeout_s: float = 60.0  # a claimed job idle this long is reclaimed
    max_attempts: int = 3  # deliveries before a job is dead-lettered as failed
    job_ttl_s: int = 86400  # job records and results expire after this
    wait_timeout_s: float = 60.0  # ?wait=true gives up (202) after this
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 10.0  # a worker silent this long is not live
    torch_threads: int = 0  # 0: torch's default
    device: str = "cpu"
    # Engine and precision for every model this worker serves (empty: each model's registry
    # value). engine: torch | onnxruntime | tensorrt | auto; precision: fp32 | bf16 | fp16.
    engine: str = ""
    precision: str = ""
    engine_cache: str = ""  # engine cache directory (empty: ~/.cache/latentserve/engines)
    cuda_graphs: int = 1  # torch on CUDA: replay CUDA graphs per batch bucket (0: eager)
    log_level: str = "info"
    upload_max_bytes: int = 10 * 1024 * 1024  # per uploaded image or mask (img2img, inpaint)
    upload_max_pixels: int = 4096 * 4096

    @property
    def model_ids(self) -> list[str]:
        return [m.strip() for m in self.worker_models.split(",") if m.strip()]


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    values = {}
    for f in fields(Settings):
        raw = env.get(f"LATENTSERVE_{f.name.upper()}")
        if raw is None and f.name in ("redis_url", "port"):
            raw = env.get(f.name.upper())
        if raw is not None:
            values[f.name] = type(f.default)(raw)
    return Settings(**values)
