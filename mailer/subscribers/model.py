"""Subscriber values: addresses, tiers, statuses, dates, tags, and the dataclasses handed out.

Everything here is pure (no database), so the importer and the management commands share
exactly the same rules for what a valid value is.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from email_validator import SPECIAL_USE_DOMAIN_NAMES as _SPECIAL_USE
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from mailer.errors import InputError
from mailer.vocabulary import SUBSCRIBER_STATUSES, TIERS, SubscriberStatus, Tier

TAG_MAX = 100  # subscriber_tags.tag is VARCHAR(100)
_Choice = TypeVar("_Choice", bound=str)  # a tier or a status
DNS_TIMEOUT = 5  # seconds per domain; a timeout leaves the address accepted (unknown)


@dataclass(frozen=True)
class Address:
    """An address normalised by email-validator."""

    email: str  # as normalised: the local part keeps its case, the domain is lower-cased
    key: str  # lower-cased: unique regardless of case, and the lookup key
    domain: str  # domain part of ``key``

    @property
    def hash(self) -> str:
        """What ``suppressions`` keeps of an erased address."""
        return email_hash(self.key)


@dataclass(frozen=True)
class Subscriber:
    id: int
    email: str
    email_key: str
    domain: str
    name: str | None
    tier: Tier
    status: SubscriberStatus
    trial_ends_at: dt.datetime | None
    tags: tuple[str, ...]  # sorted
    attributes: Mapping[str, Any]
    source: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class SubscriberEvent:
    kind: str  # tier_changed, status_changed, …
    old: str | None  # None when the reader was created
    new: str | None
    at: dt.datetime


def email_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# Plain ASCII addresses whose normal form email-validator would give as local@domain.lower():
# a dot-atom local part and a domain of ordinary labels whose last ends with a letter.
_PLAIN = re.compile(
    rf"{_ATEXT}(?:\.{_ATEXT})*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?:[A-Za-z0-9][A-Za-z0-9-]{0,61})?[A-Za-z]"
)
_SPECIAL_TLDS = frozenset(name.rsplit(".", 1)[-1] for name in _SPECIAL_USE)
_CASELESS_LOCAL = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def split_address(text: str, *, check_dns: bool = False) -> tuple[str, str, str]:
    """``(email, key, domain)`` for ``text``, or ``InputError`` saying what is wrong.

    email-validator costs ~30 µs an address, too much for a million-row import; most
    addresses are plain ASCII, for which its result is known without calling it. Anything
    unusual (non-ASCII, quoting, ``--``/Punycode, special-use or role names such as info@,
    long addresses) goes through email-validator; a test checks the two agree.
    """
    text = text.strip()
    if len(text) <= 254 and text.isascii() and _PLAIN.fullmatch(text):
        local, _, domain = text.rpartition("@")
        domain = domain.lower()
        if (
            len(local) <= 64
            and "--" not in domain
            and domain.rpartition(".")[2] not in _SPECIAL_TLDS
            and local.lower() not in _CASELESS_LOCAL
        ):
            if check_dns:
                _check_domain(domain, domain)
            email = f"{local}@{domain}"
            return email, email.lower(), domain
    try:
        valid = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InputError(f"bad address {text!r}: {exc}") from None
    if check_dns and valid.ascii_domain:
        _check_domain(valid.ascii_domain, valid.domain)
    key = valid.normalized.lower()
    return valid.normalized, key, key.rpartition("@")[2]


def normalise_email(text: str, *, check_dns: bool = False) -> Address:
    """``text`` checked (syntax only, unless ``check_dns``) and normalised."""
    return Address(*split_address(text, check_dns=check_dns))


def lookup_key(text: str) -> str:
    """The key to find ``text`` by: its normal form, or, if it is not valid, lower-cased."""
    try:
        return split_address(text)[1]
    except InputError:
        return text.strip().lower()


def _check_domain(ascii_domain: str, domain: str) -> None:
    problem = _domain_problem(ascii_domain, domain)
    if problem:
        raise InputError(f"bad address domain {domain!r}: {problem}")


@functools.lru_cache(maxsize=65536)  # one DNS lookup per domain, not per address
def _domain_problem(ascii_domain: str, domain: str) -> str | None:
    from email_validator.deliverability import validate_email_deliverability

    try:
        validate_email_deliverability(ascii_domain, domain, timeout=DNS_TIMEOUT)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def parse_tier(text: str) -> Tier:
    return _one_of(text, TIERS, "tier")


def parse_status(text: str) -> SubscriberStatus:
    return _one_of(text, SUBSCRIBER_STATUSES, "status")


def _one_of(text: str, values: tuple[_Choice, ...], what: str) -> _Choice:
    value = text.strip().lower()
    for known in values:
        if known == value:
            return known
    expected = f"{', '.join(values[:-1])} or {values[-1]}"
    raise InputError(f"unknown {what} {text!r} (expected {expected})")


def parse_when(text: str, what: str) -> dt.datetime:
    """An ISO date (midnight UTC) or datetime (UTC when it has no offset)."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"bad {what} {text!r} (expected an ISO date such as 2026-05-01 "
            "or a datetime such as 2026-05-01T09:30:00Z)"
        ) from None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


_TAG_SEPARATORS = re.compile(r"[;|]")


def parse_tags(values: Iterable[str]) -> tuple[str, ...]:
    """Tags from CSV cells or options, each split at ``;`` or ``|``.

    Trimmed (inner white space folded), blanks and duplicates dropped, case kept.
    """
    tags = (" ".join(tag.split()) for value in values for tag in _TAG_SEPARATORS.split(value))
    cleaned = tuple(dict.fromkeys(tag for tag in tags if tag))
    for tag in cleaned:
        if len(tag) > TAG_MAX:
            raise InputError(f"tag {tag[:20]!r}… is longer than {TAG_MAX} characters")
    return cleaned


def clean_name(text: str) -> str | None:
    """White space folded (a CSV cell may hold newlines); blank is no name."""
    return " ".join(text.split()) or None
