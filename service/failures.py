"""What kind of failure an exception is, and the closed set of reasons metrics may carry.

- invalid_input: the job's own request can't be run (found before any engine call); it
  fails alone, at once, and its batch-mates never see it.
- unsupported_task: no runner serves the job's task; fails at once, never retried.
- engine_error: the engine or the host failed (out of memory, a lost device). The job did
  nothing wrong, so it goes back to the queue for an immediate retry, by any worker, and is
  dead-lettered when its attempts run out.
- internal_error: anything else is a bug, ours or a model's, and retrying it max_attempts
  times would only repeat it. A batch that hits one is rerun job by job, so the job that
  triggers it fails alone (dead-lettered, for operators) and its batch-mates finish.
- dead_letter: delivered more than max_attempts times (its workers kept dying).
"""

from __future__ import annotations

import torch

INVALID_INPUT = "invalid_input"
UNSUPPORTED_TASK = "unsupported_task"
ENGINE_ERROR = "engine_error"
INTERNAL_ERROR = "internal_error"
DEAD_LETTER = "dead_letter"
DEADLINE = "deadline"  # the request's timeout_s passed before it finished
REASONS = (INVALID_INPUT, UNSUPPORTED_TASK, ENGINE_ERROR, INTERNAL_ERROR, DEAD_LETTER, DEADLINE)

# How allocators and devices word their failures (torch CPU/CUDA, onnxruntime, TensorRT),
# matched in the message because several raise a plain RuntimeError.
_ENGINE_MESSAGES = (
    "out of memory", "can't allocate memory", "failed to allocate", "bad_alloc",
    "cuda error", "device-side assert", "cudnn_status", "cublas_status", "device lost",
)


def is_engine_failure(exc: BaseException) -> bool:
    """True for out-of-memory and device errors: the host's trouble, not the job's."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return any(message in text for message in _ENGINE_MESSAGES)
