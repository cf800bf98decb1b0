"""The CLI's HTTP side: the latentserve API over httpx, its answers sorted into the two kinds
of error a command maps to exit codes, and a job's Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx

# A read that waits longer than this is a dead connection: the events route sends a keepalive
# comment every 15 s (service.api.SSE_KEEPALIVE_S), and no other route holds a request open.
READ_TIMEOUT_S = 60.0


class ApiRefused(Exception):
    """A 4xx answer: the request itself was refused. `message` and `field` are the API's."""

    def __init__(self, status: int, code: str, message: str, field: str | None, retry_after: str | None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"the API refused the request ({self.status} {self.code}): {self.message}"
        if self.field:
            text += f" [field: {self.field}]"
        if self.retry_after:
            text += f" (retry after {self.retry_after} s)"
        return text


class Unreachable(Exception):
    """No answer, or a 5xx one: nothing the request could change."""


@dataclass(frozen=True)
class Event:
    name: str
    data: dict


class Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"no answer from {self.url}: {exc or type(exc).__name__}") from None
        return checked(response)

    def submit(self, body: dict, files: dict[str, tuple[str, bytes]]) -> dict:
        """POST /v1/generate without waiting: {id, status, warnings}. With files (img2img,
        inpaint) the body goes as multipart/form-data, which carries the images as bytes
        rather than a third larger in base64; the API reads a form's list fields as JSON."""
        if not files:
            return self.request("POST", "/v1/generate", json=body)
        form = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in body.items()}
        return self.request("POST", "/v1/generate", data=form, files=files)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self.request("DELETE", f"/v1/jobs/{job_id}")

    def models(self) -> dict:
        return self.request("GET", "/v1/models")

    def events(self, job_id: str) -> Iterator[Event]:
        """The job's events, ending with `done` (the finished job's body). A stream that drops
        (the connection breaks, or closes before `done`) is reopened once; a reopened stream
        starts with the job's current status, so only intermediate progress can be missed.
        Two drops in a row with no event between them raise Unreachable."""
        may_reopen = True
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    if response.status_code >= 400:
                        response.read()
                        checked(response)
                    for event in parse_sse(response.iter_lines()):
                        may_reopen = True
                        yield event
                        if event.name == "done":
                            return
                why = "the server closed it before the job ended"
            except httpx.TransportError as exc:
                why = str(exc) or type(exc).__name__
            if not may_reopen:
                raise Unreachable(f"lost the event stream of job {job_id} from {self.url}: {why}")
            may_reopen = False


def checked(response: httpx.Response) -> dict:
    """The JSON body of a 2xx answer; ApiRefused for a 4xx, Unreachable for a 5xx."""
    if response.status_code < 400:
        return response.json()
    try:
        body = response.json()
    except ValueError:
        body = {}
    # The API's errors are {"error": {code, message, field}}; anything else (a proxy, or not
    # a latentserve server at all) is reported by its status line and text.
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": response.reason_phrase, "message": response.text.strip()[:300] or response.reason_phrase}
    if response.status_code >= 500:
        raise Unreachable(f"server error {response.status_code} from {response.url}: {error.get('message')}")
    raise ApiRefused(response.status_code, error.get("code") or "error", error.get("message") or "",
                     error.get("field"), response.headers.get("retry-after"))


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from an event stream's lines (WHATWG HTML, "server-sent events"), as far as our
    server writes them: `event:` and JSON `data:` fields, comment lines (keepalives), a blank
    line ending each event; it sends no `id:` or `retry:`. Fifteen lines over httpx's own line
    splitting, where the httpx-sse package would add a dependency for the same loop."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield Event(name, json.loads("\n".join(data)))
            name, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
