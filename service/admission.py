"""Admission control: refuse (429 with Retry-After) a job that cannot finish in time.

The limit is the request's `timeout_s` or the model's `limits.max_wait_s`, whichever is
shorter; the prediction (service.cost.predict) is a lower bound from the live workers'
measured step costs and the jobs queued ahead. Until a worker has measured anything, every
job is admitted. Torch-free: it runs in the API process.
"""

from __future__ import annotations

from engines.registry import ModelSpec
from engines.sampler_catalog import CATALOG
from service.cost import Cost, network_rows, predict, retry_after_s
from service.queue import ApiQueue
from service.validation import ApiError


def job_work(spec: ModelSpec, request: dict) -> tuple[float, int]:
    """(units per denoiser call, calls) of a validated request, in service.cost's units."""
    d = spec.defaults
    # A video's frames each weigh an image (service.active: Entry counts them so).
    area = request["width"] * request["height"] / (d.width * d.height) * request.get("num_frames", 1)
    rows = network_rows(request.get("num_images", 1), request.get("guidance", "cfg"), request["guidance_scale"])
    steps = int(request["steps"] * request.get("strength", 1.0))  # img2img runs the schedule's tail
    passes = request.get("free_init_iterations", 1)  # txt2video's FreeInit runs the schedule this often
    return rows * area, CATALOG[request["sampler"]].calls(max(1, steps)) * passes


async def admit(q: ApiQueue, spec: ModelSpec, request: dict, heartbeat_ttl_s: float) -> None:
    limits = [(name, float(v)) for name, v in (("timeout_s", request.get("timeout_s")),
                                                ("max_wait_s", spec.limits.max_wait_s)) if v]
    if not limits:
        return
    costs = [Cost.from_json(c) for c in await q.live_costs(spec.id, heartbeat_ttl_s)]
    depth = await q.depth(spec.id)
    units, calls = job_work(spec, request)
    prediction = predict(costs, depth, units, calls)
    name, limit = min(limits, key=lambda item: item[1])
    if prediction is None or prediction.finish_s <= limit:
        return
    whose = "the request's" if name == "timeout_s" else f"model {spec.id}'s"
    raise ApiError(
        429, "deadline_unreachable",
        f"predicted finish in {prediction.finish_s:.1f}s at best ({depth} unfinished jobs ahead: "
        f"{prediction.drain_s:.1f}s; its own {calls} denoiser calls: {prediction.own_s:.1f}s) exceeds "
        f"{whose} {name}={limit:g}; retry later",
        name if name == "timeout_s" else None, headers={"Retry-After": str(retry_after_s(prediction, limit))})
