"""Check every part a send needs, and say how to fix what fails (``mailer doctor``)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from mailer import db, heartbeat
from mailer.config import FIELDS, Settings
from mailer.delivery.dispatch import find_workers
from mailer.delivery.dkim import signer_from_settings
from mailer.delivery.smtp import probe
from mailer.errors import BrokerError, MailerError, TransientDeliveryError

BEAT_SILENT_S = 60.0  # the clock ticks every few seconds: a minute of silence means no beat
DEFAULT_SECRET = next(f.default for f in FIELDS if f.env == "MAILER_SECRET_KEY")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def examine(settings: Settings) -> list[Check]:
    """Every check, in order; each says what it saw, or what failed and the fix."""
    return [_check(name, probe_, settings) for name, probe_ in PROBES.items()]


def _check(name: str, probe_: Callable[[Settings], str], config: Settings) -> Check:
    """A probe passes when it returns what it saw; it fails with what went wrong and the fix."""
    try:
        return Check(name, True, probe_(config))
    except _Failed as exc:
        return Check(name, False, str(exc))
    except (MailerError, redis.RedisError, OSError) as exc:
        return Check(name, False, " ".join(str(exc).split()) or type(exc).__name__)


class _Failed(Exception):
    """A check found a problem; the message says what and how to fix it."""


def _database(config: Settings) -> str:
    engine = db.connect(config.database_url)
    try:
        db.check(engine)  # raises with the fix (`mailer db upgrade`) in its message
    finally:
        engine.dispose()
    return f"{db.shown(config.database_url)} answers, schema at revision {db.head()}"


def _redis(config: Settings) -> redis.Redis:
    return redis.Redis.from_url(config.broker_url, socket_timeout=3, socket_connect_timeout=3)


def _broker(config: Settings) -> str:
    _redis(config).ping()
    return f"{db.shown(config.broker_url)} answers"


def _smtp(config: Settings) -> str:
    try:
        asyncio.run(probe(config.smtp, config.smtp_connect_timeout))
    except TransientDeliveryError as exc:
        raise _Failed(f"{exc}; is the server up, and MAILER_SMTP_URL right?") from None
    smtp = config.smtp
    steps = ["EHLO"] + ["STARTTLS"] * smtp.starttls + ["AUTH"] * bool(smtp.username)
    tls = " over TLS" if smtp.implicit_tls else ""
    return f"{smtp.host}:{smtp.port}{tls} answers ({', '.join(steps)})"


def _worker(config: Settings) -> str:
    try:
        names = find_workers().answering(timeout=2.0)
    except BrokerError as exc:
        raise _Failed(f"{exc}; see the broker check") from None
    if not names:
        raise _Failed("no worker answered a ping; start one: `celery -A worker.app worker`")
    return f"{len(names)} worker(s) answered: " + ", ".join(names)


def _beat(config: Settings) -> str:
    last = heartbeat.last_run(_redis(config))
    if last is None:
        raise _Failed("beat never ran here; start exactly one: `celery -A worker.app beat`")
    silent = time.time() - last
    if silent > BEAT_SILENT_S:
        raise _Failed(
            f"beat last ran {silent:.0f}s ago; scheduled sends wait until it runs: "
            "start exactly one `celery -A worker.app beat`"
        )
    return f"beat ran {silent:.0f}s ago"


def _tracker(config: Settings) -> str:
    url = f"{config.tracker_url}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            status = answer.status
    except OSError as exc:
        raise _Failed(
            f"{url}: {getattr(exc, 'reason', exc)}; start `mailer tracker serve` there, "
            "or set MAILER_TRACKER_URL to where readers reach it"
        ) from None
    return f"{url} answers {status}"


def _dkim(config: Settings) -> str:
    signer = signer_from_settings(config)  # a bad key file fails here, naming the setting
    if signer is not None:
        algorithms = ", ".join(key.algorithm for key in signer.keys)
        return f"signing as {config.dkim_domain} (s={config.dkim_selector}; {algorithms})"
    if urlsplit(config.tracker_url).hostname in LOCAL_HOSTS:
        return "off: fine on this machine; Gmail and Yahoo refuse unsigned bulk mail"
    raise _Failed(
        "off: Gmail and Yahoo refuse unsigned bulk mail; `mailer dkim keygen` makes a key, then "
        "set MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR and MAILER_DKIM_KEY_FILE"
    )


def _secret_key(config: Settings) -> str:
    if config.secret_keys[0] != DEFAULT_SECRET:
        return f"set ({len(config.secret_keys)} key(s); the first signs)"
    local = urlsplit(config.tracker_url).hostname in LOCAL_HOSTS
    if local:
        return "the built-in development key: fine on this machine, never for real readers"
    raise _Failed(
        "MAILER_SECRET_KEY is the built-in default: anyone can forge opens, clicks and "
        "unsubscribes; set your own (`mailer secret` prints one) and drop MAILER_ENV=dev"
    )


PROBES: dict[str, Callable[[Settings], str]] = {
    "database": _database,
    "broker": _broker,
    "smtp": _smtp,
    "worker": _worker,
    "beat": _beat,
    "tracker": _tracker,
    "secret_key": _secret_key,
    "dkim": _dkim,
}
