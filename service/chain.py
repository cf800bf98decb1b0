"""Two-stage jobs: txt2img, then the model's x4 upscaler (`upscale: true`), under one job id.

The API plans the second stage when it validates the request (`plan_upscale`: the upscaler's
own request, resolved against its registry entry like any superres job, kept in the first
stage's request as `then`). When the first stage finishes, its worker does not store a result:
`advance` names what the queue's ADVANCE script does in one atomic step (the stage-1 images
stored as the job's inputs, the record switched to the upscaler's model, task and request,
the job added to the upscaler's stream, the stage-1 entry acked). A crash before that step
reruns stage 1 (same seeds, same images); after it, the job is an ordinary superres job.
Progress counts both stages' steps.
"""

from __future__ import annotations

from service.image_inputs import superres_fields
from service.queue import Advance, Job, StoredImage
from service.schemas import GenerateRequest
from service.validation import Resolved, invalid, resolve

UPSCALE = 4


def plan_upscale(body: GenerateRequest, resolved: Resolved, registry) -> None:
    """Check `upscale: true` and add the second stage's request to the first's (`then`)."""
    spec = resolved.spec
    if body.task != "txt2img":
        raise invalid("upscale", f"upscale follows txt2img; task {body.task} does not take it")
    if spec.upscaler is None:
        raise invalid("upscale", f"model {spec.id} has no upscaler to chain (see GET /v1/models: `upscaler`)")
    r = resolved.request
    second = GenerateRequest(
        model=spec.upscaler, task="superres", prompt=body.prompt, negative_prompt=body.negative_prompt,
        width=r["width"] * UPSCALE, height=r["height"] * UPSCALE, num_images=body.num_images, seed=r["seed"],
        output_format=body.output_format, priority=body.priority, timeout_s=body.timeout_s,
        preview=body.preview, noise_level=body.noise_level)
    try:
        stage2 = resolve(second, registry)
    except Exception as exc:  # the upscaler's limits, said about this request's fields
        message = getattr(exc, "message", str(exc))
        raise invalid("upscale", f"the {spec.upscaler} stage refuses it: {message}") from None
    request = stage2.request
    request.update(superres_fields(body))
    request["inputs"] = [f"image:{k}" for k in range(body.num_images)]
    request["stage_offset"] = r["steps"]  # progress counts on from stage 1's steps
    request["first_stage"] = {"model": spec.id, "task": body.task}
    r["then"] = {"model": spec.upscaler, "task": "superres", "steps": request["steps"], "request": request}


def advance(job: Job, images: list[StoredImage]) -> Advance | None:
    """What a finished first stage turns into, or None if the job has no next stage."""
    then = job.request.get("then")
    if then is None:
        return None
    return Advance(model=then["model"], task=then["task"], request=then["request"],
                   inputs={f"image:{k}": image.data for k, image in enumerate(images)},
                   urgent=job.request.get("priority") == "high")


def progress(job: Job, step: int, total: int) -> tuple[int, int]:
    """(step, total) over both stages of a chained job (the job's own otherwise)."""
    offset = int(job.request.get("stage_offset", 0))
    after = int(job.request.get("then", {}).get("steps", 0))
    return offset + step, offset + total + after


def stage_of(job: Job) -> dict | None:
    """A chained job's stages and which one it is in (for the job object), else None."""
    r = job.request
    if "then" in r:
        first, second, index = {"model": job.model, "task": job.task}, r["then"], 1
    elif "first_stage" in r:
        first, second, index = r["first_stage"], {"model": job.model, "task": job.task}, 2
    else:
        return None
    return {"index": index, "count": 2, "stages": [{"model": first["model"], "task": first["task"]},
                                                   {"model": second["model"], "task": second["task"]}]}
