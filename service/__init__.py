"""The HTTP boundary, the Redis queue protocol, the worker process and metrics."""
