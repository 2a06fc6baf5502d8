"""End to end: send, then read the messages as readers would, over real HTTP, and count.

A recording SMTP server receives the send; the pixel, links and unsubscribe URL are taken from
the received messages and fetched from a real ``mailer tracker serve`` (Redis buffer, its own
database index); Stripe webhooks are signed with the stripe library; ``mailer stats`` must
then say exactly what happened.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
import re
import signal
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import REDIS_URL
from helpers import BIN, dev_env, free_port, run_mailer
from smtp_servers import serve, wait_until
from sqlalchemy import Engine, update

from mailer import db
from mailer.billing.testing import signature as stripe_signature
from mailer.billing.testing import subscription_event
from mailer.db.models import DeliveryRow

pytestmark = pytest.mark.subprocess

WEBHOOK_SECRET = "whsec_e2e_test_secret"
SITE = "https://news.example.com"
POST = """---
title: Harbour Notes
audience: paid
---

Hello {{ name }}. Read [the archive](https://news.example.com/archive).

<!-- paywall -->

The rest is for paying readers.
"""
READERS = {  # address: tier
    "ana@example.com": "free",
    "ben@example.com": "free",
    "dan@example.com": "free",
    "cat@example.com": "paid",
}
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.3.0"
APPLE_PROXY = "Mozilla/5.0"  # what Apple Mail Privacy Protection's prefetch sends


def urls_of(message: EmailMessage) -> tuple[str, list[str], str]:
    """The pixel URL, the tracked link URLs and the one-click unsubscribe URL."""
    html = message.get_body(("html",))
    assert html is not None
    content = html.get_content()
    pixel = re.findall(r'src="([^"]+/o/[^"]+\.gif)"', content)
    links = re.findall(r'href="([^"]+/c/[^"]+)"', content)
    unsubscribe = re.search(r"<(https?://[^>]+/u/[^>]+)>", str(message["List-Unsubscribe"]))
    assert pixel and links and unsubscribe
    return pixel[0], links, unsubscribe.group(1)


@pytest.mark.usefixtures("redis_db")
def test_send_track_convert_and_count(engine: Engine, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    tracker_url = f"http://127.0.0.1:{port}"
    base = {
        **dev_env(),
        "MAILER_DATABASE_URL": db_url,
        "MAILER_SITE_URL": SITE,
        "MAILER_TRACKER_URL": tracker_url,
        "MAILER_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MAILER_TRACKER_FLUSH_INTERVAL": "200ms",
        "MAILER_BROKER_URL": REDIS_URL,
    }

    def mailer(*args: str, env: dict[str, str] | None = None) -> str:
        return run_mailer({**base, **(env or {})}, tmp_path, *args, timeout=120)

    (tmp_path / "post.md").write_text(POST)
    mailer("posts", "add", "post.md")
    for address, tier in READERS.items():
        mailer("subscribers", "add", address, "--tier", tier)

    with serve() as smtp:
        # No workers listen on this broker database: `mailer send` would wait for them.
        inline = {
            "MAILER_SMTP_URL": f"smtp://127.0.0.1:{smtp.settings().port}",
            "MAILER_BROKER_URL": "redis://127.0.0.1:1/0",
        }
        send_id = json.loads(
            mailer(
                "send", "harbour-notes", "--segment", "all", "--yes", "--wait", "--json", env=inline
            )
        )["send_id"]
        messages = {
            m.rcpt_tos[0]: email.message_from_bytes(m.data, policy=email.policy.default)
            for m in smtp.handler.messages
        }
    assert set(messages) == set(READERS)
    # Delivered an hour ago: fetches now are people, not prefetches at delivery time.
    with db.session(engine) as session:
        session.execute(
            update(DeliveryRow).values(sent_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )

    with (tmp_path / "tracker.log").open("ab") as log:  # the tracker keeps a copy open
        tracker = subprocess.Popen(
            [str(BIN / "mailer"), "tracker", "serve", "--port", str(port)],
            env=base,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _answers(tracker_url), timeout=30)
        with httpx.Client(timeout=10) as http:
            ana_pixel, _, _ = urls_of(messages["ana@example.com"])
            answer = http.get(ana_pixel, headers={"User-Agent": THUNDERBIRD})
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/gif"
            assert "no-store" in answer.headers["cache-control"]
            # She opens the web version too: her free variant, filled in for her, no pixel.
            ana_html = messages["ana@example.com"].get_body(("html",))
            assert ana_html is not None
            view = re.search(r'href="([^"]+/v/[^"]+)"', ana_html.get_content())
            assert view is not None
            web = http.get(view.group(1), headers={"User-Agent": THUNDERBIRD})
            assert web.status_code == 200 and "Hello reader." in web.text
            assert "Keep reading with a 7-day free trial" in web.text
            assert "/o/" not in web.text and "The rest is for paying readers" not in web.text

            ben_pixel, _, ben_unsubscribe = urls_of(messages["ben@example.com"])
            assert http.get(ben_pixel, headers={"User-Agent": APPLE_PROXY}).status_code == 200
            page = http.get(ben_unsubscribe)
            assert page.status_code == 200 and "<form" in page.text
            for _ in range(2):  # idempotent
                done = http.post(ben_unsubscribe, data={"List-Unsubscribe": "One-Click"})
                assert done.status_code == 200 and "set-cookie" not in done.headers

            # Forged and tampered tokens: a plain 404, nothing recorded.
            token = ana_pixel.rsplit("/", 1)[1].removesuffix(".gif")
            tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
            assert http.get(f"{tracker_url}/o/{tampered}.gif").status_code == 404
            assert http.get(f"{tracker_url}/c/{token}").status_code == 404  # wrong kind
            assert http.get(f"{tracker_url}/c/not-a-token").status_code == 404

            # Cat clicks a link in the body; Dan clicks the paywall button.
            _, cat_links, _ = urls_of(messages["cat@example.com"])
            hops = [http.get(u, headers={"User-Agent": THUNDERBIRD}) for u in cat_links]
            assert any(h.headers["location"] == f"{SITE}/archive" for h in hops)
            _, dan_links, _ = urls_of(messages["dan@example.com"])
            targets = [
                http.get(u, headers={"User-Agent": THUNDERBIRD}).headers["location"]
                for u in dan_links
            ]
            subscribe = [t for t in targets if t.startswith(f"{SITE}/subscribe")]
            assert subscribe, targets
            ref = parse_qs(urlsplit(subscribe[0]).query)["mailer_ref"][0]

            # Dan starts a trial through the subscribe page, then pays.
            def webhook(event: dict[str, Any], signature: str | None = None) -> int:
                payload = json.dumps(event)
                headers = {
                    "Stripe-Signature": signature or stripe_signature(payload, WEBHOOK_SECRET)
                }
                return http.post(
                    f"{tracker_url}/webhooks/stripe", content=payload, headers=headers
                ).status_code

            trial_end = int(time.time()) + 7 * 86400
            created = subscription_event(
                "evt_1",
                "customer.subscription.created",
                {
                    "id": "sub_1",
                    "customer": "cus_1",
                    "status": "trialing",
                    "trial_end": trial_end,
                    "metadata": {"mailer_ref": ref},
                },
            )
            assert webhook(created) == 200
            assert webhook(created) == 200  # a replay does nothing
            forged = {**created, "id": "evt_forged"}
            assert webhook(forged, stripe_signature(json.dumps(forged), "whsec_wrong")) == 400
            stale = {**created, "id": "evt_stale"}
            long_ago = int(time.time()) - 600
            assert (
                webhook(stale, stripe_signature(json.dumps(stale), WEBHOOK_SECRET, at=long_ago))
                == 400
            )
            updated = subscription_event(
                "evt_2",
                "customer.subscription.updated",
                {"id": "sub_1", "customer": "cus_1", "status": "active", "metadata": {}},
                previous={"status": "trialing"},
            )
            assert webhook(updated) == 200
            assert webhook(subscription_event("evt_3", "invoice.paid", {"id": "in_1"})) == 200
    finally:
        os.killpg(tracker.pid, signal.SIGTERM)  # it writes its buffer before it exits
        tracker.wait(timeout=60)
    assert tracker.returncode == 0, (tmp_path / "tracker.log").read_text()

    mailer("tracker", "flush")
    stats = json.loads(mailer("stats", str(send_id), "--json"))
    expected = {
        "recipients": 4,
        "sent": 4,
        "failed": 0,
        "bounced": 0,
        "unique_opens": 4,  # ana, ben (a machine), dan and cat (a click implies an open)
        "human_opens": 3,
        "machine_opens": 1,
        "unique_clicks": 2,
        "unsubscribes": 1,
        "trial_starts": 1,
        "conversions": 1,
    }
    assert {k: stats[k] for k in expected} == expected
    assert stats["by_variant"]["free"]["recipients"] == 3
    assert stats["by_variant"]["free"]["conversions"] == 1
    assert stats["by_variant"]["paid"]["unique_clicks"] == 1
    assert json.loads(mailer("stats", "harbour-notes", "--json")) == stats

    report = tmp_path / "report.html"
    mailer("stats", "harbour-notes", "--html", str(report))
    assert "<svg" in report.read_text()

    profile = mailer("subscribers", "show", "dan@example.com")
    assert "paid" in profile

    # Ben unsubscribed: the next send leaves him out.
    with serve() as smtp:
        inline = {
            "MAILER_SMTP_URL": f"smtp://127.0.0.1:{smtp.settings().port}",
            "MAILER_BROKER_URL": "redis://127.0.0.1:1/0",
        }
        mailer("send", "harbour-notes", "--segment", "all", "--yes", "--wait", env=inline)
        assert sorted(m.rcpt_tos[0] for m in smtp.handler.messages) == sorted(
            set(READERS) - {"ben@example.com"}
        )


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False
