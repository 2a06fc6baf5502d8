"""Throttles: measured rates, back-off and recovery, sharing through the real Redis.

Redis tests use database 13 of the test server (conftest.redis_url) and flush only that one.
Rates are kept small (10-40 messages/s) and the bounds tolerant: these are wall-clock tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import DEV, REDIS_HOST, REDIS_PORT, own_redis, redis_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from smtp_servers import closed_port

from mailer.config import load_settings
from mailer.delivery.throttle import (
    MIN_TOLERANCE,
    BackoffPolicy,
    LocalThrottle,
    RedisThrottle,
    Throttle,
)
from mailer.errors import TransientDeliveryError

DB = 13
PREFIX = "test:throttle:"


@pytest.fixture
def clean_redis() -> Iterator[None]:
    with own_redis(redis_url(DB)):
        yield


@pytest.fixture(params=["redis", "local"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("clean_redis")
    return str(request.param)


@contextlib.asynccontextmanager
async def throttles(kind: str, workers: int = 1, **options: Any) -> AsyncIterator[list[Throttle]]:
    """``workers`` throttles sharing state, as separate worker processes would."""
    options = {"rate_limit": 0.0, "domain_limits": (), **options}
    if kind == "local":
        assert workers == 1, "a LocalThrottle shares nothing"
        yield [LocalThrottle(**options)]
        return
    clients = [redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB) for _ in range(workers)]
    try:
        yield [RedisThrottle(client, key_prefix=PREFIX, **options) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


async def timed(throttle: Throttle, domain: str, count: int, concurrency: int = 4) -> float:
    """Seconds that ``count`` acquires, ``concurrency`` at a time, took."""
    remaining = iter(range(count))

    async def sender() -> None:
        for _ in remaining:
            await throttle.acquire(domain)

    start = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.monotonic() - start


def assert_paced(seconds: float, count: int, rate: float) -> None:
    """``count`` messages took as long as ``rate`` allows after a rested bucket's burst."""
    burst = 1 + max(1, int(MIN_TOLERANCE * rate))
    expected = (count - burst) / rate
    assert 0.75 * expected <= seconds <= 1.3 * expected + 0.05, (
        f"{count} messages took {seconds:.3f}s; at {rate}/s: {expected:.3f}s"
    )


async def assert_pace(throttle: Throttle, domain: str, count: int, rate: float) -> None:
    assert_paced(await timed(throttle, domain, count), count, rate)


async def is_unthrottled(throttle: Throttle, domain: str) -> bool:
    return await timed(throttle, domain, 1000, concurrency=1) < 0.25


def test_global_limit(kind: str) -> None:
    async def run() -> None:
        async with throttles(kind, rate_limit=20) as [throttle]:
            await assert_pace(throttle, "example.org", 21, 20)

    asyncio.run(run())


def test_a_domain_limit_leaves_other_domains_alone(kind: str) -> None:
    async def run() -> None:
        async with throttles(kind, domain_limits=[("Slow.example", 10)]) as [throttle]:
            await assert_pace(throttle, "slow.EXAMPLE", 11, 10)
            assert await is_unthrottled(throttle, "fast.example")

    asyncio.run(run())


def test_backoff_halves_once_per_burst_then_recovers_by_doubling(kind: str) -> None:
    policy = BackoffPolicy(cooldown=0.5, step=0.5, min_gap=0.25, refresh=0.05)

    async def run() -> None:
        async with throttles(kind, domain_limits=[("slow.example", 80)], backoff=policy) as [th]:
            await th.backoff("slow.example")
            await th.backoff("slow.example")  # the same burst of refusals: halved once
            start = time.monotonic()
            await assert_pace(th, "slow.example", 11, 40)
            await asyncio.sleep(0.3 - (time.monotonic() - start))
            await th.backoff("slow.example")  # a new burst: 20/s, and the cool-down restarts
            start = time.monotonic()
            await assert_pace(th, "slow.example", 6, 20)
            await asyncio.sleep(0.55 - (time.monotonic() - start))
            await assert_pace(th, "slow.example", 9, 40)  # cooled down: doubled
            await asyncio.sleep(1.05 - (time.monotonic() - start))
            await assert_pace(th, "slow.example", 21, 80)  # back to the limit

    asyncio.run(run())


