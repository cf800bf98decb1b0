"""The engine cache: built artefacts (ONNX graphs, TensorRT plans, timing measurements) stored
under a key made of everything that changes them, so nothing is rebuilt that need not be.

A key has: the component's weights hash (its diffusers subfolder: config and safetensors),
the component, the artefact kind, the precision, the shape profile, the versions of the
libraries that build it, and the device it was built for ("any" where it does not matter, as
for ONNX graphs; CPU features or the GPU's SM for measurements and TensorRT plans). Change one
part and only the artefacts whose keys contain it are rebuilt.

Layout: <root>/<model>/<component>/<kind>-<precision>-<digest>/ holding the artefact files
and key.json. Entries are built in a temporary directory and renamed into place under a file
lock, so workers sharing a cache on one host build each entry once and never see half of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentserve" / "engines"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class EngineKey:
    model: str  # for the directory name only: the weights hash identifies the model
    component: str
    kind: str  # "onnx" | "tensorrt" | "timing-<engine>"
    precision: str
    weights: str
    profile: str  # canonical JSON of the shapes the artefact covers
    versions: str  # canonical JSON of {library: version}
    device: str

    def digest(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "model"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    def dirname(self) -> str:
        return f"{self.kind}-{self.precision}-{self.digest()}"


@dataclass(frozen=True)
class CacheResult:
    key: EngineKey
    path: Path
    hit: bool
    build_s: float  # 0 on a hit
    info: dict  # what the builder reported (kept in key.json)


@dataclass(frozen=True)
class CacheEvent:
    """One lookup, as plain data for logs and metrics."""

    model: str
    component: str
    kind: str
    precision: str
    hit: bool
    build_s: float


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def library_versions(*names: str) -> str:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return canonical(versions)


def cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); {} elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the end of the first processor's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags_present() -> list[str]:
    """Which of CPU_FLAGS (the extensions that change kernel choice) this CPU has."""
    flags = set(cpu_fields().get("flags", "").split())
    return [f for f in CPU_FLAGS if f in flags]


def device_fingerprint(device: str = "cpu") -> str:
    """What a built artefact or a measurement depends on in the hardware."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda-sm{major}{minor}-{torch.cuda.get_device_name(index).replace(' ', '_')}"
    present = cpu_flags_present()
    model_name = cpu_fields().get("model name", "")
    return f"cpu-{platform.machine()}-{'+'.join(present) or 'base'}-{os.cpu_count()}cores-{model_name.replace(' ', '_')}"


class EngineCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else DEFAULT_ROOT
        self.root.mkdir(parents=True, exist_ok=True)

    def entry(self, key: EngineKey) -> Path:
        return self.root / key.model / key.component / key.dirname()

    def lookup(self, key: EngineKey) -> Path | None:
        path = self.entry(key)
        return path if (path / "key.json").is_file() else None

    def get_or_build(self, key: EngineKey, build: Callable[[Path], dict | None]) -> CacheResult:
        """The entry for `key`; on a miss, `build(tmp_dir)` writes the artefact files into
        tmp_dir (and may return info to record), then the directory is renamed into place."""
        path = self.entry(key)
        if self.lookup(key):
            return CacheResult(key, path, True, 0.0, self._info(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{key.dirname()}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same entry
            if self.lookup(key):
                return CacheResult(key, path, True, 0.0, self._info(path))
            tmp = path.parent / f".{key.dirname()}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            started = time.perf_counter()
            try:
                info = build(tmp) or {}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            seconds = time.perf_counter() - started
            record = {"key": asdict(key), "digest": key.digest(), "build_s": round(seconds, 3),
                      "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info}
            (tmp / "key.json").write_text(json.dumps(record, indent=2))
            os.rename(tmp, path)
        return CacheResult(key, path, False, seconds, info)

    @staticmethod
    def _info(path: Path) -> dict:
        return json.loads((path / "key.json").read_text()).get("info", {})

    def weights_hash(self, directory: Path) -> str:
        return weights_hash(directory, self.root / "weights-hashes.json")


def weights_hash(directory: Path, memo_path: Path | None = None) -> str:
    """sha256 over a weights directory's files (names and bytes). With a memo file it is
    memoised by path, size and mtime, so a multi-GB checkpoint is read once per change, not
    once per start."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    stamp = canonical([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo_key = hashlib.sha256(stamp.encode()).hexdigest()
    memo = {}
    if memo_path is not None:
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
        if memo_key in memo:
            return memo[memo_key]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(directory)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    if memo_path is not None:
        memo[memo_key] = digest
        tmp = memo_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return digest
