"""Sending rates shared by every worker: a global limit, per-domain limits, automatic back-off.

Buckets. Each limit is a GCRA bucket (the "generic cell rate algorithm" form of a token
bucket), one number: the theoretical arrival time (TAT) of the next message. A message may
go when ``TAT - now <= tolerance``, which moves TAT to ``max(TAT, now) + 1/rate``. The
tolerance is one interval or 50 ms, whichever is longer: a burst of a couple of messages, so
a late wake-up does not cost throughput. ``acquire(domain)`` takes from the global bucket and
the domain's bucket (when the domain has a limit or a back-off) both at once or neither; if
either is not ready it learns how long to wait, sleeps, and asks again. Within a process only
one coroutine per bucket asks at a time (an asyncio lock: first come, first served), so a
queue of waiters costs one round trip per message, not one per waiter and wake-up.

Back-off. ``backoff(domain)``, called when a domain answers 421/450/451/452/454, halves that
domain's rate: from its configured limit or, for a domain without one,
``BackoffPolicy.unlimited_rate`` (capped by the global limit), never below ``floor``. Calls
within ``min_gap`` of the last halving only restart the cool-down, so the refusals of every
message that was in flight count as one. After ``cooldown`` seconds without a back-off the
rate doubles every ``step`` seconds; back at the configured limit (or ``unlimited_rate``) the
back-off is over and the domain is unlimited again if it was.

Fast path. With no global limit, a message to a domain with no limit and no back-off costs no
I/O: the set of backed-off domains is reread at most every ``refresh`` seconds (1 s), so a
back-off reported by another worker takes effect here within that time.

Without Redis. Reading the set of back-offs and reporting one never fail a batch: while Redis
is away the throttle keeps the back-offs it knew and its own, so with no limit configured a
Redis outage costs nothing. Only taking from a configured limit needs Redis, and raises
``ThrottleUnavailable`` (a ``TransientDeliveryError``) when it does not answer within
``REDIS_TIMEOUT_S`` (the batch stops and is retried). The callers queued behind that take on
the bucket's lock then raise at once: each would otherwise wait out the timeout in turn, and
sixteen lanes held a batch for as long as Redis was away.

``RedisThrottle`` keeps the state in Redis so that every worker process shares it; each
attempt to take is one EVALSHA of an atomic Lua script that uses Redis's clock, so workers'
clocks need not agree (unless a ``Clock`` is injected: tests drive time by hand that way). Keys
under ``key_prefix``: ``g`` (global TAT, ms), ``d:<domain>`` (domain TAT), ``b:<domain>`` (hash
of the back-off: rate, halved, last) and ``backoffs`` (the set of backed-off domains). All
expire once idle or recovered. ``LocalThrottle`` is the same in one process, for running
without Redis.

Time. Both read the time and wait through a ``Clock`` (``MONOTONIC``: ``time.monotonic`` and
``asyncio.sleep``), so a test can give them one whose ``sleep`` only moves its hands: the
rates, back-offs and recoveries are then checked to the millisecond without waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, Self

import redis.asyncio

from mailer.config import Settings
from mailer.errors import ThrottleUnavailable, translating

log = logging.getLogger(__name__)

MIN_TOLERANCE = 0.05  # seconds
_REDIS_FAILED = "rate limiter: Redis failed"
# A Redis that stops answering but keeps the connection (a partition, a stalled VM) would
# otherwise hold every lane of every rate-limited batch for as long as it lasts.
REDIS_TIMEOUT_S = 5.0


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, on a clock that never goes back."""

    async def sleep(self, seconds: float) -> None: ...


class _Monotonic:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


MONOTONIC: Clock = _Monotonic()


class Throttle(Protocol):
    async def acquire(self, domain: str) -> None:
        """Wait until a message to ``domain`` may go."""

    async def backoff(self, domain: str) -> None:
        """``domain`` asked us to slow down (421/450/451/452/454)."""


@dataclass(frozen=True)
class BackoffPolicy:
    floor: float = 1.0  # messages per second a back-off never goes below
    unlimited_rate: float = 100.0  # what a domain without a limit is halved from
    cooldown: float = 30.0  # seconds without a back-off before the rate recovers
    step: float = 10.0  # then the rate doubles every `step` seconds
    min_gap: float = 1.0  # back-offs closer together than this halve only once
    refresh: float = 1.0  # seconds the set of backed-off domains is cached for


DEFAULT_BACKOFF = BackoffPolicy()


def _recovered(rate: float, last: float, now: float, policy: BackoffPolicy) -> float:
    """A backed-off rate, ``now``: doubled for each ``step`` since the cool-down ended."""
    quiet = now - last - policy.cooldown
    return rate if quiet < 0 else rate * 2 ** (math.floor(quiet / policy.step) + 1)


