"""One error root for the whole library.

Like django-anymail, children also inherit the stdlib error they resemble, so callers that
only know Python's own exceptions still catch them sensibly.
"""


class MailerError(Exception):
    """Root of every error the library raises on purpose."""


class ConfigError(MailerError, ValueError):
    """A setting is missing or malformed; the message names the variable."""


class InputError(MailerError, ValueError):
    """A user-supplied input (file, argument) is invalid; the message names it."""


class PostError(InputError):
    """A post file is invalid; the message names the file and the field."""


class NotFoundError(MailerError, LookupError):
    """A named thing (post, subscriber, send) does not exist."""


class DatabaseError(MailerError):
    """The database is unreachable or not migrated."""


class DeliveryError(MailerError):
    """A message could not be handed to the SMTP server."""


class TransientDeliveryError(DeliveryError, ConnectionError):
    """Worth retrying later: 4xx replies, dropped connections, timeouts."""


class PermanentDeliveryError(DeliveryError):
    """Never worth retrying: 5xx replies to RCPT or DATA."""


class SegmentError(InputError):
    """A segment expression is invalid; the message points at the column."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column
