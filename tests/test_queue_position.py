"""Queue position: a queued job says how many jobs workers will take before it, in its job
object and in its event stream, and moves up as the jobs ahead leave."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import generate, job_status

MODEL = "huge-ldm"  # served only by workers a test starts itself: nobody claims these jobs


@pytest.fixture()
def unserved(api, r):
    """huge-ldm's queue, emptied of anything an earlier test left queued; cancelled after."""
    def clear():
        for stream in (f"latentserve:stream:{MODEL}", f"latentserve:urgent:{MODEL}"):
            for _sid, fields in r.xrange(stream):
                api.delete(f"/v1/jobs/{fields[b'job'].decode()}")
    clear()
    yield
    clear()


def queue(api, n: int, **body) -> list[str]:
    ids = []
    for k in range(n):
        response = generate(api, wait=False, model=MODEL, prompt="a star", steps=2, seed=k, **body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def positions(api, ids: list[str]) -> list[int | None]:
    return [job_status(api, job_id).get("queue_position") for job_id in ids]


def test_queued_jobs_count_the_jobs_ahead_and_move_up(api, unserved):
    first, second, third = queue(api, 3)
    assert positions(api, [first, second, third]) == [0, 1, 2]
    assert api.delete(f"/v1/jobs/{first}").json()["status"] == "cancelled"
    assert positions(api, [second, third]) == [0, 1]
    assert "queue_position" not in job_status(api, first)  # only while queued

    # A high-priority job goes ahead of every normal one: workers read its lane first.
    (urgent,) = queue(api, 1, priority="high")
    assert positions(api, [urgent, second, third]) == [0, 1, 2]


def test_event_stream_reports_the_position_then_each_move(api, unserved):
    first, second, third = queue(api, 3)
    events = httpx.Client(base_url=api.base_url, timeout=10)  # a move that never comes fails, not hangs
    with events.stream("GET", f"/v1/jobs/{third}/events") as response:
        lines = response.iter_lines()

        def next_event() -> tuple[str, dict]:
            name = None
            for line in lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    return name, json.loads(line[6:])
            raise AssertionError("the stream ended")

        assert next_event() == ("status", {"status": "queued", "step": 0, "total": 0, "queue_position": 2})
        api.delete(f"/v1/jobs/{first}")
        assert next_event() == ("queue", {"position": 1})
        api.delete(f"/v1/jobs/{second}")
        assert next_event() == ("queue", {"position": 0})
        api.delete(f"/v1/jobs/{third}")
        assert next_event() == ("status", {"status": "cancelled"})
        name, done = next_event()
        assert name == "done" and done["status"] == "cancelled" and "queue_position" not in done
    events.close()