def test_backoff_of_a_domain_without_a_limit(kind: str) -> None:
    policy = BackoffPolicy(unlimited_rate=20, refresh=0.05)

    async def run() -> None:
        async with throttles(kind, backoff=policy) as [throttle]:
            assert await is_unthrottled(throttle, "busy.example")
            await throttle.backoff("busy.example")
            await assert_pace(throttle, "busy.example", 11, 10)
            assert await is_unthrottled(throttle, "other.example")

    asyncio.run(run())


def test_backoff_never_goes_below_the_floor(kind: str) -> None:
    policy = BackoffPolicy(floor=10, min_gap=0, refresh=0.05)

    async def run() -> None:
        async with throttles(kind, domain_limits=[("slow.example", 40)], backoff=policy) as [th]:
            for _ in range(5):
                await th.backoff("slow.example")
            await assert_pace(th, "slow.example", 6, 10)

    asyncio.run(run())


@pytest.mark.usefixtures("clean_redis")
def test_two_workers_share_one_global_limit() -> None:
    async def run() -> None:
        async with throttles("redis", workers=2, rate_limit=20) as [first, second]:
            start = time.monotonic()
            await asyncio.gather(timed(first, "a.example", 11), timed(second, "b.example", 11))
            assert_paced(time.monotonic() - start, 22, 20)

    asyncio.run(run())


@pytest.mark.usefixtures("clean_redis")
def test_a_backoff_reaches_every_worker() -> None:
    policy = BackoffPolicy(unlimited_rate=20, refresh=0.05)

    async def run() -> None:
        async with throttles("redis", workers=2, backoff=policy) as [first, second]:
            assert await is_unthrottled(second, "busy.example")
            await first.backoff("busy.example")
            await asyncio.sleep(0.1)  # the other worker rereads the back-offs
            await assert_pace(second, "busy.example", 11, 10)

    asyncio.run(run())


@pytest.mark.usefixtures("clean_redis")
def test_from_settings_keeps_state_in_the_broker_redis() -> None:
    environ = {
        **DEV,
        "MAILER_BROKER_URL": redis_url(DB),
        "MAILER_DOMAIN_LIMITS": "slow.example=10/s",
    }
    settings = load_settings(environ, env_file=None)

    async def run() -> None:
        throttle = RedisThrottle.from_settings(settings)
        await assert_pace(throttle, "slow.example", 6, 10)
        await throttle.backoff("busy.example")

    asyncio.run(run())
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    assert client.smembers("mailer:throttle:backoffs") == {b"busy.example"}
    client.close()


class CountingRedis(redis.asyncio.Redis):
    commands = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("clean_redis")
def test_no_redis_round_trip_for_an_unthrottled_domain() -> None:
    async def run() -> int:
        client = CountingRedis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
        throttle = RedisThrottle(client, rate_limit=0, domain_limits=[("slow.example", 5)])
        for _ in range(1000):
            await throttle.acquire("fast.example")
        await client.aclose()
        return client.commands

    assert asyncio.run(run()) == 1  # reading the set of backed-off domains, once


def test_redis_down_is_a_transient_delivery_error() -> None:
    async def run() -> None:
        no_retries = Retry(NoBackoff(), 0)
        client = redis.asyncio.Redis(host="127.0.0.1", port=closed_port(), retry=no_retries)
        throttle = RedisThrottle(client, rate_limit=10, domain_limits=())
        with pytest.raises(TransientDeliveryError, match="rate limiter: Redis failed"):
            await throttle.acquire("example.org")
        await client.aclose()

    asyncio.run(run())


def test_without_a_limit_redis_down_costs_nothing() -> None:
    async def run() -> None:
        no_retries = Retry(NoBackoff(), 0)
        client = redis.asyncio.Redis(host="127.0.0.1", port=closed_port(), retry=no_retries)
        throttle = RedisThrottle(
            client, rate_limit=0, domain_limits=(), backoff=BackoffPolicy(refresh=0.0)
        )
        for _ in range(3):  # every acquire rereads the back-offs, and finds Redis away
            await throttle.acquire("example.org")
        await throttle.backoff("busy.example")  # kept here, not shared: the reader is deferred
        await client.aclose()

    asyncio.run(run())
