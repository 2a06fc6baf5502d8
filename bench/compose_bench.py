"""Composer and personalisation benchmark (issue 2).

Targets: both variants of a 2,000-word post composed in at most 50 ms together; personalisation
at most 50 µs per recipient. Baselines measured in the same run, on the same post: one premailer
call, and building each message with ``email.message`` per recipient.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import mailer.compose
from mailer.compose import Publication, _inline, compose
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.posts import parse_post
from mailer.tokens import Signer

POST = Path(__file__).resolve().parents[1] / "tests" / "data" / "long-post.md"
PUB = Publication(
    name="The Demo Dispatch",
    postal_address="1 Example Street, Springfield",
    site_url="https://example.com",
    tracker_url="https://t.example.com",
    from_address="The Demo Dispatch <news@example.com>",
)
RECIPIENTS = [
    Recipient(i, f"reader{i}@example.com", name)
    for i, name in enumerate(["Ana Lima", "Zoë Ångström", "山田 健二", None] * 500, start=1)
]


def best_of(rounds: int, fn: Callable[[], object]) -> float:
    """Median seconds per call over ``rounds`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_recipient(fn: Callable[[Recipient], object], rounds: int = 5) -> float:
    def batch() -> None:
        for r in RECIPIENTS:
            fn(r)

    return best_of(rounds, batch) / len(RECIPIENTS)


def main() -> list[tuple[str, float, str]]:
    post = parse_post(POST)
    composition = compose(post, PUB)
    compose_s = best_of(20, lambda: compose(post, PUB))

    # Baseline: the premailer calls inside compose, each timed on the composer's own input.
    inline_times: list[float] = []

    def timed_inline(html: str) -> str:
        start = time.perf_counter()
        try:
            return _inline(html)
        finally:
            inline_times.append(time.perf_counter() - start)

    mailer.compose._inline = timed_inline
    try:
        for _ in range(10):
            compose(post, PUB)
    finally:
        mailer.compose._inline = _inline
    premailer_s = statistics.median(inline_times)

    personaliser = Personaliser(
        composition.paid,
        send_id=123456,
        signer=Signer(["bench-secret-key-0123456789"]),
        tracker_url=PUB.tracker_url,
        now=dt.datetime.now(dt.UTC),
    )
    personalise_s = per_recipient(personaliser.personalise)

    # Baseline: what personalising with email.message costs, from the same decoded parts.
    html, text = composition.paid.html, composition.paid.text

    def with_email_message(r: Recipient) -> bytes:
        values = personaliser.values(r)
        msg = EmailMessage()
        msg["From"] = PUB.from_address
        msg["To"] = values["to"]
        msg["Subject"] = post.title
        msg.set_content(composition.paid.markers.sub(lambda m: values[m.group(2)], text))
        msg.add_alternative(
            composition.paid.markers.sub(lambda m: values[m.group(2)], html), subtype="html"
        )
        return msg.as_bytes()

    baseline_s = per_recipient(with_email_message, rounds=1)
    words = len(post.body.split())
    size = len(personaliser.personalise(RECIPIENTS[0]))
    return [
        ("compose both variants (ms)", compose_s * 1e3, f"target <= 50; {words} words"),
        ("baseline: one premailer call (ms)", premailer_s * 1e3, "inside compose, same run"),
        (
            "personalise, per recipient (us)",
            personalise_s * 1e6,
            f"target <= 50; {size} bytes, {len(composition.links)} links",
        ),
        (
            "baseline: email.message per recipient (us)",
            baseline_s * 1e6,
            f"{baseline_s / personalise_s:.0f}x slower than personalise",
        ),
    ]
