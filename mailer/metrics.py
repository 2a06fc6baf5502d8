"""Prometheus metrics, read fresh at each scrape from the ledger, the broker and the buffer.

Nothing is counted in the serving process: the tracker runs several, and a scrape reaches one
of them. Every figure comes from a shared place (the database or Redis), so any process gives
the same answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from mailer import heartbeat
from mailer.db.models import DeliveryRow, SendRow, utcnow
from mailer.tracking.ingest import Buffer

RECENT = dt.timedelta(days=1)  # finished sends stay in the metrics this long


class _Mailer(Collector):
    def __init__(
        self, engine: Engine, broker: redis.Redis | None, buffer: Buffer, queues: Sequence[str]
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.buffer = buffer
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        messages = GaugeMetricFamily(
            "mailer_send_messages",
            "Ledger rows by send and state, for sends not done or finished within a day",
            labels=["send_id", "state"],
        )
        recent = (SendRow.finished_at.is_(None)) | (SendRow.finished_at >= utcnow() - RECENT)
        with self.engine.connect() as conn:
            for send_id, state, count in conn.execute(
                select(DeliveryRow.send_id, DeliveryRow.state, func.count())
                .join(SendRow, SendRow.id == DeliveryRow.send_id)
                .where(recent)
                .group_by(DeliveryRow.send_id, DeliveryRow.state)
            ):
                messages.add_metric([str(send_id), state], count)
            statuses = GaugeMetricFamily(
                "mailer_sends",
                "Sends by status, of those not done or finished within a day",
                labels=["status"],
            )
            for status, count in conn.execute(
                select(SendRow.status, func.count()).where(recent).group_by(SendRow.status)
            ):
                statuses.add_metric([status], count)
        yield messages
        yield statuses

        if self.broker is not None:  # memory:// has no broker to look into
            queued = GaugeMetricFamily(
                "mailer_queue_length", "Tasks waiting in the broker's queue", labels=["queue"]
            )
            for queue in self.queues:
                queued.add_metric([queue], self.broker.llen(queue))
            yield queued
            last = heartbeat.last_run(self.broker)
            if last is not None:
                yield GaugeMetricFamily(
                    "mailer_scheduler_last_run_timestamp_seconds",
                    "When beat's clock last looked for due scheduled sends",
                    value=last,
                )

        yield GaugeMetricFamily(
            "mailer_tracking_backlog",
            "Buffered tracking entries not yet written to the database",
            value=self.buffer.backlog(),
        )
        events = CounterMetricFamily(
            "mailer_tracker_events", "Tracking events written, by kind", labels=["kind"]
        )
        for kind, count in sorted(self.buffer.tallies().items()):
            events.add_metric([kind], count)
        yield events


def render(
    engine: Engine,
    broker: redis.Redis | None,
    buffer: Buffer,
    queues: Sequence[str] = ("celery",),
) -> bytes:
    """The metrics in Prometheus's text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Mailer(engine, broker, buffer, queues))
    return generate_latest(registry)
