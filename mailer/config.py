"""Settings, read once from ``MAILER_*`` environment variables and an optional ``.env`` file.

This is the only module that reads the environment. Everything else receives a ``Settings``.
A bad value raises ``ConfigError`` with one line that names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from email.utils import formataddr, parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from mailer.errors import ConfigError

PREFIX = "MAILER_"
DEV_SECRET_KEY = "dev-only-secret-change-me"  # public: signs nothing outside MAILER_ENV=dev
MIN_KEY_BYTES = 32  # outside dev: 256 bits, HMAC-SHA256's own key size
Secret = Literal["url", "whole"] | None  # how a setting is masked: its password, or all of it


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of logged reprs
    implicit_tls: bool = False
    starttls: bool = False


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    smtp: SmtpSettings
    from_address: str
    publication_name: str
    postal_address: str
    site_url: str
    tracker_url: str
    secret_keys: tuple[str, ...]
    smtp_concurrency: int
    smtp_connect_timeout: float
    smtp_command_timeout: float
    smtp_data_timeout: float
    rate_limit: float  # messages per second across all workers; 0: no limit
    domain_limits: tuple[tuple[str, float], ...]  # (recipient domain, messages per second)
    retry_attempts: int
    retry_max_age: float  # seconds
    retry_backoff: float  # seconds before the first retry; doubles with each attempt
    batch_size: int
    batch_lease: float  # seconds a batch stays claimed by a worker that stopped heartbeating
    schedule_grace: float  # seconds late a scheduled send may still start; later it is missed
    timezone: str  # an IANA zone: `--at` times without an offset are read in it
    language: str  # a BCP 47 tag: the emails' lang attribute
    stripe_webhook_secret: str  # empty: the tracker refuses every webhook
    metrics_token: str  # empty: the tracker's /metrics answers anyone
    log_format: str  # "text" or "json": how the worker, beat and the tracker write log lines
    attribution_days: int
    tracker_flush_interval: float  # seconds between writes of buffered tracking events
    tracker_trust_proxy: bool  # take the client address from X-Forwarded-For
    dkim_domain: str  # empty: messages go out unsigned
    dkim_selector: str
    dkim_key_file: str  # PEM, RSA 2048; read by delivery.dkim, not here
    dkim_ed25519_key_file: str  # optional second signature (RFC 8463)
    dkim_ed25519_selector: str  # empty: the RSA selector with "-ed25519" appended
    feedback_address: str  # where complaint (ARF) reports come; default feedback@ From's domain
    soft_bounce_limit: int  # soft bounces within soft_bounce_days that suppress a reader
    soft_bounce_days: int
    env: str  # "production", or "dev": the built-in and short signing keys are allowed
    debug: bool  # a command's unexpected error prints its traceback
    tracker_max_body: int  # bytes: a larger request body is refused with 413 unread
    post_max_size: int  # bytes of a post file; larger ones are refused

    @property
    def from_email(self) -> str:
        return parseaddr(self.from_address)[1]

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: every secret is masked, as in messages.
        secret = {f.attr: f.secret for f in FIELDS}
        parts = []
        for item in fields(self):
            value = getattr(self, item.name)
            kind = secret.get(item.name)
            if kind == "url" and isinstance(value, str):
                value = masked(value)
            elif kind == "whole" and value:
                value = "***"
            parts.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(parts)})"


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")
    return value.strip()


def _optional_email(value: str) -> str:
    address = value.strip()
    local, _, domain = address.rpartition("@")
    if address and (not local or "." not in domain or any(ch in address for ch in " <>\r\n\0")):
        raise ValueError("must be a bare address like feedback@example.com")
    return address


def _optional_word(value: str) -> str:
    if any(ch.isspace() for ch in value.strip()):
        raise ValueError("must not contain whitespace")
    return value.strip()


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def dns_name(value: str) -> str:
    """``value`` as a DNS name, without a final dot. A DKIM domain or selector goes as it is
    into the signature's tags and the record's name, so nothing else may pass (RFC 6376 3.1)."""
    name = value.strip().removesuffix(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            "must be a DNS name: letters, digits and hyphens between dots (an international "
            "name in its xn-- form)"
        )
    return name


def _optional_dns_name(value: str) -> str:
    return dns_name(value) if value.strip() else ""


def _database_url(value: str) -> str:
    scheme = value.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        return value
    if scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ValueError("must start with sqlite:/// or postgresql://")
    try:
        urlsplit(value).port  # noqa: B018 -- parsing it is the check
    except ValueError:
        raise ValueError("has a bad port") from None
    # Users write the URL their other tools take; we always talk to PostgreSQL through psycopg 3.
    return "postgresql+psycopg:" + value.split(":", 1)[1]


def _broker_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "memory") or (
        parts.scheme != "memory" and not parts.hostname
    ):
        raise ValueError("must be redis://host:port/db (or rediss://)")
    return value


def _smtp_url(value: str) -> SmtpSettings:
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("must be smtp://[user:pass@]host[:port] or smtps://...")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a bad port") from None
    implicit = parts.scheme == "smtps"
    query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ValueError(f"has unknown option {sorted(unknown)[0]!r} (known: starttls)")
    if query.get("starttls", "false") not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("starttls must be true or false")
    starttls = query.get("starttls", "false") in ("true", "1", "yes")
    if implicit and starttls:
        raise ValueError("smtps:// already uses TLS; drop ?starttls=true")
    return SmtpSettings(
        host=parts.hostname,
        port=port or (465 if implicit else 25),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        implicit_tls=implicit,
        starttls=starttls,
    )


def _address(value: str) -> str:
    name, email = parseaddr(value)
    local, _, domain = email.rpartition("@")
    if not local or "." not in domain or any(ch in value for ch in "\r\n\0"):
        raise ValueError("must be an address like 'Name <news@example.com>'")
    return formataddr((name, email)) if name else email


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def _secret_keys(value: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in value.split(","))
    if not keys or any(len(k) < 16 for k in keys):
        raise ValueError(
            "each comma-separated key must be at least 16 characters"
            f" ({MIN_KEY_BYTES} bytes outside MAILER_ENV=dev; `mailer secret` prints one)"
        )
    return keys


def masked(text: str) -> str:
    """``text`` (a URL, or a message with URLs in it) as it may appear in messages, logs and
    ``--json``: every password in a URL is ``***``."""
    text = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


# scheme://user:PASSWORD@ (to the last @ before any query: a password may hold an unescaped @)
_USERINFO_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^/?#@:\s]*:)[^?#\s]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pass|pwd|secret|token)=)[^&#]*", re.I)


def _env(value: str) -> str:
    text = value.strip().lower()
    if text not in ("dev", "production"):
        raise ValueError("must be production or dev")
    return text


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def _size(value: str) -> int:
    """Bytes from '1048576', '512KB', '1MB' or '2 MB' (K, M and G are 1024-based)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b)?\s*", value, re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise ValueError("must be a positive size such as 512KB, 1MB or 1048576 (bytes)")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not a known IANA time zone, such as UTC or Europe/Paris") from None
    return value.strip()


