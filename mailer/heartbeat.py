"""Beat's heartbeat: the clock records each run in the broker's Redis; doctor reads it."""

from __future__ import annotations

import redis

KEY = "mailer:beat:last-run"


def record(client: redis.Redis, now: float) -> None:
    client.set(KEY, repr(now))


def last_run(client: redis.Redis) -> float | None:
    """When beat's clock last ran (Unix time), or None if it never did."""
    found = client.get(KEY)
    return None if found is None else float(found)
