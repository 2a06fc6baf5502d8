"""`make demo`'s send: the sample post to the sample list, through the real pipeline.

Starts a capture SMTP server on 127.0.0.1 (every message saved under var/outbox/), then a real
Celery worker if MAILER_BROKER_URL answers (otherwise `mailer send` delivers in-process, and
says so), sends with `mailer send --wait`, and prints the send's summary.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.config import load_settings, masked
from mailer.delivery.dispatch import broker_answers, find_workers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTBOX = ROOT / "var" / "outbox"
SLUG = "the-quiet-harbour"


class Capture:
    """Saves each message it accepts as var/outbox/NNNNNN-recipient.eml."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        recipient = envelope.rcpt_tos[0].replace("/", "_")
        data = envelope.original_content or b""
        (OUTBOX / f"{self.count:06d}-{recipient}.eml").write_bytes(data)
        return "250 2.0.0 captured"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_worker(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not find_workers().answering(timeout=1.0):
        if time.monotonic() > deadline:
            raise SystemExit("the Celery worker did not start; see its output above")


def main() -> int:
    settings = load_settings()
    OUTBOX.mkdir(parents=True, exist_ok=True)
    for old in OUTBOX.glob("*.eml"):
        old.unlink()
    capture = Capture()
    controller = Controller(capture, hostname="127.0.0.1", port=free_port())
    controller.start()
    env = {**os.environ, "MAILER_SMTP_URL": f"smtp://127.0.0.1:{controller.port}"}
    worker: subprocess.Popen[bytes] | None = None
    try:
        print(f"capture SMTP server on 127.0.0.1:{controller.port}, saving to {OUTBOX}")
        if broker_answers(settings.broker_url):
            print(f"broker {masked(settings.broker_url)} answers: starting a real Celery worker")
            worker = subprocess.Popen(
                [
                    str(BIN / "celery"),
                    "-A",
                    "worker.app",
                    "worker",
                    "-c",
                    "2",
                    "--loglevel=WARNING",
                    "-n",
                    f"demo-{os.getpid()}@%h",
                ],
                env=env,
                start_new_session=True,
            )
            wait_for_worker()
        else:
            print(f"broker {masked(settings.broker_url)} does not answer: delivering in-process")
        sent = subprocess.run(
            [str(BIN / "mailer"), "send", SLUG, "--segment", "all", "--yes", "--wait"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        sys.stderr.write(sent.stderr)
        if sent.returncode not in (0, 3):
            return sent.returncode
        send_id = sent.stdout.strip()
        subprocess.run([str(BIN / "mailer"), "sends", "show", send_id], env=env, check=True)
        print(f"{capture.count} messages captured in {OUTBOX}")
        return 0
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        controller.stop()


if __name__ == "__main__":
    raise SystemExit(main())