def _language(value: str) -> str:
    tag = value.strip()
    if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*", tag):
        raise ValueError("must be a language tag such as en, fr or pt-BR")
    return tag


def _log_format(value: str) -> str:
    text = value.strip().lower()
    if text not in ("text", "json"):
        raise ValueError("must be text or json")
    return text


def _optional_secret(value: str) -> str:
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain whitespace")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(value: str) -> float:
    """Seconds from '30', '30s', '500ms', '15m', '24h' or '2d'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("must be a positive duration such as 30s, 15m or 24h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _rate(value: str) -> float:
    """Messages per second from '50', '50/s', '600/m' or '10000/h'; 0 means no limit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*", value)
    if not match:
        raise ValueError("must be a rate such as 50/s, 600/m or 0 for no limit")
    return float(match.group(1)) / _UNITS[match.group(2) or "s"]


def _domain_limits(value: str) -> tuple[tuple[str, float], ...]:
    limits: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        domain, sep, rate = item.partition("=")
        domain = domain.strip().lower()
        if not sep or not re.fullmatch(r"[a-z0-9.-]+\.[a-z0-9-]+", domain):
            raise ValueError(f"{item!r} is not domain=rate, e.g. gmail.com=50/s")
        limits[domain] = _rate(rate)
        if limits[domain] <= 0:
            raise ValueError(f"{item!r}: a domain limit must be above 0")
    return tuple(limits.items())


