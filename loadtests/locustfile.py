"""A locust file for your own load tests of a running latentserve.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000              # web UI on :8089
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 2m
    locust -f loadtests/locustfile.py --host ... --ls-model my-model           # one model, its defaults

Each simulated user sends `POST /v1/generate?wait=true` requests back to back. By default they
follow the open-loop test's mix (loadtests/openloop.py: turbo 4 steps, 20 and 28 guided steps,
96x96 unguided, on shapes-mmdit and shapes-mmdit-turbo); `--ls-model` sends every request to
one model with its defaults instead. Locust's table shows each request class's client latency
and, as `server queue` / `server inference` rows, the service's own timings of the same jobs.
A 429 (queue full, or a deadline the service predicts it cannot meet) counts as a failure
named by its error code.
"""

from __future__ import annotations

import itertools

from locust import FastHttpUser, between, events, task

from loadtests.openloop import MIX, PROMPTS, body_of

_counter = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--ls-model", default="", help="send every request to this model (its defaults)")
    parser.add_argument("--ls-timeout", type=float, default=0, help="timeout_s on each request (0: none)")


class Generator(FastHttpUser):
    wait_time = between(0, 0)  # closed loop: the next request as soon as the last is answered

    def _generate(self, name: str, body: dict) -> None:
        options = self.environment.parsed_options
        if options is not None and options.ls_timeout > 0:
            body = {**body, "timeout_s": options.ls_timeout}
        with self.client.post("/v1/generate?wait=true", json=body, name=name, catch_response=True) as response:
            job = response.json() if response.content else {}
            if response.status_code != 200 or job.get("status") != "succeeded":
                code = (job.get("error") or {}).get("code") if isinstance(job.get("error"), dict) else job.get("error")
                response.failure(f"{response.status_code} {code or job.get('status')}")
                return
            for phase in ("queue_s", "inference_s"):
                events.request.fire(request_type="server", name=f"{name} {phase[:-2]}", response_length=0,
                                    response_time=1000 * float(job["timings"][phase]), exception=None, context={})

    @task
    def mix(self) -> None:
        k = next(_counter)
        options = self.environment.parsed_options
        if options is not None and options.ls_model:
            self._generate(options.ls_model, {"model": options.ls_model, "prompt": PROMPTS[k % len(PROMPTS)], "seed": k})
            return
        cls = _pick(k)
        self._generate(cls, body_of(MIX, cls, k))


def _pick(k: int) -> str:
    """The mix's classes in their proportions, deterministically interleaved."""
    total = sum(w for _, w, _ in MIX)
    position = (k * 0.6180339887) % 1.0 * total  # golden-ratio sequence: evenly spread
    for name, weight, _ in MIX:
        if position < weight:
            return name
        position -= weight
    return MIX[-1][0]