class _Throttle(ABC):
    """The part both throttles share: limits, the fast path, waiting and its locks."""

    def __init__(
        self,
        *,
        rate_limit: float,
        domain_limits: Iterable[tuple[str, float]],
        backoff: BackoffPolicy,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._global = rate_limit
        self._limits = {domain.lower(): rate for domain, rate in domain_limits}
        self._policy = backoff
        unlimited = backoff.unlimited_rate
        self._unlimited_cap = min(unlimited, rate_limit) if rate_limit else unlimited
        self._backed_off: set[str] = set()
        self._refresh_at = 0.0
        self._failures = 0  # takes that failed so far
        self._failure = ""  # why the last one did
        self._refresh_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, domain: str) -> None:
        domain = domain.lower()
        if self._clock.now() >= self._refresh_at:
            await self._refresh()
        own_bucket = domain in self._limits or domain in self._backed_off
        if not (own_bucket or self._global):
            return
        key = domain if own_bucket else ""  # "": the global bucket alone
        lock = self._locks.get(key) or self._locks.setdefault(key, asyncio.Lock())
        failures = self._failures
        async with lock:
            while (wait := await self._take_unless_failed(key, failures)) > 0:
                await self._clock.sleep(wait)

    async def _take_unless_failed(self, key: str, failures: int) -> float:
        """``_take``, unless a take failed since the caller asked (when ``failures`` had
        failed): then fail at once, as it did."""
        if self._failures != failures:
            raise ThrottleUnavailable(self._failure)
        try:
            return await self._take(key)
        except ThrottleUnavailable as exc:
            self._failures += 1
            self._failure = str(exc)
            raise

    async def _refresh(self) -> None:
        # Concurrent callers wait for one read rather than go on with a stale (or empty) set.
        async with self._refresh_lock:
            if self._clock.now() >= self._refresh_at:
                try:
                    self._backed_off = await self._backed_off_domains()
                except ThrottleUnavailable as exc:
                    # Sending without a limit needs no shared state: carry on with what we knew.
                    log.warning("%s; using the back-offs known so far", exc)
                self._refresh_at = self._clock.now() + self._policy.refresh

    async def backoff(self, domain: str) -> None:
        domain = domain.lower()
        self._backed_off.add(domain)
        try:
            await self._backoff(domain, self._cap(domain))
        except ThrottleUnavailable as exc:
            # The reader is deferred all the same; only other workers miss the slow-down.
            log.warning("%s; back-off of %s not shared", exc, domain)

    def _cap(self, domain: str) -> float:
        """The rate a back-off of ``domain`` starts from and recovers to."""
        return self._limits.get(domain) or self._unlimited_cap

    @abstractmethod
    async def _backed_off_domains(self) -> set[str]: ...

    @abstractmethod
    async def _take(self, domain: str) -> float:
        """Take from the global bucket and ``domain``'s (if not ""): 0, or seconds to wait."""

    @abstractmethod
    async def _backoff(self, domain: str, cap: float) -> None: ...


_LUA_RECOVERED = """
local function recovered(rate, last, now, cooldown, step)
  local quiet = now - last - cooldown
  if quiet < 0 then return rate end
  return rate * 2 ^ (math.floor(quiet / step) + 1)
end
local now = tonumber(ARGV[#ARGV])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + t[2] / 1000
end
"""

# KEYS: global TAT, domain TAT, domain back-off, back-off set.
# ARGV: global rate, domain rate (0: none), domain ('' for the global bucket only), the
# domain's cap, cooldown (ms), step (ms), minimum tolerance (ms), now (ms; '': Redis's clock).
# Returns ms to wait, or 0.
_LUA_TAKE = (
    _LUA_RECOVERED
    + """
local grate, drate, domain = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local cooldown, step = tonumber(ARGV[5]), tonumber(ARGV[6])
if domain ~= '' then
  local b = redis.call('HMGET', KEYS[3], 'rate', 'last')
  if b[1] then
    local rate = recovered(tonumber(b[1]), tonumber(b[2]), now, cooldown, step)
    if rate >= tonumber(ARGV[4]) then
      redis.call('DEL', KEYS[3])
      redis.call('SREM', KEYS[4], domain)
    else
      drate = rate
    end
  elseif drate == 0 then
    redis.call('SREM', KEYS[4], domain)
  end
end
local tats, wait = {}, 0
for i, rate in ipairs({grate, drate}) do
  if rate > 0 then
    local interval = 1000 / rate
    local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or now, now)
    wait = math.max(wait, tat - now - math.max(interval, tonumber(ARGV[7])))
    tats[i] = tat + interval
  end
end
if wait > 0 then return math.ceil(wait) end
for i, tat in pairs(tats) do
  redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
return 0
"""
)

# KEYS: domain back-off, back-off set. ARGV: domain, cap, floor, min gap (ms), cooldown (ms),
# step (ms), now (ms; '': Redis's clock).
_LUA_BACKOFF = (
    _LUA_RECOVERED
    + """
local cap, floor, gap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cooldown, step = tonumber(ARGV[5]), tonumber(ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'rate', 'halved', 'last')
local rate, halved = cap, nil
if b[1] then
  rate = math.min(cap, recovered(tonumber(b[1]), tonumber(b[3]), now, cooldown, step))
  halved = tonumber(b[2])
end
if not halved or now - halved >= gap then
  rate = math.min(cap, math.max(floor, rate / 2))
  halved = now
end
redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'halved', string.format('%.3f', halved),
  'last', string.format('%.3f', now))
local doublings = math.max(0, math.ceil(math.log(cap / rate) / math.log(2)))
redis.call('PEXPIRE', KEYS[1], math.ceil(cooldown + step * doublings) + 1000)
redis.call('SADD', KEYS[2], ARGV[1])
return 0
"""
)


