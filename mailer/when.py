"""When to send: ``in 10m``, ISO 8601 with an offset, or a local time in the configured zone."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

from mailer.errors import InputError

_RELATIVE = re.compile(r"in\s+((?:\d+\s*[smhd]\s*)+)", re.IGNORECASE)
_PART = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, timezone: str, now: dt.datetime) -> dt.datetime:
    """The moment ``text`` names, in UTC; it must be after ``now``.

    ``in 10m``, ``in 2h``, ``in 1h30m`` (s, m, h, d); ``2026-12-01T09:00:00+01:00`` or ``...Z``;
    or a time without an offset, such as ``2026-12-01 09:00``, read in ``timezone``.
    """
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        seconds = sum(int(n) * _UNIT[unit.lower()] for n, unit in _PART.findall(relative[1]))
        when = now + dt.timedelta(seconds=seconds)
    else:
        try:
            when = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise InputError(
                f"{text!r} is not a time: use ISO 8601 (2026-12-01T09:00:00+01:00), a local "
                f"time in {timezone} (2026-12-01 09:00), or 'in 10m' / 'in 2h'"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=ZoneInfo(timezone))
    when = when.astimezone(dt.UTC)
    if when <= now:
        raise InputError(f"{text!r} is in the past (it is {now.isoformat(timespec='seconds')})")
    return when
