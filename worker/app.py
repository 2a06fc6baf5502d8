"""The Celery application, configured from ``MAILER_*`` settings.

Start a worker with ``celery -A worker.app worker -E``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import celery.apps.worker
from celery import Celery, current_task
from celery.signals import after_setup_logger, after_setup_task_logger, beat_init

from mailer.config import Settings, load_settings
from mailer.errors import ConfigError
from mailer.logs import JsonFormatter

BATCH_TIMEOUT_S = 4 * 3600


def _settings() -> Settings:
    """The settings; a bad one stops the worker, beat or Flower with one line, as in the CLI."""
    try:
        return load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None


SETTINGS = _settings()
app = Celery("mailer", include=["worker.tasks"])
app.conf.update(
    broker_url=SETTINGS.broker_url,
    # State lives in the database; tasks report nothing back through Celery.
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # Task events on, so Flower (and `celery events`) can follow every task.
    worker_send_task_events=True,
    task_send_sent_event=True,
    # Tasks are idempotent (they re-read the ledger), so a task whose worker died is
    # redelivered rather than lost: acknowledge only after it ran.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One batch at a time per process: a prefetched batch would wait behind a slow one.
    worker_prefetch_multiplier=1,
    # Redis redelivers an unacknowledged task after this long; it must exceed the longest
    # batch, or a batch still running would be handed to a second worker.
    broker_transport_options={"visibility_timeout": BATCH_TIMEOUT_S},
    # A batch that runs again is published from inside a task: ride out a broker restart
    # (about a minute) rather than lose the batch's next run.
    task_publish_retry_policy={
        "max_retries": 40,
        "interval_start": 0.5,
        "interval_step": 0.5,
        "interval_max": 2.0,
    },
    # Every worker runs the reconciler itself (worker.tasks.Reconciler); beat runs the clock
    # that starts scheduled sends in its own process (worker.clock), so it has no schedule.
)


@after_setup_logger.connect  # type: ignore[untyped-decorator]
@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _log_format(logger: logging.Logger, **_: Any) -> None:
    if SETTINGS.log_format != "json":
        return
    # Celery writes its shutdown notices straight to the terminal, outside its logging.
    celery.apps.worker.safe_say = _say_as_json
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
        handler.addFilter(_name_the_batch)


def _say_as_json(msg: str, f: Any = sys.__stderr__) -> None:
    """Celery's ``safe_say`` (called in signal handlers: no locks), one JSON line instead."""
    record = logging.makeLogRecord({"name": "celery.worker", "levelname": "INFO", "msg": msg})
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(f.fileno(), (JsonFormatter().format(record) + "\n").encode())


def _name_the_batch(record: logging.LogRecord) -> bool:
    """Celery's own lines about a batch task (received, succeeded...) carry its send."""
    task = current_task
    if task and task.name == "mailer.deliver_batch" and not hasattr(record, "send_id"):
        args = list(task.request.args or ())
        if len(args) == 2:
            record.send_id, record.batch_no = args[0], args[1]
    return True


@beat_init.connect  # type: ignore[untyped-decorator]
def _start_clock(**_: Any) -> None:
    from worker import clock  # it imports the tasks, which import this module

    clock.start()
