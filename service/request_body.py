"""The generate route's body: JSON, or multipart/form-data with the image and mask as files.

FastAPI binds one content type per body parameter, so the route reads the body here and
validates it with the same pydantic model either way; a bad body raises the same 422 naming
the field. In a form, scalar fields are strings (pydantic converts "64" to 64) and list fields
(guidance_interval...) are JSON text.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.schemas import GenerateRequest
from service.validation import ApiError

FILE_FIELDS = ("image", "mask")
LIST_FIELDS = ("guidance_interval", "guidance_interval_fraction")

OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "description": "The JSON body's fields as form fields; image and mask as files.",
        "properties": {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                       "prompt": {"type": "string"}, "task": {"type": "string"}}}},
}}}


async def read_generate(request: Request, max_bytes: int) -> tuple[GenerateRequest, dict[str, bytes]]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, bytes] = {}
    if kind == "multipart/form-data":
        data = {}
        form = await request.form(max_files=len(FILE_FIELDS), max_fields=64, max_part_size=1024 * 1024)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in FILE_FIELDS:
                    raise ApiError(422, "invalid_request", f"{name}: only {', '.join(FILE_FIELDS)} are files", name)
                content = await value.read(max_bytes + 1)
                if len(content) > max_bytes:
                    raise ApiError(413, "invalid_image", f"{name}: over the limit of {max_bytes} bytes", name)
                files[name] = content
            elif name in LIST_FIELDS:
                try:
                    data[name] = json.loads(value)
                except json.JSONDecodeError:
                    raise ApiError(422, "invalid_request", f"{name}: expected a JSON list like [0.5, 2]", name) from None
            else:
                data[name] = value
    elif kind in ("application/json", ""):
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(422, "invalid_request", "body: not valid JSON", "body") from None
    else:
        raise ApiError(415, "unsupported_media_type", f"send application/json or multipart/form-data, not {kind}")
    try:
        return GenerateRequest.model_validate(data), files
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
