"""OpenAI-compatible Images API: `openai.OpenAI(base_url=".../v1").images.generate / .edit` and
`models.retrieve` work unchanged against this server.

Every job goes through service.submission like /v1/generate's (same validation, admission,
queue); the routes only translate (service.openai_shapes). Errors on these routes take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and bad input is 400 so
that the SDK raises BadRequestError; our own routes keep theirs.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service import openai_shapes as shapes
from service.queue import TERMINAL, ApiQueue, Job
from service.request_body import LIST_FIELDS
from service.schemas import GenerateRequest
from service.submission import RETRY_AFTER_S, Submitter, new_id, wait_for_end
from service.validation import ApiError, model_for

log = logging.getLogger("latentserve.openai")
KEEPALIVE_S = 15.0
NO_RETRY = {"x-should-retry": "false"}  # the SDK would otherwise retry 409 and 5xx: a new job each time
MAX_FORM_FILES = 17  # OpenAI takes up to 16 images and a mask; we say how many we edit instead of failing the parse


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's shape (the app's handlers keep ours elsewhere)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except ApiError as exc:
                error = exc
            except RequestValidationError as exc:
                first = exc.errors()[0]
                name = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or "body"
                error = shapes.bad(name, f"{name}: {first['msg']}")
            except HTTPException as exc:  # the multipart parser's limits
                error = ApiError(exc.status_code, "invalid_request", str(exc.detail))
            except aioredis.RedisError as exc:
                error = ApiError(503, "queue_unavailable", f"queue unavailable: {exc}",
                                 headers={"Retry-After": str(RETRY_AFTER_S)})
            status, body = shapes.error_body(error, getattr(request.state, "openai_params", None))
            return JSONResponse(body, status_code=status, headers=error.headers)

        return handle


def sse(data: dict, event: str | None = None) -> str:
    return f"event: {event or data['type']}\ndata: {json.dumps(data)}\n\n"


def ended(job: Job | None, job_id: str, waited_s: float) -> Job:
    """The finished job, or the ApiError that says why there is no image."""
    if job is None or job.status not in TERMINAL:
        raise ApiError(504, "timeout", f"job {job_id} has not finished after {waited_s:g} s; it goes on: "
                       f"GET /v1/jobs/{job_id}", headers=NO_RETRY)
    if job.status == "cancelled":
        raise ApiError(409, "job_cancelled", f"job {job_id} was cancelled", headers=NO_RETRY)
    if job.status != "succeeded":
        raise ApiError(500, "job_failed", f"job {job_id} failed: {job.error}", headers=NO_RETRY)
    return job


async def read_edit_form(request: Request, max_bytes: int) -> tuple[dict, dict[str, list[bytes]]]:
    """An edit's form: its fields (lists from `name[]` parts, as the SDK sends them), and the
    image and mask files."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise shapes.bad("body", f"send multipart/form-data with image (and mask) files, not {kind or 'nothing'}")
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=64, max_part_size=1024 * 1024)
    fields: dict = {}
    files: dict[str, list[bytes]] = {"image": [], "mask": []}
    for name, value in form.multi_items():
        base = name.removesuffix("[]")
        if isinstance(value, UploadFile):
            if base not in files:
                raise shapes.bad(name, f"{name}: only image and mask are files")
            content = await value.read(max_bytes + 1)
            if len(content) > max_bytes:
                raise shapes.bad(base, f"{base}: over the limit of {max_bytes} bytes")
            files[base].append(content)
        elif name.endswith("[]"):
            fields.setdefault(base, []).append(value)
        elif name in LIST_FIELDS:
            try:
                fields[name] = json.loads(value)
            except json.JSONDecodeError:
                raise shapes.bad(name, f"{name}: expected a JSON list like [0.5, 2]") from None
        else:
            fields[name] = value
    return fields, files


