"""The queue protocol on Redis Streams. The only package that knows a Redis key name (keys.py names them all).

Per model, one stream with one consumer group. A job is a hash (its record, with a TTL) plus
one stream entry {job, images}; enqueue writes both atomically. Workers claim entries with
XREADGROUP (COUNT n) and reclaim entries idle past the visibility timeout with XAUTOCLAIM;
a live worker keeps its claimed entries fresh with XCLAIM ... JUSTID from its heartbeat.
A worker holds only what it runs now: entries it cannot run are released (XCLAIM ... IDLE
<visibility timeout>, so the next XAUTOCLAIM of any worker takes them, in stream order) and a
wake entry on the model's wake stream ends some idle worker's blocking read at once.
Every write to a job record is a script that writes only while the record exists, so a
record that expired stays gone (HSET on a missing key would recreate it without a TTL).
Redis >= 6.2 (XAUTOCLAIM); nothing newer is used.
Finishing is one script: it writes the result only if the job is not already finished, then
XACKs and XDELs the entry (so XLEN is the number of unfinished jobs), then publishes the
completion event. A reclaimed duplicate therefore never overwrites a result, and its worker
learns it lost the race (so metrics count each job once).

Events go out on a per-job pub/sub channel as JSON; readers subscribe before they read the
record, so nothing is missed between the two. JSON everywhere on the wire, never pickle.
"""

from service.queue.api_side import ApiQueue, QueueFull
from service.queue.keys import GROUP, MIN_REDIS, PREFIX, TERMINAL, Keys, RedisTooOld, check_redis_version, redis_version
from service.queue.records import Advance, Claimed, Job, Outcome, StoredImage, decode_images, decode_job, encode_job
from service.queue.worker_side import WorkerQueue

__all__ = [
    "ApiQueue", "QueueFull", "GROUP", "MIN_REDIS", "PREFIX", "TERMINAL", "Keys", "RedisTooOld",
    "check_redis_version", "redis_version", "Advance", "Claimed", "Job", "Outcome", "StoredImage", "decode_images",
    "decode_job", "encode_job", "WorkerQueue",
]
