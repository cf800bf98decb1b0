"""Every Redis key name, and the Redis versions the protocol runs on."""

from __future__ import annotations

import redis

PREFIX = "latentserve"
GROUP = "workers"
TERMINAL = ("succeeded", "failed", "cancelled")


class Keys:
    @staticmethod
    def stream(model: str, urgent: bool = False) -> str:
        """A model's job stream; high-priority jobs have their own lane ("urgent"), which a
        worker with a full batch still reads at every step, so they can pause others."""
        return f"{PREFIX}:{'urgent' if urgent else 'stream'}:{model}"

    @staticmethod
    def job(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    @staticmethod
    def result(job_id: str) -> str:
        return f"{PREFIX}:result:{job_id}"

    @staticmethod
    def events(job_id: str) -> str:
        return f"{PREFIX}:events:{job_id}"

    @staticmethod
    def workers(model: str) -> str:
        return f"{PREFIX}:workers:{model}"  # zset: worker id -> last heartbeat (unix s)

    @staticmethod
    def engines(model: str) -> str:
        return f"{PREFIX}:engines:{model}"  # hash: worker id -> JSON {engine, precision, device}

    @staticmethod
    def inputs(job_id: str) -> str:
        return f"{PREFIX}:input:{job_id}"  # hash: an image task's uploads (normalised PNG), the job's TTL

    @staticmethod
    def cost(model: str) -> str:
        return f"{PREFIX}:cost:{model}"  # hash: worker id -> JSON service.cost.Cost

    @staticmethod
    def wake(model: str) -> str:
        return f"{PREFIX}:wake:{model}"  # stream: "entries were released", ends a blocking read

    @staticmethod
    def grouped(model: str) -> tuple[str, str, str]:
        """The streams a model's workers read through the consumer group."""
        return Keys.stream(model, urgent=True), Keys.stream(model), Keys.wake(model)

    DEAD = f"{PREFIX}:dead"  # stream of dead-lettered jobs, for operators


MIN_REDIS = (6, 2)  # XAUTOCLAIM


class RedisTooOld(RuntimeError):
    pass


def redis_version(client: redis.Redis) -> str:
    return str(client.info("server")["redis_version"])


def check_redis_version(version: str) -> None:
    """Refuse a server older than 6.2 (no XAUTOCLAIM) with a message that says so."""
    parts = tuple(int(p) for p in version.split(".")[:2])
    if parts < MIN_REDIS:
        raise RedisTooOld(f"Redis {version} is too old: latentserve needs Redis >= "
                          f"{'.'.join(map(str, MIN_REDIS))} (XAUTOCLAIM)")
