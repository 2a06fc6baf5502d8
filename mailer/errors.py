"""One error root for the whole library, and the one table that maps foreign errors to it.

Like django-anymail, children also inherit the stdlib error they resemble, so callers that
only know Python's own exceptions still catch them sensibly::

    MailerError
    ├── ConfigError (ValueError)             a setting is missing or malformed
    ├── InputError (ValueError)              a user-supplied file or argument is invalid
    │   ├── PostError                        a post file
    │   └── SegmentError                     a segment expression, with its column
    ├── NotFoundError (LookupError)          no such post, reader or send
    ├── DatabaseError                        ← SQLAlchemy: unreachable, not migrated, failed
    ├── BrokerError (ConnectionError)        ← redis: Redis did not answer
    └── DeliveryError                        a message could not be handed to the SMTP server
        ├── TransientDeliveryError (ConnectionError)      worth retrying later
        │   ├── SmtpConnectError             ← aiosmtplib: unreachable, timed out, 4xx greeting
        │   ├── LedgerUnavailable (DatabaseError)         the ledger's database, mid-batch
        │   └── ThrottleUnavailable (BrokerError)         the shared rate limits
        └── PermanentDeliveryError           ← aiosmtplib: our configuration (AUTH, TLS, ...)

A refusal of one message (a 4xx or 5xx to MAIL, RCPT or DATA) is not an error at all: it is
that recipient's outcome (``mailer.delivery.smtp.Outcome``). Errors of other libraries become
ours at the boundary through ``FOREIGN``, with ``translated`` or ``translating``; this module
imports none of them (a foreign error can only be raised once its module is imported).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class MailerError(Exception):
    """Root of every error the library raises on purpose."""


class ConfigError(MailerError, ValueError):
    """A setting is missing or malformed; the message names the variable."""


class InputError(MailerError, ValueError):
    """A user-supplied input (file, argument) is invalid; the message names it."""


class PostError(InputError):
    """A post file is invalid; the message names the file and the field."""


class SegmentError(InputError):
    """A segment expression is invalid; the message points at the column."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


class NotFoundError(MailerError, LookupError):
    """A named thing (post, subscriber, send) does not exist."""


class DatabaseError(MailerError):
    """The database is unreachable, not migrated, or failed a statement."""


class BrokerError(MailerError, ConnectionError):
    """Redis (the event buffer, the task queue, the shared rate limits) did not answer."""


class DeliveryError(MailerError):
    """A message could not be handed to the SMTP server."""


class TransientDeliveryError(DeliveryError, ConnectionError):
    """Worth retrying later: the server, the ledger or the rate limits did not answer."""


class SmtpConnectError(TransientDeliveryError):
    """The server could not be reached or greeted, or answered 4xx while we connected."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class LedgerUnavailable(TransientDeliveryError, DatabaseError):
    """The ledger's database did not answer (or stayed locked); nothing of the call was
    committed. Internal to a batch run, which stops and is retried."""


class ThrottleUnavailable(TransientDeliveryError, BrokerError):
    """The shared rate limits (Redis) did not answer. Internal to a batch run."""


class PermanentDeliveryError(DeliveryError):
    """A configuration fault that would fail every reader alike, so the batch stops: AUTH
    refused or required, TLS failed (such as an untrusted certificate), STARTTLS or AUTH
    not offered, a 5xx to the greeting, EHLO or STARTTLS. Never worth retrying as it is."""


# Foreign errors and what they are to us: (module.Class, SMTP reply codes or None, ours).
# The first entry the error is an instance of decides, so a subclass comes before its base.
# aiosmtplib's errors are listed as raised while connecting (``delivery.smtp`` turns those of a
# transaction into outcomes); an OSError or a timeout there is ``SmtpConnectError``, and a TLS
# failure under any of them ``PermanentDeliveryError``.
FOREIGN: tuple[tuple[str, range | None, type[MailerError]], ...] = (
    ("aiosmtplib.errors.SMTPAuthenticationError", None, PermanentDeliveryError),
    ("aiosmtplib.errors.SMTPResponseException", range(500, 600), PermanentDeliveryError),
    ("aiosmtplib.errors.SMTPResponseException", None, SmtpConnectError),
    ("aiosmtplib.errors.SMTPTimeoutError", None, SmtpConnectError),
    ("aiosmtplib.errors.SMTPServerDisconnected", None, SmtpConnectError),
    ("aiosmtplib.errors.SMTPConnectError", None, SmtpConnectError),
    ("aiosmtplib.errors.SMTPException", None, PermanentDeliveryError),  # STARTTLS, AUTH missing
    ("redis.exceptions.RedisError", None, BrokerError),
    ("sqlalchemy.exc.SQLAlchemyError", None, DatabaseError),
)


def foreign(exc: BaseException) -> type[MailerError] | None:
    """What ``exc`` is to us according to ``FOREIGN``; None if it lists no such error."""
    for name, codes, ours in FOREIGN:
        module, _, cls = name.rpartition(".")
        kind = getattr(sys.modules.get(module), cls, None)
        if kind is None or not isinstance(exc, kind):
            continue
        if codes is None or getattr(exc, "code", None) in codes:
            return ours
    return None


def reason(exc: BaseException) -> str:
    """The first line of what went wrong: a database driver's own message, not SQLAlchemy's
    wrapping of it (which repeats the statement and its parameters)."""
    orig = getattr(exc, "orig", None)
    for text in (str(orig) if orig else "", str(exc)):
        if lines := text.strip().splitlines():
            return lines[0]
    return type(exc).__name__


def translated(
    exc: BaseException, doing: str, *, as_: type[MailerError] | None = None
) -> MailerError:
    """``exc``, a foreign error listed in ``FOREIGN``, as ours: "``doing``: reason".

    ``as_`` names a more specific class of ours, a subclass of the one ``FOREIGN`` gives.
    """
    ours = foreign(exc)
    if ours is None:
        raise TypeError(f"{type(exc).__name__} is not in errors.FOREIGN") from exc
    if as_ is not None:
        if not issubclass(as_, ours):
            raise TypeError(f"{as_.__name__} is not a kind of {ours.__name__}") from exc
        ours = as_
    return ours(f"{doing}: {reason(exc)}")


@contextmanager
def translating(doing: str, *, as_: type[MailerError] | None = None) -> Iterator[None]:
    """Foreign errors listed in ``FOREIGN`` raised in the block become ours (``translated``),
    chained to the original; anything else passes through."""
    try:
        yield
    except Exception as exc:
        if foreign(exc) is None:
            raise
        raise translated(exc, doing, as_=as_) from exc
