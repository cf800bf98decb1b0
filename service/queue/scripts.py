"""The atomic steps of the protocol, as Lua scripts (KEYS and ARGV documented on each).

Only commands Redis 6.2 has. The group name 'workers' is keys.GROUP."""

# KEYS: stream (the job's lane), job, the model's other lane, the job's inputs; ARGV: max_queue,
# ttl, job id, images, n, n items of input name, bytes, ..., then field, value, ... of the record.
# max_queue counts both lanes. Inputs and record are written together, with the same TTL.
ENQUEUE = """
if redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[1]) then return false end
local n = tonumber(ARGV[5])
if n > 0 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 6, 5 + n))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
local sid = redis.call('XADD', KEYS[1], '*', 'job', ARGV[3], 'images', ARGV[4])
redis.call('HSET', KEYS[2], 'stream_id', sid, unpack(ARGV, 6 + n))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return sid
"""

# KEYS: job, stream, events; ARGV: now, event json
# queued -> cancelled (entry deleted: no worker will run it); running -> flagged for the worker.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  local sid = redis.call('HGET', KEYS[1], 'stream_id')
  redis.call('XACK', KEYS[2], 'workers', sid)  -- a released entry is still pending
  redis.call('XDEL', KEYS[2], sid)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
             'error', 'cancelled before it ran')
  redis.call('PUBLISH', KEYS[3], ARGV[2])
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return status
"""

# KEYS: job, events; ARGV: worker, now, event json
# Returns {status before, attempts after}; only a queued or (reclaimed) running job starts.
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return {status, attempts}
"""

# KEYS: job, result, stream, events; ARGV: stream id, ttl, event json, n job fields, fields..,
# result fields...  Writes only if the job is not finished yet; always acks and deletes.
FINISH = """
redis.call('XACK', KEYS[3], 'workers', ARGV[1])
redis.call('XDEL', KEYS[3], ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return 0
end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
if #ARGV > 4 + n then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5 + n))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[5])  -- the job's inputs: no attempt will read them again
redis.call('PUBLISH', KEYS[4], ARGV[3])
return 1
"""


# KEYS: job, stage stream, next stream, events, inputs; ARGV: stage stream id, ttl, event json,
# done event json, now, job id, images, n record fields, fields..., input name, bytes, ...
# A chained job's stage done: its images become the next stage's inputs and the job moves to
# the next model's stream, in one step (service.chain). A job finished or cancelled meanwhile
# does not move; a cancel requested during the stage cancels it here. Always acks and deletes.
ADVANCE = """
redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return 0
end
if redis.call('HGET', KEYS[1], 'cancel_requested') then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5], 'error', 'cancelled while running')
  redis.call('DEL', KEYS[5])
  redis.call('PUBLISH', KEYS[4], ARGV[4])
  return 2
end
local n = tonumber(ARGV[8])
redis.call('DEL', KEYS[5])
if #ARGV > 8 + n then
  redis.call('HSET', KEYS[5], unpack(ARGV, 9 + n))
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
local sid = redis.call('XADD', KEYS[3], '*', 'job', ARGV[6], 'images', ARGV[7])
redis.call('HSET', KEYS[1], 'status', 'queued', 'stream_id', sid, 'attempts', 0, unpack(ARGV, 9, 8 + n))
redis.call('HDEL', KEYS[1], 'worker', 'started_at', 'last_error')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[3])
return 1
"""

# KEYS: job, events; ARGV: step, total, event json
# Returns 0 (go on), 1 (cancel requested) or 2 (the record is gone: expired or deleted).
PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 2 end
redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_total', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') then return 1 end
return 0
"""

# KEYS: job, events; ARGV: error, event json
# A running job goes back to queued for an immediate retry (its attempt stays counted).
REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[1], 'progress_step', 0)
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: stream, wake; ARGV: consumer, idle ms, stream ids...
# Entries this worker holds but will not run: idle as if abandoned, so any worker's next
# XAUTOCLAIM takes them (JUSTID: no delivery counted), then wake one blocked reader.
RELEASE = """
for i = 3, #ARGV do
  redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'IDLE', ARGV[2], 'JUSTID')
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100, '*', 'released', #ARGV - 2)
return 1
"""
