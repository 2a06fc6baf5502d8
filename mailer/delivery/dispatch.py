"""Hand a started send's batches to the workers, or deliver them here when no broker answers.

The library knows nothing of Celery: the caller passes ``enqueue``, which puts batches on the
workers' queue. ``worker/`` provides it as a ``Workers`` (``worker.tasks``), registered under
the ``mailer.workers`` entry point (pyproject.toml) so that ``mailer/`` never imports it:
``find_workers`` loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Literal, Protocol, cast

from sqlalchemy import Engine

from mailer import db
from mailer.config import Settings
from mailer.errors import ConfigError

Enqueue = Callable[[int, Sequence[int]], None]  # (send, batches): one task per batch
WORKERS_ENTRY_POINT = "mailer.workers"


class Workers(Protocol):
    """What the library asks of the workers."""

    def enqueue(self, engine: Engine, send_id: int, batches: Iterable[int]) -> None:
        """One task per batch."""

    def answering(self, timeout: float) -> list[str]:
        """The names of the workers that answered within ``timeout`` seconds."""


def find_workers() -> Workers:
    """The installed workers (``worker.tasks``); importing them connects nothing yet."""
    found = entry_points(group=WORKERS_ENTRY_POINT)
    if not found:
        raise ConfigError(f"no workers installed (entry point {WORKERS_ENTRY_POINT!r})")
    return cast(Workers, next(iter(found)).load())


def broker_answers(url: str) -> bool:
    import redis  # here: commands that never dispatch start faster without it

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def dispatch(
    settings: Settings,
    send_id: int,
    batches: Sequence[int],
    *,
    enqueue: Enqueue,
    progress: Callable[[], None] = lambda: None,
    notice: Callable[[str], None] = lambda _: None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Literal["queued", "delivered", "paused"]:
    """Queue the batches with ``enqueue`` if the broker answers; else deliver the whole send
    in this process, calling ``progress`` after each batch. ``notice`` hears which it was.

    Delivering here, once ``stop_requested()`` answers True (the author pressed Ctrl-C), the
    messages in flight finish and the send is paused: nothing else would carry it on, and
    ``mailer sends resume`` does, sending nothing twice.
    """
    if broker_answers(settings.broker_url):
        enqueue(send_id, batches)
        notice(f"{len(batches)} batches queued on {db.shown(settings.broker_url)}")
        return "queued"
    # Here, not at the top: with a broker, the caller does without the delivery machinery.
    from mailer import sends
    from mailer.delivery.runner import Runtime, run_inline

    notice(f"no broker at {db.shown(settings.broker_url)}: delivering in this process")
    engine = db.connect(settings.database_url)
    runtime = Runtime(settings, engine=engine, stop_requested=stop_requested)
    try:
        run_inline(runtime, send_id, progress=progress)
        if stop_requested():
            with db.session(engine) as session:
                if sends.pause_if_sending(session, send_id):
                    return "paused"
    finally:
        runtime.close()
    return "delivered"
