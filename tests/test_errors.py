"""The error tree's table of foreign errors: every entry names a real class, and maps as drawn."""

from __future__ import annotations

import importlib

import aiosmtplib
import pytest
import redis
import sqlalchemy.exc

from mailer import errors
from mailer.errors import (
    BrokerError,
    DatabaseError,
    LedgerUnavailable,
    MailerError,
    PermanentDeliveryError,
    SmtpConnectError,
    ThrottleUnavailable,
    TransientDeliveryError,
    foreign,
    translated,
    translating,
)


@pytest.mark.parametrize("name", sorted({name for name, _, _ in errors.FOREIGN}))
def test_every_foreign_entry_names_an_exception_class(name: str) -> None:
    module, _, cls = name.rpartition(".")
    found = getattr(importlib.import_module(module), cls)
    assert issubclass(found, Exception)


@pytest.mark.parametrize(
    ("exc", "ours"),
    [
        (aiosmtplib.SMTPAuthenticationError(535, "no"), PermanentDeliveryError),
        (aiosmtplib.SMTPResponseException(554, "go away"), PermanentDeliveryError),
        (aiosmtplib.SMTPResponseException(421, "busy"), SmtpConnectError),
        (aiosmtplib.SMTPConnectTimeoutError("slow"), SmtpConnectError),
        (aiosmtplib.SMTPServerDisconnected("gone"), SmtpConnectError),
        (aiosmtplib.SMTPNotSupported("no STARTTLS"), PermanentDeliveryError),
        (redis.ConnectionError("refused"), BrokerError),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("gone\nmore")), DatabaseError),
        (ValueError("ours to see"), None),
        (OSError("unlisted"), None),
    ],
)
def test_foreign_errors_map_as_the_table_says(exc: Exception, ours: type | None) -> None:
    assert foreign(exc) is ours


def test_translated_keeps_the_drivers_first_line_and_a_narrower_class() -> None:
    exc = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed\ndetail"))
    error = translated(exc, "ledger database", as_=LedgerUnavailable)
    assert isinstance(error, LedgerUnavailable)
    assert isinstance(error, DatabaseError) and isinstance(error, TransientDeliveryError)
    assert str(error) == "ledger database: server closed"
    with pytest.raises(TypeError, match="not a kind of BrokerError"):
        translated(redis.ConnectionError("x"), "x", as_=LedgerUnavailable)


def test_translating_chains_foreign_errors_and_lets_others_through() -> None:
    with (
        pytest.raises(ThrottleUnavailable, match=r"^rate limiter: refused$") as info,
        translating("rate limiter", as_=ThrottleUnavailable),
    ):
        raise redis.ConnectionError("refused")
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert isinstance(info.value, BrokerError) and isinstance(info.value, MailerError)
    with pytest.raises(KeyError), translating("anything"):
        raise KeyError("a bug stays a bug")
