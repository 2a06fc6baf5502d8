"""A send's stats as one self-contained HTML page: cards, an activity chart, the funnel.

Everything is inline (CSS, and SVG drawn here), nothing is fetched: the file can be mailed,
archived or opened offline and looks the same.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
from markupsafe import Markup, escape

from mailer.paths import TEMPLATES
from mailer.stats import COMPLAINT_LIMIT, Counts, Hour, SendStats, percent

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

# The chart's drawing area, in SVG user units; the SVG scales to the page's width.
_W, _H, _LEFT, _BOTTOM, _TOP = 760, 260, 44, 28, 12
SERIES = (  # (Hour field, legend, colour, dashes); the first is also drawn as an area
    ("human_opens", "Human opens", "#2563eb", ""),
    ("machine_opens", "Machine opens", "#9ca3af", "5 4"),
    ("clicks", "Clicks", "#ea580c", ""),
)


@dataclass(frozen=True)
class Card:
    label: str
    value: str
    note: str = ""
    alert: bool = False  # drawn in red: something to act on


@dataclass(frozen=True)
class Step:
    label: str
    count: int
    percent: str  # of the first step
    width: float  # bar width in %


def render_html(stats: SendStats, hours: Sequence[Hour], *, generated: dt.datetime) -> str:
    total = stats.total
    return _env.get_template("report.html.j2").render(
        stats=stats,
        generated=generated.strftime("%Y-%m-%d %H:%M UTC"),
        started=stats.started_at.strftime("%Y-%m-%d %H:%M UTC") if stats.started_at else None,
        cards=_cards(total),
        chart=_chart(hours),
        series=SERIES,
        funnel=_funnel(stats),
        rows=stats.rows(),
    )


def _cards(total: Counts) -> list[Card]:
    over = total.complaints_over_limit
    return [
        Card("Sent", f"{total.sent:,}", f"of {total.recipients:,} recipients"),
        Card("Opened by people", percent(total.open_rate), f"{total.human_opens:,} readers"),
        Card("Clicked", percent(total.click_rate), f"{total.unique_clicks:,} readers"),
        Card("Trials started", f"{total.trial_starts:,}"),
        Card("Converted to paid", f"{total.conversions:,}", percent(total.conversion_rate)),
        Card("Unsubscribed", f"{total.unsubscribes:,}"),
        Card("Machine opens only", f"{total.machine_opens:,}", "privacy proxies, scanners"),
        Card("Failed", f"{total.failed:,}", "refused or given up at send time"),
        Card("Bounced", f"{total.bounced:,}", f"{total.soft_bounces:,} more bounced softly"),
        Card(
            "Spam complaints",
            percent(total.complaint_rate),
            f"{total.complaints:,} readers"
            + (f"; over Gmail's {percent(COMPLAINT_LIMIT)} limit" if over else ""),
            alert=over,
        ),
    ]


def _funnel(stats: SendStats) -> list[Step]:
    """Free readers mailed → trials started → paid. Trial readers get the paid variant, so
    conversions come from both variants; all are credited to this send by attribution."""
    total = stats.total
    steps = [
        ("Free readers mailed", stats.by_variant["free"].sent),
        ("Started a trial", total.trial_starts),
        ("Became paid", total.conversions),
    ]
    first = steps[0][1]
    return [
        Step(
            label,
            count,
            percent(count / first) if first else "-",
            min(100.0, 100 * count / first) if first else 0.0,
        )
        for label, count in steps
    ]


def _chart(hours: Sequence[Hour]) -> Markup:
    """An SVG line chart of readers per hour; human opens as an area."""
    width, height = _W - _LEFT - 8, _H - _TOP - _BOTTOM
    peak = max((max(h.human_opens, h.machine_opens, h.clicks) for h in hours), default=0)
    top = _nice_ceiling(peak)
    span = max(len(hours) - 1, 1)

    def x(i: int) -> float:
        return _LEFT + width * i / span

    def y(value: int) -> float:
        return _TOP + height - height * value / top

    parts = [
        # Inline SVG in HTML needs no xmlns (and the page then names no URL at all).
        f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="Readers per hour" class="chart">'
    ]
    for tick in range(5):  # horizontal grid with value labels
        value = top * tick // 4
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + width}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'class="grid"/>'
            f'<text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value}</text>'
        )
    step = max(1, _nice_ceiling(len(hours) // 8))
    for i in range(0, len(hours), step):
        parts.append(
            f'<text x="{x(i):.1f}" y="{_H - 8}" text-anchor="middle">{hours[i].hour}h</text>'
        )
    for n, (name, label, colour, dashes) in enumerate(SERIES):
        points = " ".join(f"{x(i):.1f},{y(getattr(h, name)):.1f}" for i, h in enumerate(hours))
        if n == 0:
            base = f"{x(len(hours) - 1):.1f},{y(0):.1f} {x(0):.1f},{y(0):.1f}"
            parts.append(f'<polygon points="{points} {base}" fill="{colour}" opacity="0.15"/>')
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-dasharray="{dashes or "none"}" stroke-linejoin="round">'
            f"<title>{escape(label)}</title></polyline>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 4, 5, 10, 20, 40, 50, 100, … at or above ``value`` (at least 4),
    so the grid's quarters fall on whole numbers where they can."""
    magnitude = 1
    while True:
        for factor in (1, 2, 4, 5):
            candidate = factor * magnitude
            if candidate >= max(value, 4):
                return candidate
        magnitude *= 10