def _schema(extra: dict) -> dict:
    ours = GenerateRequest.model_json_schema()
    props = {
        "prompt": ours["properties"]["prompt"],
        "model": {"type": "string", "description": "A registry id (GET /v1/models); the default if omitted."},
        "n": {"type": "integer", "minimum": 1, "maximum": shapes.MAX_IMAGES, "description": "-> num_images"},
        "size": {"type": "string", "description": "WIDTHxHEIGHT, or auto: the model's default size"},
        "response_format": {"enum": ["b64_json", "url"], "default": "b64_json",
                            "description": "url: /v1/jobs/{id}/images/{k}, kept for the job's TTL"},
        "output_format": {"enum": ["png", "webp", "jpeg"], "default": "png"},
        "stream": {"type": "boolean", "description": "Server-Sent Events; n must be 1"},
        "partial_images": {"type": "integer", "minimum": 0, "maximum": shapes.MAX_PARTIAL_IMAGES,
                           "description": "with stream: previews from evenly spaced denoising steps"},
        **{name: {"description": "accepted and ignored"} for name in shapes.IGNORED},
        **extra,
    }
    return {"type": "object", "required": ["prompt"],
            "properties": {**props, **{k: v for k, v in ours["properties"].items() if k not in props}}}


def openai_router(submitter: Submitter) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI-compatible"])
    registry, settings, uploads = submitter.registry, submitter.settings, submitter.uploads

    def queue(request: Request) -> ApiQueue:
        return request.app.state.queue

    async def run(request: Request, call: shapes.ImagesCall, files: dict[str, bytes], prefix: str):
        request.state.openai_params = call.params
        q, job_id = queue(request), new_id()
        if call.user:
            log.info("images call from user %r: job %s", call.user, job_id)
        async with AsyncExitStack() as stack:
            events = await stack.enter_async_context(q.subscribe(job_id))  # before the job exists
            job = await submitter.submit(q, call.request, files, job_id)
            if call.stream:
                return StreamingResponse(stream(q, stack.pop_all(), events, job, call, prefix),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  "X-Job-Id": job_id})  # to follow or cancel it
            finished = ended(await wait_for_end(q, events, job_id, settings.wait_timeout_s), job_id,
                             settings.wait_timeout_s)

        def url_of(k: int) -> str:
            return str(request.url_for("job_image", job_id=job_id, k=str(k)))

        images = await q.images(job_id)
        return JSONResponse(shapes.images_response(finished, images, call.response_format, url_of))

    async def stream(q: ApiQueue, stack: AsyncExitStack, events, job: Job, call: shapes.ImagesCall, prefix: str):
        """Partial images from the worker's previews at evenly spaced steps, then the image."""
        async with stack:
            deadline = time.monotonic() + settings.wait_timeout_s
            targets: list[int] | None = None
            sent = 0
            while (left := deadline - time.monotonic()) > 0:
                event = await events.next_event(min(left, KEEPALIVE_S))
                if event is None:  # quiet: the record says whether it ended while an event was lost
                    current = await q.get(job.id)
                    if current is None or current.status in TERMINAL:
                        break
                    yield ": keepalive\n\n"
                elif event["type"] == "done" or event.get("status") in TERMINAL:
                    break
                elif event["type"] == "progress" and event.get("preview") and sent < call.partial_images:
                    targets = targets or shapes.partial_steps(event["total"], call.partial_images)
                    if sent < len(targets) and event["step"] >= targets[sent]:
                        r = shapes.delivered(job)  # an upscale's partials at its final size
                        b64 = await run_in_threadpool(shapes.preview_image, event["preview"], r["width"],
                                                      r["height"], r["output_format"])
                        yield sse(shapes.partial_event(prefix, job, sent, b64))
                        sent += 1
            try:
                finished = ended(await q.get(job.id), job.id, settings.wait_timeout_s)
            except ApiError as exc:  # the SDK raises APIError for an event whose data has "error"
                yield sse(shapes.error_body(exc)[1], event="error")
                return
            images = await q.images(job.id)
            yield sse(shapes.completed_event(prefix, finished, images[0]))

    @router.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": _schema({})}}}})
    async def images_generations(request: Request):
        """OpenAI's `images.generate`: a txt2img job, answered when it has finished (or streamed).

        Mapping: prompt, model (a registry id; default if omitted), n -> num_images (1-8),
        size WIDTHxHEIGHT -> width/height ('auto': the model's default), output_format (png, webp,
        jpeg), response_format (b64_json, default; or url: an absolute URL of
        /v1/jobs/{id}/images/{k}, kept for the job's TTL). Our own options (seed, steps, sampler,
        schedule, guidance_scale, guidance, negative_prompt, priority, timeout_s...) ride in the
        same body (the SDK's extra_body); image k uses seed + k. extra_body={"upscale": true} on a
        model with an upscaler (GET /v1/models) answers its x4-upscaled images: `size` asks for
        the first stage's, the answer's `size` is the final one.

        Accepted and ignored: background, moderation, output_compression, quality, style,
        complexity, user and safety_identifier (logged). Refused: output_format gif/svg,
        frame_count, frame_duration_ms, svg.

        stream: true (n must be 1) answers Server-Sent Events (the job's id in X-Job-Id):
        partial_images (0-3) `image_generation.partial_image` events, each the worker's preview
        (preview: true; models with a latent -> RGB map) at an evenly spaced denoising step,
        resized to the job's size, then `image_generation.completed` (usage: all zeros, nothing
        is metered in tokens). Errors: OpenAI's shape; bad input 400, unknown
        model 404, 429 with Retry-After; a job that fails 500, one still running after the wait
        timeout 504 (both with x-should-retry: false: the job exists, see GET /v1/jobs/{id}).
        """
        try:
            fields = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise shapes.bad("body", "body: not valid JSON") from None
        if not isinstance(fields, dict):
            raise shapes.bad("body", "body: expected a JSON object")
        return await run(request, shapes.parse_call(fields, task="txt2img"), {}, "image_generation")

    @router.post("/v1/images/edits", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _schema({
            "image": {"type": "string", "format": "binary", "description": "one image (image or image[])"},
            "mask": {"type": "string", "format": "binary",
                     "description": "alpha 0 = repaint (OpenAI's convention); needs an alpha channel"},
        })}}}})
    async def images_edits(request: Request):
        """OpenAI's `images.edit` (multipart/form-data): with a mask an inpaint job, without one an
        img2img job over the whole image (strength: our field, default 0.8).

        image: one file (as `image` or a one-item `image[]`). mask: OpenAI's convention, fully
        transparent pixels (alpha 0) mark the area to repaint (any other alpha is kept);
        a mask without an alpha channel is a 400. The image's own size is the job's unless size
        is given; either way it is fitted to the nearest size the model serves (our
        `resize: fit`; send resize=none to refuse other sizes instead). The other fields, the
        answer, streaming (`image_edit.*` events) and errors are those of /v1/images/generations.
        A model that does not serve the task (inpaint with a mask, img2img without) is a 400.
        """
        fields, files = await read_edit_form(request, uploads.max_bytes)
        images, masks = files["image"], files["mask"]
        if len(images) != 1:
            raise shapes.bad("image", f"image: this server edits one image per call, got {len(images)}")
        if len(masks) > 1:
            raise shapes.bad("mask", f"mask: one mask per call, got {len(masks)}")
        task = "inpaint" if masks else "img2img"
        call = shapes.parse_call(fields, task=task, resize="fit")
        try:
            model_for(call.request, registry)  # our 404 for an unknown model
        except ApiError as exc:
            if exc.field != "task":
                raise
            what = "inpainting (an edit with a mask)" if masks else "image-to-image (an edit without a mask)"
            spec = registry.get(call.request.model)
            raise shapes.bad("mask" if masks else "image",
                             f"model {spec.id} does not serve {what}; it serves {', '.join(spec.tasks)}") from None
        inputs = {"image": images[0]}
        if masks:
            inputs["mask"] = await run_in_threadpool(shapes.our_mask, masks[0], uploads)
        return await run(request, call, inputs, "image_edit")

    @router.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str):
        """OpenAI's `models.retrieve`: its Model fields, plus our family, tasks and description."""
        spec = registry.models.get(model_id)
        if spec is None:
            raise ApiError(404, "model_not_found", f"unknown model {model_id!r}; see GET /v1/models", "model")
        return {**shapes.model_object(spec), "family": spec.family, "tasks": list(spec.tasks),
                "description": spec.description, "default": spec.id == registry.default}

    return router
