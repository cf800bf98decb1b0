"""The API waits for jobs over one shared pub/sub connection per process: many clients
waiting at once (?wait=true and SSE) cost no more Redis connections than one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import generate


def pubsub_clients(r) -> int:
    return len([line for line in r.execute_command("CLIENT", "LIST", "TYPE", "pubsub").splitlines() if line])


def test_thirty_waiting_clients_share_one_subscription(api, worker, r):
    before = pubsub_clients(r)
    seen, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(pubsub_clients(r))
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(30) as pool:
            jobs = list(pool.map(lambda s: generate(api, model="tiny-mmdit", prompt="a circle", steps=12,
                                                     seed=s).json(), range(30)))
    finally:
        done.set()
        watcher.join()
    assert all(j["status"] == "succeeded" for j in jobs), [j.get("status") for j in jobs]
    assert before == 1 and max(seen) == 1, seen  # the API process's one shared subscription
