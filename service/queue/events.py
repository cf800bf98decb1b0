"""Job events for the API: one pub/sub connection per process, shared by every waiter.

The hub pattern-subscribes once to every job's event channel and hands each message to the
waiters registered for that job (an asyncio queue each), so thousands of clients waiting on
`?wait=true` or SSE cost no more Redis connections than one. A waiter registers before it
reads the job's state (or before the job exists), so no event falls between the two. If the
connection drops the hub reconnects; waiters re-read the job's record on their own timeouts,
so an event lost in the gap only delays them.
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis

from service.queue.keys import Keys

log = logging.getLogger("latentserve.events")


class EventHub:
    def __init__(self, client: aioredis.Redis):
        self.client = client
        self.waiters: dict[str, set[asyncio.Queue]] = {}
        self._task: asyncio.Task | None = None
        self._channel_prefix = Keys.events("")

    async def start(self) -> None:
        """Subscribed before it returns (when Redis is reachable), then listening in a task."""
        pubsub = None
        try:
            pubsub = await self._subscribed()
        except Exception as exc:  # serve anyway: the task keeps trying
            log.warning("event subscription not ready (%s); retrying in the background", exc)
        self._task = asyncio.create_task(self._run(pubsub), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _subscribed(self):
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(Keys.events("*"))
        return pubsub

    async def _run(self, pubsub) -> None:
        while True:
            try:
                pubsub = pubsub or await self._subscribed()
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                if pubsub is not None:
                    await pubsub.aclose()
                raise
            except Exception as exc:  # Redis restarting, a dropped connection: reconnect
                log.warning("event subscription lost (%s); reconnecting in 1s", exc)
                if pubsub is not None:
                    await pubsub.aclose()
                pubsub = None
                await asyncio.sleep(1)

    def _dispatch(self, channel, data) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        queues = self.waiters.get(channel[len(self._channel_prefix):])
        if queues:
            event = json.loads(data)
            for q in queues:
                q.put_nowait(event)

    def subscribe(self, job_id: str) -> "Subscription":
        return Subscription(self, job_id)


class Subscription:
    """One waiter's view of a job's events (use as an async context)."""

    def __init__(self, hub: EventHub, job_id: str):
        self.hub, self.job_id, self.queue = hub, job_id, asyncio.Queue()

    async def __aenter__(self):
        self.hub.waiters.setdefault(self.job_id, set()).add(self.queue)
        return self

    async def __aexit__(self, *exc):
        queues = self.hub.waiters.get(self.job_id)
        if queues is not None:
            queues.discard(self.queue)
            if not queues:
                del self.hub.waiters[self.job_id]

    async def next_event(self, timeout: float) -> dict | None:
        """The next event, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return None
