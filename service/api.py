"""The HTTP API. Routes are thin: validate, hand off to the queue, map the answer.

    python -m service.api               # serves on LATENTSERVE_HOST:LATENTSERVE_PORT
"""

from __future__ import annotations

import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from engines.registry import KNOWN_TASKS, load_registry
from engines.sampler_catalog import CATALOG
from service import chain, request_body
from service.config import Settings, load_settings
from service.metrics import ApiExporter
from service.openai_api import openai_router
from service.openai_shapes import model_object
from service.queue import TERMINAL, ApiQueue, Job, StoredImage
from service.schemas import ErrorOut, JobOut
from service.submission import RETRY_AFTER_S, Submitter, new_id, wait_for_end
from service.uploads import UploadLimits
from service.validation import ApiError

log = logging.getLogger("latentserve.api")
SSE_KEEPALIVE_S = 15.0
QUEUE_POLL_S = 1.0  # how often an event stream re-reads its queued job's position
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
STATIC = Path(__file__).resolve().parent / "static"  # the playground: plain files, no build step


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def job_body(job: Job, images: list[StoredImage] | None = None, queue_position: int | None = None) -> dict:
    body = {
        "id": job.id,
        "status": job.status,
        "model": job.model,
        "task": job.task,
        "progress": {"step": job.progress_step, "total": job.progress_total or job.request.get("steps", 0)},
        "sampler": job.request.get("sampler"),
        "schedule": job.request.get("schedule", "default"),
        "steps": job.request.get("steps"),
        "error": job.error,
        "warnings": job.warnings,
        "created_at": job.created_at,
    }
    if job.status == "succeeded":
        body["images"] = [  # a video's entry is its whole file, with its frames and fps
            {"data": base64.b64encode(i.data).decode(), **i.meta()} for i in images or []
        ]
    if (stage := chain.stage_of(job)) is not None:
        body["stage"] = stage
    if job.timings:
        body["timings"] = job.timings
    if job.batch_size:
        body["batch"] = {"size": job.batch_size}
    if job.denoiser_calls:
        body["denoiser_calls"] = job.denoiser_calls
    if queue_position is not None:
        body["queue_position"] = queue_position
    return body


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    registry = load_registry(settings.registry)
    metrics_registry = CollectorRegistry()
    metrics = ApiExporter(metrics_registry)
    uploads = UploadLimits(settings.upload_max_bytes, settings.upload_max_pixels)
    submitter = Submitter(registry, settings, uploads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = aioredis.Redis.from_url(settings.redis_url, health_check_interval=30)
        app.state.queue = ApiQueue(client, settings.job_ttl_s)
        try:
            for model_id in registry.models:
                await app.state.queue.ensure_group(model_id)
        except aioredis.RedisError as exc:  # serve anyway: /readyz reports it
            log.warning("redis not reachable at start: %s", exc)
        await app.state.queue.events.start()
        yield
        await app.state.queue.events.stop()
        await client.aclose()

    app = FastAPI(title="latentserve", version="0.1.0", lifespan=lifespan,
                  description="Latent diffusion inference over a Redis Streams queue.")

    def queue(request: Request) -> ApiQueue:
        return request.app.state.queue

    # ------------------------------------------------------------------ errors and metrics

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        names = [str(part) for part in first["loc"] if part not in ("body", "query", "path")]
        field = ".".join(names) or "body"
        return error_response(422, "invalid_request", f"{field}: {first['msg']}", field)

    @app.exception_handler(aioredis.RedisError)
    async def redis_error(_request: Request, exc: aioredis.RedisError):
        return error_response(503, "queue_unavailable", f"queue unavailable: {exc}",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        # FastAPI marks no route for a mount: the playground's files count under its prefix.
        static = request.url.path.startswith("/static/")
        path = getattr(route, "path", "/static" if static else "unmatched")
        # Labels only ever take values from closed sets: a client's free text (a made-up
        # model name, an invented HTTP method) must not mint new series.
        method = request.method if request.method in HTTP_METHODS else "other"
        metrics.http.labels(method, path, str(response.status_code)).inc()
        if path == "/v1/generate":
            model, task = getattr(request.state, "generate_labels", ("unknown", "unknown"))
            metrics.generate.labels(model, task, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------------ jobs

    responses = {c: {"model": ErrorOut} for c in (404, 422, 429, 503)}

    @app.post("/v1/generate", status_code=202, responses={200: {"model": JobOut}, **responses},
              openapi_extra=request_body.OPENAPI)
    async def generate(request: Request, wait: bool = False):
        """Queue a generation job (JSON, or multipart/form-data with image and mask files).
        202 with its id, or with ?wait=true the finished job (200)."""
        body, files = await request_body.read_generate(request, uploads.max_bytes)
        model_label = body.model or registry.default
        request.state.generate_labels = (model_label if model_label in registry.models else "unknown",
                                         body.task if body.task in KNOWN_TASKS else "unknown")
        q = queue(request)
        if not wait:
            return accepted(await submitter.submit(q, body, files))
        job_id = new_id()
        async with q.subscribe(job_id) as events:  # subscribed before the job exists
            job = await submitter.submit(q, body, files, job_id)
            finished = await wait_for_end(q, events, job_id, settings.wait_timeout_s)
        if finished is None:
            return accepted(job)
        return JSONResponse(job_body(finished, await q.images(job_id)), status_code=200)

    def accepted(job: Job) -> JSONResponse:
        body = {"id": job.id, "status": "queued", "warnings": job.warnings}
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    async def get_job_or_404(q: ApiQueue, job_id: str) -> Job:
        job = await q.get(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown or expired)", "id")
        return job

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=responses)
    async def get_job(job_id: str, request: Request):
        q = queue(request)
        job = await get_job_or_404(q, job_id)
        images = await q.images(job_id) if job.status == "succeeded" else None
        return JSONResponse(job_body(job, images, await q.queue_position(job)))

    @app.get("/v1/jobs/{job_id}/events", responses=responses)
    async def job_events(job_id: str, request: Request):
        """Server-Sent Events: `status` (with `queue_position` while queued), `queue`
        ({position}) whenever a queued job moves up, `progress` while it runs, then `done`."""
        q = queue(request)
        await get_job_or_404(q, job_id)

        async def stream():
            async with q.subscribe(job_id) as events:  # subscribed before reading: no gap
                job = await q.get(job_id)
                if job is not None and job.status not in TERMINAL:
                    status, position = job.status, await q.queue_position(job)
                    first = {"status": job.status, "step": job.progress_step, "total": job.progress_total}
                    yield sse("status", first if position is None else {**first, "queue_position": position})
                    written = time.monotonic()
                    while True:  # a queued job's position is polled: nothing publishes its moves
                        event = await events.next_event(QUEUE_POLL_S if status == "queued" else SSE_KEEPALIVE_S)
                        if event is None:
                            job = await q.get(job_id)
                            if job is None or job.status in TERMINAL:
                                break
                            status, moved = job.status, await q.queue_position(job)
                            if moved is not None and moved != position:
                                position = moved
                                yield sse("queue", {"position": position})
                            elif time.monotonic() - written >= SSE_KEEPALIVE_S:
                                yield ": keepalive\n\n"
                            else:
                                continue
                        elif event["type"] == "done":
                            break
                        else:
                            status = event["status"] if event["type"] == "status" else status
                            position = None if status != "queued" else position
                            yield sse(event.pop("type"), event)
                            if status in TERMINAL:  # cancelled while queued: no `done` is published
                                break
                        written = time.monotonic()
                    job = await q.get(job_id)
                if job is not None:
                    images = await q.images(job_id) if job.status == "succeeded" else None
                    yield sse("done", job_body(job, images))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/images/{k}", responses=responses)
    async def job_image(job_id: str, k: int, request: Request):
        q = queue(request)
        job = await get_job_or_404(q, job_id)
        if job.status != "succeeded":
            raise ApiError(404, "image_not_found", f"job {job_id} has no images (status {job.status})", "id")
        image = await q.image(job_id, k) if 0 <= k < job.num_images else None
        if image is None:
            raise ApiError(404, "image_not_found", f"job {job_id} has images 0..{job.num_images - 1}", "k")
        return Response(image.data, media_type=image.mime)

    @app.delete("/v1/jobs/{job_id}", responses={409: {"model": ErrorOut}, **responses})
    async def cancel_job(job_id: str, request: Request):
        """Cancel: a queued job never runs; a running one stops at its next denoising step."""
        q = queue(request)
        outcome = await q.cancel(job_id)
        if outcome is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown or expired)", "id")
        if outcome in ("succeeded", "failed"):
            raise ApiError(409, "job_finished", f"job {job_id} already {outcome}", "id")
        status = "cancelled" if outcome == "cancelled" else "running"
        return JSONResponse({"id": job_id, "status": status, "cancel_requested": True},
                            status_code=200 if status == "cancelled" else 202)

    # ------------------------------------------------------------------ models, health, metrics

    @app.get("/v1/models")
    async def models(request: Request):
        out = []
        for spec in registry.models.values():
            workers = await queue(request).live_workers(spec.id, settings.heartbeat_ttl_s)
            active = await queue(request).live_engines(spec.id, settings.heartbeat_ttl_s)
            out.append({
                "id": spec.id, "family": spec.family, "description": spec.description,
                "default": spec.id == registry.default, "tasks": list(spec.tasks),
                "samplers": {name: {"schedules": list(CATALOG[name].schedules),
                                    "aliases": list(CATALOG[name].aliases),
                                    "stochastic": CATALOG[name].stochastic} for name in spec.samplers},
                "defaults": vars(spec.defaults), "guide": spec.guide,
                "upscaler": spec.upscaler, "tile": spec.tile or None,
                "limits": {**vars(spec.limits), "max_images": 8},
                # The registry's choice, and what live workers actually run (env overrides, auto).
                "engine": spec.engine, "precision": spec.precision, "live_workers": workers,
                "active_engines": active,
            })
        # "object" and "data": OpenAI's list shape beside ours, so the SDK's models.list() reads it.
        return {"default": registry.default, "models": out, "object": "list",
                "data": [model_object(spec) for spec in registry.models.values()]}

    # ------------------------------------------------------------------ the playground

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        q = queue(request)
        try:
            await q.r.ping()
            workers = await q.live_workers(registry.default, settings.heartbeat_ttl_s)
        except aioredis.RedisError as exc:
            return error_response(503, "not_ready", f"redis unreachable: {exc}")
        if workers == 0:
            return error_response(503, "not_ready", f"no live worker for default model {registry.default}")
        return {"status": "ready", "default_model": registry.default, "live_workers": workers}

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        q = queue(request)
        try:
            for model_id in registry.models:
                metrics.queue_depth.labels(model_id).set(await q.depth(model_id))
                metrics.live_workers.labels(model_id).set(
                    await q.live_workers(model_id, settings.heartbeat_ttl_s))
        except aioredis.RedisError as exc:
            log.warning("metrics without queue figures: %s", exc)
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_router(submitter))
    return app


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def main() -> None:
    import uvicorn

    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