@dataclass(frozen=True)
class Field:
    env: str
    attr: str
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: Secret = None  # never shown whole: in messages, logs, reprs and --json


FIELDS: tuple[Field, ...] = (
    Field(
        "MAILER_ENV",
        "env",
        _env,
        "production",
        "dev allows the built-in and short signing keys, for development only",
    ),
    Field(
        "MAILER_DEBUG",
        "debug",
        _bool,
        "false",
        "A command's unexpected error prints its traceback (else one error line)",
    ),
    Field(
        "MAILER_DATABASE_URL",
        "database_url",
        _database_url,
        "sqlite:///var/mailer.db",
        "SQLAlchemy URL: SQLite file (WAL mode) or postgresql://user@host/db",
        secret="url",
    ),
    Field(
        "MAILER_BROKER_URL",
        "broker_url",
        _broker_url,
        "redis://127.0.0.1:6379/0",
        "Celery broker (Redis)",
        secret="url",
    ),
    Field(
        "MAILER_SMTP_URL",
        "smtp",
        _smtp_url,
        "smtp://127.0.0.1:2525",
        "smtp://user:pass@host:port; smtps:// for implicit TLS; ?starttls=true for STARTTLS",
        secret="url",
    ),
    Field(
        "MAILER_FROM",
        "from_address",
        _address,
        "The Demo Dispatch <newsletter@example.com>",
        "From header of every message",
    ),
    Field(
        "MAILER_PUBLICATION_NAME",
        "publication_name",
        _text,
        "The Demo Dispatch",
        "Shown in the header and paywall",
    ),
    Field(
        "MAILER_POSTAL_ADDRESS",
        "postal_address",
        _text,
        "1 Example Street, Springfield, USA",
        "Postal address in the footer (required by CAN-SPAM)",
    ),
    Field(
        "MAILER_SITE_URL",
        "site_url",
        _http_url,
        "https://example.com",
        "Public site: /subscribe and /sign-in pages live there",
    ),
    Field(
        "MAILER_TRACKER_URL",
        "tracker_url",
        _http_url,
        "http://127.0.0.1:8080",
        "Public base URL of the tracker (opens, clicks, unsubscribes)",
    ),
    Field(
        "MAILER_SECRET_KEY",
        "secret_keys",
        _secret_keys,
        DEV_SECRET_KEY,
        "Comma-separated signing keys, 32+ bytes each (`mailer secret` prints one); the first"
        " signs, all verify (rotation)",
        secret="whole",
    ),
    Field(
        "MAILER_SMTP_CONCURRENCY",
        "smtp_concurrency",
        _int_between(1, 500),
        "16",
        "SMTP connections per worker process",
    ),
    Field(
        "MAILER_SMTP_CONNECT_TIMEOUT",
        "smtp_connect_timeout",
        _duration,
        "10s",
        "Connecting, TLS and greeting",
    ),
    Field(
        "MAILER_SMTP_COMMAND_TIMEOUT",
        "smtp_command_timeout",
        _duration,
        "30s",
        "Each SMTP command's reply",
    ),
    Field(
        "MAILER_SMTP_DATA_TIMEOUT",
        "smtp_data_timeout",
        _duration,
        "120s",
        "The reply to the end of a message's data",
    ),
    Field(
        "MAILER_RATE_LIMIT",
        "rate_limit",
        _rate,
        "0",
        "Messages per second across all workers (kept in Redis); 0 for no limit",
    ),
    Field(
        "MAILER_DOMAIN_LIMITS",
        "domain_limits",
        _domain_limits,
        "",
        "Per recipient domain, e.g. gmail.com=50/s,yahoo.com=20/s",
    ),
    Field(
        "MAILER_RETRY_ATTEMPTS",
        "retry_attempts",
        _int_between(1, 100),
        "6",
        "Attempts per recipient before a deferred message fails",
    ),
    Field(
        "MAILER_RETRY_MAX_AGE",
        "retry_max_age",
        _duration,
        "24h",
        "How long after a send starts a deferred message may still be retried",
    ),
    Field(
        "MAILER_RETRY_BACKOFF",
        "retry_backoff",
        _duration,
        "1m",
        "Wait before the first retry of a deferred message; doubles each attempt, up to 1h",
    ),
    Field(
        "MAILER_BATCH_SIZE",
        "batch_size",
        _int_between(1, 100_000),
        "500",
        "Recipients per batch task",
    ),
    Field(
        "MAILER_BATCH_LEASE",
        "batch_lease",
        _duration,
        "60s",
        "How long a batch stays with a worker that stopped answering before another takes it",
    ),
    Field(
        "MAILER_SCHEDULE_GRACE",
        "schedule_grace",
        _duration,
        "1h",
        "A scheduled send found later than this after its time is marked missed, not started",
    ),
    Field(
        "MAILER_TIMEZONE",
        "timezone",
        _timezone,
        "UTC",
        "IANA time zone (e.g. Europe/Paris) of `mailer send --at` times given without an offset",
    ),
    Field(
        "MAILER_LANGUAGE",
        "language",
        _language,
        "en",
        "Language of the posts (BCP 47: en, fr, pt-BR): the emails' lang, for screen readers",
    ),
    Field(
        "MAILER_STRIPE_WEBHOOK_SECRET",
        "stripe_webhook_secret",
        _optional_secret,
        "",
        "Stripe webhook signing secret (whsec_...); empty: webhooks are refused",
        secret="whole",
    ),
    Field(
        "MAILER_METRICS_TOKEN",
        "metrics_token",
        _optional_secret,
        "",
        "Bearer token the tracker's /metrics requires; empty: /metrics answers anyone",
        secret="whole",
    ),
    Field(
        "MAILER_LOG_FORMAT",
        "log_format",
        _log_format,
        "text",
        "Log lines of the worker, beat and tracker: text, or json (one object per line)",
    ),
    Field(
        "MAILER_ATTRIBUTION_DAYS",
        "attribution_days",
        _int_between(1, 365),
        "30",
        "A trial or conversion is credited to the last click (else human open) this recent",
    ),
    Field(
        "MAILER_TRACKER_FLUSH_INTERVAL",
        "tracker_flush_interval",
        _duration,
        "1s",
        "How often the tracker writes its buffered events to the database",
    ),
    Field(
        "MAILER_TRACKER_TRUST_PROXY",
        "tracker_trust_proxy",
        _bool,
        "false",
        "Behind a reverse proxy: take the reader's address from X-Forwarded-For",
    ),
    Field(
        "MAILER_TRACKER_MAX_BODY",
        "tracker_max_body",
        _size,
        "1MB",
        "The tracker answers 413, unread, to a request body larger than this",
    ),
    Field(
        "MAILER_POST_MAX_SIZE",
        "post_max_size",
        _size,
        "2MB",
        "A post file larger than this is refused",
    ),
    Field(
        "MAILER_DKIM_DOMAIN",
        "dkim_domain",
        _optional_dns_name,
        "",
        "Sign every message with DKIM as this domain (d=); empty: unsigned",
    ),
    Field(
        "MAILER_DKIM_SELECTOR",
        "dkim_selector",
        _optional_dns_name,
        "",
        "DKIM selector (s=): the record is SELECTOR._domainkey.DOMAIN",
    ),
    Field(
        "MAILER_DKIM_KEY_FILE",
        "dkim_key_file",
        _optional_word,
        "",
        "PEM file of the RSA private key (2048 bits; `mailer dkim keygen` makes one)",
    ),
    Field(
        "MAILER_DKIM_ED25519_KEY_FILE",
        "dkim_ed25519_key_file",
        _optional_word,
        "",
        "PEM file of an Ed25519 private key for a second signature (RFC 8463); optional",
    ),
    Field(
        "MAILER_DKIM_ED25519_SELECTOR",
        "dkim_ed25519_selector",
        _optional_dns_name,
        "",
        "Selector of the Ed25519 key (one key per selector); empty: SELECTOR-ed25519",
    ),
    Field(
        "MAILER_FEEDBACK_ADDRESS",
        "feedback_address",
        _optional_email,
        "",
        "Where complaint (ARF) reports come, for `mailer bounces serve`; empty: feedback@ the "
        "From address's domain",
    ),
    Field(
        "MAILER_SOFT_BOUNCE_LIMIT",
        "soft_bounce_limit",
        _int_between(1, 1000),
        "3",
        "A reader with this many soft bounces within MAILER_SOFT_BOUNCE_DAYS is no longer mailed",
    ),
    Field(
        "MAILER_SOFT_BOUNCE_DAYS",
        "soft_bounce_days",
        _int_between(1, 3650),
        "30",
        "The window in which soft bounces are counted",
    ),
)


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> Settings:
    """Build the settings: the environment wins over ``.env``, which wins over the defaults."""
    values = _values(environ, env_file)
    known = {f.env for f in FIELDS}
    # A misspelt variable would otherwise be ignored without a word.
    unknown = sorted(k for k in values if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    parsed: dict[str, Any] = {}
    for field_ in FIELDS:
        raw = values.get(field_.env, field_.default)
        try:
            parsed[field_.attr] = field_.parse(raw)
        except ValueError as exc:
            # Never echo a secret back: keys and passwords end up in logs.
            shown = {None: f" (got {raw!r})", "url": f" (got {masked(raw)!r})", "whole": ""}
            raise ConfigError(f"{field_.env}: {exc}{shown[field_.secret]}") from None
    if not parsed["feedback_address"]:
        domain = parseaddr(parsed["from_address"])[1].rpartition("@")[2]
        parsed["feedback_address"] = f"feedback@{domain}"
    settings = Settings(**parsed)
    _check_secret_keys(settings)
    _check_dkim(settings)
    return settings


def debug_requested(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> bool:
    """``MAILER_DEBUG``, read on its own: the CLI asks when the other settings may be broken."""
    try:
        return _bool(_values(environ, env_file).get("MAILER_DEBUG", "false"))
    except ValueError:
        return False


def _values(environ: Mapping[str, str] | None, env_file: Path | None) -> dict[str, str]:
    return {**_file_values(env_file), **(os.environ if environ is None else environ)}


def _file_values(env_file: Path | None) -> dict[str, str]:
    if env_file is None or not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


Source = Literal["environment", ".env", "default"]


@dataclass(frozen=True)
class Shown:
    """One setting as ``mailer config`` prints it."""

    env: str  # the variable
    value: str  # as given (or the default), secrets masked as in messages and logs
    source: Source
    help: str


def describe(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> tuple[Shown, ...]:
    """Every setting in effect: its value, where it came from and what it does.

    Raises ``ConfigError`` as ``load_settings`` does: a bad value is reported, not shown.
    """
    load_settings(environ, env_file)
    given = os.environ if environ is None else environ
    from_file = _file_values(env_file)
    shown: list[Shown] = []
    for f in FIELDS:
        source: Source = "environment" if f.env in given else ".env"
        raw = given.get(f.env, from_file.get(f.env))
        if raw is None:
            source, raw = "default", f.default
        value = {None: raw, "url": masked(raw), "whole": "***" if raw else ""}[f.secret]
        shown.append(Shown(f.env, value, source, f.help))
    return tuple(shown)


def _check_secret_keys(settings: Settings) -> None:
    """Outside development, refuse a key anyone could know or guess: it forges every token."""
    if settings.env == "dev":
        return
    make_one = "`mailer secret` prints a new random key"
    for key in settings.secret_keys:
        if key == DEV_SECRET_KEY:
            raise ConfigError(
                "MAILER_SECRET_KEY: the built-in development key is public, so anyone could "
                f"forge opens, clicks and unsubscribes; set your own ({make_one}), or "
                "MAILER_ENV=dev on a development machine"
            )
        if len(key.encode()) < MIN_KEY_BYTES:
            raise ConfigError(
                f"MAILER_SECRET_KEY: each key must be at least {MIN_KEY_BYTES} bytes "
                f"outside MAILER_ENV=dev ({make_one})"
            )


def _check_dkim(settings: Settings) -> None:
    """DKIM needs its domain, selector and key together, or none of them."""
    given = {
        "MAILER_DKIM_DOMAIN": settings.dkim_domain,
        "MAILER_DKIM_SELECTOR": settings.dkim_selector,
        "MAILER_DKIM_KEY_FILE": settings.dkim_key_file,
    }
    missing = [name for name, value in given.items() if not value]
    if settings.dkim_ed25519_key_file and not settings.dkim_key_file:
        raise ConfigError("MAILER_DKIM_ED25519_KEY_FILE: set MAILER_DKIM_KEY_FILE (RSA) too")
    if missing and len(missing) < len(given):
        raise ConfigError(
            f"{missing[0]}: required with {', '.join(sorted(set(given) - set(missing)))}"
        )