class RedisThrottle(_Throttle):
    """Limits shared by every worker through Redis. Redis errors raise
    ``ThrottleUnavailable``."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        rate_limit: float,
        domain_limits: Iterable[tuple[str, float]],
        key_prefix: str = "mailer:throttle:",
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        clock: Clock | None = None,
    ) -> None:
        """``clock`` None: the buckets keep Redis's time (shared by every worker), the waits
        are real; a ``Clock`` (tests) serves for both."""
        super().__init__(
            rate_limit=rate_limit,
            domain_limits=domain_limits,
            backoff=backoff,
            clock=clock or MONOTONIC,
        )
        self._redis = redis
        self._own_time = clock is not None
        self._prefix = key_prefix
        self._set = key_prefix + "backoffs"
        self._take_script = redis.register_script(_LUA_TAKE)
        self._backoff_script = redis.register_script(_LUA_BACKOFF)
        self._recovery_ms = (1000 * backoff.cooldown, 1000 * backoff.step)

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff: BackoffPolicy = DEFAULT_BACKOFF) -> Self:
        """The limits in ``settings``, kept in the Redis that is the Celery broker."""
        client = redis.asyncio.Redis.from_url(
            settings.broker_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        return cls(
            client,
            rate_limit=settings.rate_limit,
            domain_limits=settings.domain_limits,
            backoff=backoff,
        )

    def _now_ms(self) -> str | float:
        return 1000 * self._clock.now() if self._own_time else ""

    async def _backed_off_domains(self) -> set[str]:
        with translating(_REDIS_FAILED, as_=ThrottleUnavailable):
            members = await self._redis.smembers(self._set)
        return {m.decode() if isinstance(m, bytes) else m for m in members}

    async def _take(self, domain: str) -> float:
        p = self._prefix
        keys = [p + "g", p + "d:" + domain, p + "b:" + domain, self._set]
        args: list[str | float] = [
            self._global,
            self._limits.get(domain, 0),
            domain,
            self._cap(domain),
            *self._recovery_ms,
            1000 * MIN_TOLERANCE,
            self._now_ms(),
        ]
        with translating(_REDIS_FAILED, as_=ThrottleUnavailable):
            wait_ms = await self._take_script(keys, args)
        return int(wait_ms) / 1000

    async def _backoff(self, domain: str, cap: float) -> None:
        policy = self._policy
        keys = [self._prefix + "b:" + domain, self._set]
        args: list[str | float] = [
            domain,
            cap,
            policy.floor,
            1000 * policy.min_gap,
            *self._recovery_ms,
            self._now_ms(),
        ]
        with translating(_REDIS_FAILED, as_=ThrottleUnavailable):
            await self._backoff_script(keys, args)


@dataclass
class _Backoff:
    rate: float
    halved: float
    last: float


class LocalThrottle(_Throttle):
    """The same limits within one process, for running without Redis."""

    def __init__(
        self,
        *,
        rate_limit: float,
        domain_limits: Iterable[tuple[str, float]],
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        clock: Clock = MONOTONIC,
    ) -> None:
        super().__init__(
            rate_limit=rate_limit, domain_limits=domain_limits, backoff=backoff, clock=clock
        )
        self._tats: dict[str, float] = {}  # "": the global bucket
        self._backoffs: dict[str, _Backoff] = {}

    async def _backed_off_domains(self) -> set[str]:
        return set(self._backoffs)

    async def _take(self, domain: str) -> float:
        now = self._clock.now()
        rates = {"": self._global}
        if domain:
            rates[domain] = self._limits.get(domain, 0.0)
            state = self._backoffs.get(domain)
            if state is not None:
                rate = _recovered(state.rate, state.last, now, self._policy)
                if rate >= self._cap(domain):
                    del self._backoffs[domain]
                else:
                    rates[domain] = rate
        tats: dict[str, float] = {}
        wait = 0.0
        for key, rate in rates.items():
            if rate > 0:
                interval = 1 / rate
                tat = max(self._tats.get(key, now), now)
                wait = max(wait, tat - now - max(interval, MIN_TOLERANCE))
                tats[key] = tat + interval
        if wait > 0:
            return wait
        self._tats.update(tats)
        return 0.0

    async def _backoff(self, domain: str, cap: float) -> None:
        now = self._clock.now()
        state = self._backoffs.get(domain)
        if state is None:
            state = self._backoffs[domain] = _Backoff(cap, -math.inf, now)
        rate = min(cap, _recovered(state.rate, state.last, now, self._policy))
        if now - state.halved >= self._policy.min_gap:
            rate = min(cap, max(self._policy.floor, rate / 2))
            state.halved = now
        state.rate, state.last = rate, now
