"""Throttles: measured rates, back-off and recovery, sharing through the real Redis.

The arithmetic (limits, back-offs, the floor, recovery by doubling over the default policy's
30 s cool-down) runs on a ``FakeClock``: its ``sleep`` only moves the hands, so the tests wait
for nothing and the rates are checked to the millisecond. A few tests keep the real clock
(Redis's ``TIME`` and ``asyncio.sleep``), with small rates (10-20 messages/s) and tolerant
bounds, to prove the throttles pace real time too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import REDIS_DB, REDIS_HOST, REDIS_PORT, REDIS_URL
from helpers import DEV, free_port
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from workers import RedisServer

from mailer.config import load_settings
from mailer.delivery.throttle import (
    MIN_TOLERANCE,
    MONOTONIC,
    REDIS_TIMEOUT_S,
    BackoffPolicy,
    Clock,
    LocalThrottle,
    RedisThrottle,
    Throttle,
)
from mailer.errors import ThrottleUnavailable, TransientDeliveryError

PREFIX = "test:throttle:"


class FakeClock:
    """Time that passes only when a throttle sleeps or the test says so."""

    def __init__(self) -> None:
        self.time = 1_000.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        # At least a microsecond, as a real sleep: a wait of 1e-16 s (rounding) would
        # otherwise leave the time as it was, and the throttle would ask again forever.
        self.time += max(seconds, 1e-6)
        await asyncio.sleep(0)  # let the other senders run, as a real sleep would

    def at(self, time: float) -> None:
        assert time >= self.time, "a clock never goes back"
        self.time = time


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "local"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_db")
    return str(request.param)


@contextlib.asynccontextmanager
async def throttles(
    kind: str, workers: int = 1, clock: FakeClock | None = None, **options: Any
) -> AsyncIterator[list[Throttle]]:
    """``workers`` throttles sharing state, as separate worker processes would; on ``clock``
    if given (else on real time: Redis's and ``time.monotonic``)."""
    options = {"rate_limit": 0.0, "domain_limits": (), **options}
    if clock is not None:
        options["clock"] = clock
    if kind == "local":
        assert workers == 1, "a LocalThrottle shares nothing"
        yield [LocalThrottle(**options)]
        return
    clients = [redis.asyncio.Redis.from_url(REDIS_URL) for _ in range(workers)]
    try:
        yield [RedisThrottle(client, key_prefix=PREFIX, **options) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


async def timed(
    throttle: Throttle, domain: str, count: int, clock: Clock = MONOTONIC, concurrency: int = 4
) -> float:
    """Seconds that ``count`` acquires, ``concurrency`` at a time, took on ``clock``."""
    remaining = iter(range(count))

    async def sender() -> None:
        for _ in remaining:
            await throttle.acquire(domain)

    start = clock.now()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return clock.now() - start


def paced(count: int, rate: float) -> float:
    """Seconds ``count`` messages take at ``rate`` from a rested bucket, after its burst."""
    burst = 1 + max(1, int(MIN_TOLERANCE * rate))
    return (count - burst) / rate


def assert_paced(seconds: float, count: int, rate: float) -> None:
    """On real time: within the bounds a loaded machine needs."""
    expected = paced(count, rate)
    assert 0.75 * expected <= seconds <= 1.3 * expected + 0.05, (
        f"{count} messages took {seconds:.3f}s; at {rate}/s: {expected:.3f}s"
    )


async def assert_pace(
    throttle: Throttle, clock: FakeClock, domain: str, count: int, rate: float
) -> None:
    """On a fake clock: to the millisecond (Redis's script rounds its waits up to one)."""
    seconds = await timed(throttle, domain, count, clock)
    assert seconds == pytest.approx(paced(count, rate), abs=0.002), (
        f"{count} messages took {seconds:.4f}s; at {rate}/s: {paced(count, rate):.4f}s"
    )


async def is_unthrottled(throttle: Throttle, clock: FakeClock, domain: str) -> bool:
    return await timed(throttle, domain, 100, clock, concurrency=1) == 0


def test_global_limit_on_real_time(kind: str) -> None:
    async def run() -> None:
        async with throttles(kind, rate_limit=20) as [throttle]:
            assert_paced(await timed(throttle, "example.org", 21), 21, 20)

    asyncio.run(run())


def test_global_limit(kind: str) -> None:
    clock = FakeClock()

    async def run() -> None:
        async with throttles(kind, clock=clock, rate_limit=20) as [throttle]:
            await assert_pace(throttle, clock, "example.org", 41, 20)

    asyncio.run(run())


def test_a_domain_limit_leaves_other_domains_alone(kind: str) -> None:
    clock = FakeClock()

    async def run() -> None:
        async with throttles(kind, clock=clock, domain_limits=[("Slow.example", 10)]) as [th]:
            await assert_pace(th, clock, "slow.EXAMPLE", 11, 10)
            assert await is_unthrottled(th, clock, "fast.example")

    asyncio.run(run())


def test_backoff_halves_once_per_burst_then_recovers_by_doubling(kind: str) -> None:
    """The default policy: halvings 1 s apart count once, 30 s of cool-down, then the rate
    doubles every 10 s back to the limit."""
    clock = FakeClock()

    async def run() -> None:
        async with throttles(kind, clock=clock, domain_limits=[("slow.example", 80)]) as [th]:
            await th.backoff("slow.example")
            clock.at(clock.now() + 0.5)
            await th.backoff("slow.example")  # the same burst of refusals: halved once
            await assert_pace(th, clock, "slow.example", 11, 40)
            clock.at(clock.now() + 5)
            await th.backoff("slow.example")  # a new burst: 20/s, and the cool-down restarts
            last = clock.now()
            await assert_pace(th, clock, "slow.example", 6, 20)
            clock.at(last + 29.5)
            await assert_pace(th, clock, "slow.example", 6, 20)  # still cooling down
            clock.at(last + 30.5)
            await assert_pace(th, clock, "slow.example", 9, 40)  # cooled down: doubled
            clock.at(last + 39.5)
            await assert_pace(th, clock, "slow.example", 9, 40)
            clock.at(last + 40.5)
            await assert_pace(th, clock, "slow.example", 21, 80)  # back to the limit
            clock.at(last + 60)
            await th.backoff("slow.example")  # over: a back-off starts from the limit again
            await assert_pace(th, clock, "slow.example", 11, 40)

    asyncio.run(run())


def test_backoff_of_a_domain_without_a_limit(kind: str) -> None:
    clock = FakeClock()
    policy = BackoffPolicy(unlimited_rate=20)

    async def run() -> None:
        async with throttles(kind, clock=clock, backoff=policy) as [throttle]:
            assert await is_unthrottled(throttle, clock, "busy.example")
            await throttle.backoff("busy.example")
            await assert_pace(throttle, clock, "busy.example", 11, 10)
            assert await is_unthrottled(throttle, clock, "other.example")
            clock.at(clock.now() + 30 + 10)  # recovered to 20/s: unlimited again
            assert await is_unthrottled(throttle, clock, "busy.example")

    asyncio.run(run())


def test_backoff_never_goes_below_the_floor(kind: str) -> None:
    clock = FakeClock()
    policy = BackoffPolicy(floor=10)

    async def run() -> None:
        async with throttles(
            kind, clock=clock, domain_limits=[("slow.example", 40)], backoff=policy
        ) as [th]:
            for _ in range(5):
                await th.backoff("slow.example")
                clock.at(clock.now() + policy.min_gap)
            await assert_pace(th, clock, "slow.example", 6, 10)

    asyncio.run(run())


@pytest.mark.usefixtures("redis_db")
def test_two_workers_share_one_global_limit() -> None:
    async def run() -> None:
        async with throttles("redis", workers=2, rate_limit=20) as [first, second]:
            start = time.monotonic()
            await asyncio.gather(timed(first, "a.example", 11), timed(second, "b.example", 11))
            assert_paced(time.monotonic() - start, 22, 20)

    asyncio.run(run())


@pytest.mark.usefixtures("redis_db")
def test_a_backoff_reaches_every_worker() -> None:
    clock = FakeClock()
    policy = BackoffPolicy(unlimited_rate=20)

    async def run() -> None:
        async with throttles("redis", 2, clock, backoff=policy) as [first, second]:
            assert await is_unthrottled(second, clock, "busy.example")
            await first.backoff("busy.example")
            assert await is_unthrottled(second, clock, "busy.example")  # not reread yet
            clock.at(clock.now() + policy.refresh)  # the other worker rereads the back-offs
            await assert_pace(second, clock, "busy.example", 11, 10)

    asyncio.run(run())


@pytest.mark.usefixtures("redis_db")
def test_from_settings_keeps_state_in_the_broker_redis() -> None:
    environ = {
        **DEV,
        "MAILER_BROKER_URL": REDIS_URL,
        "MAILER_DOMAIN_LIMITS": "slow.example=10/s",
    }
    settings = load_settings(environ, env_file=None)

    async def run() -> None:
        throttle = RedisThrottle.from_settings(settings)
        assert_paced(await timed(throttle, "slow.example", 6), 6, 10)
        await throttle.backoff("busy.example")
        await throttle._redis.aclose()  # the client it made: left open, its socket would leak

    asyncio.run(run())
    client = redis.Redis.from_url(REDIS_URL)
    assert client.smembers("mailer:throttle:backoffs") == {b"busy.example"}
    client.close()


class CountingRedis(redis.asyncio.Redis):
    commands = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("redis_db")
def test_no_redis_round_trip_for_an_unthrottled_domain() -> None:
    async def run() -> int:
        client = CountingRedis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        throttle = RedisThrottle(client, rate_limit=0, domain_limits=[("slow.example", 5)])
        for _ in range(1000):
            await throttle.acquire("fast.example")
        await client.aclose()
        return client.commands

    assert asyncio.run(run()) == 1  # reading the set of backed-off domains, once


def test_redis_down_is_a_transient_delivery_error() -> None:
    async def run() -> None:
        no_retries = Retry(NoBackoff(), 0)
        client = redis.asyncio.Redis(host="127.0.0.1", port=free_port(), retry=no_retries)
        throttle = RedisThrottle(client, rate_limit=10, domain_limits=())
        with pytest.raises(TransientDeliveryError, match="rate limiter: Redis failed"):
            await throttle.acquire("example.org")
        await client.aclose()

    asyncio.run(run())


def test_without_a_limit_redis_down_costs_nothing() -> None:
    async def run() -> None:
        no_retries = Retry(NoBackoff(), 0)
        client = redis.asyncio.Redis(host="127.0.0.1", port=free_port(), retry=no_retries)
        throttle = RedisThrottle(
            client, rate_limit=0, domain_limits=(), backoff=BackoffPolicy(refresh=0.0)
        )
        for _ in range(3):  # every acquire rereads the back-offs, and finds Redis away
            await throttle.acquire("example.org")
        await throttle.backoff("busy.example")  # kept here, not shared: the reader is deferred
        await client.aclose()

    asyncio.run(run())


@pytest.mark.subprocess
def test_a_frozen_redis_fails_every_waiting_lane_in_one_timeout(tmp_path: Path) -> None:
    """A Redis that keeps its connections but stops answering (SIGSTOP: a partition, a stalled
    VM): the lanes queued behind the take that timed out fail with it, rather than each waiting
    out the timeout in turn (16 lanes x 5 s held a batch for 80 s)."""
    timeout = 0.5

    async def run(url: str, freeze: Callable[[], None]) -> tuple[int, float]:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout)
        throttle = RedisThrottle(client, rate_limit=1000, domain_limits=())
        await throttle.acquire("example.org")  # connected, the script loaded
        freeze()
        start = time.monotonic()
        lanes = [throttle.acquire("example.org") for _ in range(16)]
        results = await asyncio.gather(*lanes, return_exceptions=True)
        elapsed = time.monotonic() - start
        failed = sum(isinstance(r, ThrottleUnavailable) for r in results)
        with contextlib.suppress(redis.RedisError):
            await client.aclose()
        return failed, elapsed

    with RedisServer(tmp_path / "redis") as server:
        try:
            failed, elapsed = asyncio.run(run(server.url, server.freeze))
        finally:
            server.thaw()
    assert failed == 16
    assert elapsed < 4 * timeout, f"the lanes waited {elapsed:.1f} s"


def test_the_worker_s_throttle_client_times_out() -> None:
    settings = load_settings({**DEV, "MAILER_BROKER_URL": REDIS_URL}, env_file=None)
    throttle = RedisThrottle.from_settings(settings)
    options = throttle._redis.connection_pool.connection_kwargs
    assert options["socket_timeout"] == options["socket_connect_timeout"] == REDIS_TIMEOUT_S
