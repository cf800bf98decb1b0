"""Build a TensorRT plan from an ONNX graph: one optimisation profile per shape bucket, and a
timing cache shared by every build on the same device and TensorRT version.

Written from the TensorRT Python API documentation (10.x and the 11.x migration guide). It
has NOT yet run on a TensorRT host: no machine of ours has TensorRT (README). TensorRT 11
builds strongly typed networks only (the FP16 / BF16 builder flags are gone), so precision
comes from the graph: export/onnx_export.py traces fp16 and bf16 graphs for it.
"""

from __future__ import annotations

import time
from pathlib import Path

from engines.profiles import Profile

WORKSPACE_BYTES = 8 << 30


def build(onnx_path: Path, profiles: list[Profile], plan_path: Path, timing_cache: Path | None = None) -> dict:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Required for typed graphs on 10.x; accepted (and implied) on 11.x.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(timing_cache)
    return {"file": plan_path.name, "profiles": len(profiles), "tensorrt": trt.__version__,
            "build_s": round(time.perf_counter() - started, 3)}
