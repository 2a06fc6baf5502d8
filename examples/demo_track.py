"""`make demo`'s tracking: readers of the demo send open, click, subscribe and pay, over HTTP.

Starts `mailer tracker serve` where MAILER_TRACKER_URL points (the URLs in the messages),
takes the messages the demo send left in var/outbox/, and acts as their readers would: a few
open them in a mail client, a few through Apple Mail's privacy proxy (counted as machine
opens), some click a link, one unsubscribes with one click, and two come through the paywall
button to a trial, announced by signed Stripe webhooks; one of them then pays. Then it stops the
tracker (SIGTERM: it writes its buffered events), prints `mailer stats` and writes
var/report.html.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import redis

from mailer.billing.testing import signed, subscription_event
from mailer.config import load_settings, masked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTBOX = ROOT / "var" / "outbox"
REPORT = ROOT / "var" / "report.html"
SLUG = "the-quiet-harbour"
DEMO_WEBHOOK_SECRET = "whsec_demo_only_not_for_production"
MAIL_CLIENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15"
APPLE_PROXY = "Mozilla/5.0"  # Apple Mail Privacy Protection's prefetch
PREFETCH_WINDOW_S = 5  # fetches this soon after delivery are taken for prefetches


def read_outbox() -> list[EmailMessage]:
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in sorted(OUTBOX.glob("*.eml"))
    ]


def tracked(message: EmailMessage) -> tuple[str, list[str], str]:
    """The message's pixel URL, its tracked links, and its one-click unsubscribe URL."""
    part = message.get_body(("html",))
    html = part.get_content() if part is not None else ""
    pixel = re.search(r'src="([^"]+/o/[^"]+\.gif)"', html)
    unsubscribe = re.search(r"<(https?://[^>]+/u/[^>]+)>", str(message["List-Unsubscribe"]))
    if pixel is None or unsubscribe is None:
        raise SystemExit(f"{message['To']}: no tracking pixel or unsubscribe URL in the message")
    return pixel.group(1), re.findall(r'href="([^"]+/c/[^"]+)"', html), unsubscribe.group(1)


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Reader:
    """One reader's actions against the tracker, as their mail client and browser send them."""

    def __init__(self, http: httpx.Client, message: EmailMessage, secret: str) -> None:
        self.http, self.secret = http, secret
        self.address = str(message["To"])
        self.pixel, self.links, self.unsubscribe_url = tracked(message)

    def open(self, user_agent: str = MAIL_CLIENT) -> None:
        self.http.get(self.pixel, headers={"User-Agent": user_agent}).raise_for_status()

    def click(self, want_subscribe: bool = False) -> str:
        """Follow a tracked link (the paywall button if asked); where it led."""
        for url in self.links:
            target = self.http.get(url, headers={"User-Agent": MAIL_CLIENT}).headers["location"]
            if "mailer_ref=" in target or not want_subscribe:
                return str(target)
        raise SystemExit(f"{self.address}: no paywall button in the message")

    def unsubscribe(self) -> None:
        self.http.post(
            self.unsubscribe_url, data={"List-Unsubscribe": "One-Click"}
        ).raise_for_status()

    def webhook(self, base: str, event: dict[str, Any]) -> None:
        """Post ``event`` the way Stripe does, signed with the stripe library."""
        payload, signature = signed(event, self.secret)
        answer = self.http.post(
            f"{base}/webhooks/stripe",
            content=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        answer.raise_for_status()


def mailer(*args: str, env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "mailer"), *args], env=env, check=True)


def main() -> int:
    settings = load_settings()
    messages = read_outbox()
    # Feedback-ID: send:variant:newsletter:list
    free = [m for m in messages if str(m["Feedback-ID"]).split(":")[1:2] == ["free"]]
    if len(messages) < 20 or len(free) < 10:
        raise SystemExit(f"{OUTBOX}: run examples/demo_send.py first (needs the demo's messages)")
    parts = urlsplit(settings.tracker_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if listening(host, port):
        raise SystemExit(f"MAILER_TRACKER_URL: something already listens on {host}:{port}")
    secret = settings.stripe_webhook_secret or DEMO_WEBHOOK_SECRET
    env = {**os.environ, "MAILER_STRIPE_WEBHOOK_SECRET": secret}
    try:
        redis.Redis.from_url(settings.broker_url, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError, ValueError):
        print(
            f"broker {masked(settings.broker_url)} does not answer: the tracker buffers in memory"
        )
        env["MAILER_BROKER_URL"] = "memory://"

    print(f"tracker on {settings.tracker_url}")
    tracker = subprocess.Popen(
        [str(BIN / "mailer"), "tracker", "serve", "--host", host, "--port", str(port)],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not listening(host, port):
            if tracker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the tracker did not start; see its output above")
            time.sleep(0.1)
        print(f"waiting {PREFETCH_WINDOW_S} s: opens this soon after delivery look like prefetches")
        time.sleep(PREFETCH_WINDOW_S)
        with httpx.Client(timeout=10) as http:
            readers = [Reader(http, m, secret) for m in free[:12]]
            paying = [Reader(http, m, secret) for m in messages if m not in free][:3]
            for reader in readers[:8] + paying:
                reader.open()
            for reader in readers[8:10]:
                reader.open(APPLE_PROXY)
            for reader in readers[2:5] + paying[:1]:
                reader.click()
            readers[10].unsubscribe()
            print(
                f"{len(readers[:8] + paying)} readers opened, 2 through Apple's proxy, "
                f"4 clicked, {readers[10].address} unsubscribed"
            )

            run = str(int(time.time()))
            for n, reader in enumerate(readers[:2]):
                ref = parse_qs(urlsplit(reader.click(want_subscribe=True)).query)["mailer_ref"][0]
                subscription = {"id": f"sub_demo_{run}_{n}", "customer": f"cus_demo_{run}_{n}"}
                reader.webhook(
                    settings.tracker_url,
                    subscription_event(
                        f"evt_demo_{run}_{n}_created",
                        "customer.subscription.created",
                        subscription
                        | {
                            "status": "trialing",
                            "metadata": {"mailer_ref": ref},
                            "trial_end": int(time.time()) + 7 * 86400,
                        },
                    ),
                )
                print(f"{reader.address} clicked the paywall button and started a trial")
            paid = subscription_event(
                f"evt_demo_{run}_0_paid",
                "customer.subscription.updated",
                {"id": f"sub_demo_{run}_0", "customer": f"cus_demo_{run}_0", "status": "active"},
                previous={"status": "trialing"},
            )
            readers[0].webhook(settings.tracker_url, paid)
            print(f"{readers[0].address} paid: trial converted (a signed Stripe event)")
    finally:
        os.killpg(tracker.pid, signal.SIGTERM)  # it writes its buffered events first
        tracker.wait(timeout=60)
    if env.get("MAILER_BROKER_URL") != "memory://":
        mailer("tracker", "flush", env=env)
    mailer("stats", SLUG, "--html", str(REPORT), env=env)  # prints the table too
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
