"""Real bounces: a send through a real Postfix (Debian's package; `make test` installs it) that
relays to a server refusing some readers, Postfix's own DSNs to the VERP return path, delivered
to `mailer bounces serve`.

Postfix runs as a private instance: its own main.cf, master.cf, queue and data folders under a
temporary folder, its smtpd on a free port of 127.0.0.1, nothing of the system's Postfix used.
Starting one needs root (its daemons drop to the ``postfix`` user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Session
from helpers import BIN, free_port, run_mailer
from smtp_servers import Recorder, serve, wait_until
from sqlalchemy import Engine, func, select
from workers import Processes, environment

from mailer import db
from mailer.db.models import BounceEventRow, DeliveryRow, SubscriberRow

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SECRET = "postfix-test-secret-key"
DELIVERED = ["ok1@readers.test", "ok2@readers.test", "ok3@readers.test"]
GONE = ["gone1@readers.test", "gone2@readers.test"]  # 550 at RCPT TO
BUSY = ["busy@readers.test"]  # 451 at RCPT TO: Postfix gives up after one try (see main.cf)

pytestmark = [
    pytest.mark.subprocess,
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]


class Readers(Recorder):
    """The readers' mail server: no such user for GONE, try later for BUSY, else accepted."""

    async def on_rcpt(self, server: SMTP, session: Session, address: str) -> str | None:
        if address in GONE:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address in BUSY:
            return f"451 4.2.0 <{address}>: mailbox busy, try again later"
        return None


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.test
mydomain = mta.test
myorigin = mta.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
transport_maps = texthash:{root}/etc/transport
smtp_dns_support_level = disabled
# A message deferred (4xx) is returned after its first try: the soft bounce comes at once.
maximal_queue_lifetime = 0
bounce_queue_lifetime = 0
maillog_file = /dev/stdout
"""


@pytest.fixture
def postfix_root() -> Iterator[Path]:
    """A folder the ``postfix`` user can reach (pytest's tmp_path is root's alone)."""
    if not os.path.exists(POSTFIX):
        pytest.fail("Postfix is not installed: `make test` installs it (Debian package postfix)")
    root = Path(tempfile.mkdtemp(prefix="mailer-postfix-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def start_postfix(
    processes: Processes, root: Path, port: int, routes: dict[str, int]
) -> subprocess.Popen[bytes]:
    """A private Postfix: smtpd on ``port``; mail for each domain of ``routes`` to that port."""
    etc = root / "etc"
    for folder in (etc, root / "queue", root / "data"):
        folder.mkdir()
    shutil.chown(root / "data", "postfix")
    (etc / "main.cf").write_text(MAIN_CF.format(root=root))
    (etc / "transport").write_text(
        "".join(f"{domain} smtp:[127.0.0.1]:{to}\n" for domain, to in routes.items())
    )
    master = Path("/etc/postfix/master.cf").read_text().splitlines()
    smtpd = f"127.0.0.1:{port} inet n - n - - smtpd"
    (etc / "master.cf").write_text(
        "\n".join(smtpd if line.split()[:2] == ["smtp", "inet"] else line for line in master) + "\n"
    )
    check = subprocess.run([POSTFIX, "-c", str(etc), "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return processes.start([POSTFIX, "-c", str(etc), "start-fg"], dict(os.environ), root / "log")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_postfix_bounces_come_back_through_bounces_serve(
    engine: Engine, db_url: str, tmp_path: Path, postfix_root: Path
) -> None:
    with db.session(engine) as session:
        session.add_all(
            SubscriberRow(email=a, email_key=a, domain="readers.test", tier="free")
            for a in DELIVERED + GONE + BUSY
        )
    (tmp_path / "post.md").write_text("---\ntitle: Harbour\n---\n\nHello {{ name }}.\n")
    inbound, submission = free_port(), free_port()
    with serve(Readers()) as readers, Processes() as processes:
        env = environment(
            db_url,
            f"redis://127.0.0.1:{free_port()}/0",  # no broker: `mailer send` delivers itself
            submission,
            MAILER_FROM="News <news@example.com>",
            MAILER_SECRET_KEY=SECRET,
        )
        processes.start(
            [str(BIN / "mailer"), "bounces", "serve", "--port", str(inbound)],
            env,
            tmp_path / "bounces.log",
        )
        routes = {"readers.test": readers.port, "example.com": inbound}
        master = start_postfix(processes, postfix_root, submission, routes)
        try:
            run_mailer(env, tmp_path, "posts", "add", "post.md")
            run_mailer(env, tmp_path, "send", "harbour", "--segment", "all", "--yes")

            def came_back() -> int:
                with db.session(engine) as session:
                    return int(session.scalar(select(func.count(BounceEventRow.id))) or 0)

            wait_until(lambda: came_back() == len(GONE + BUSY), timeout=60)
            stats = json.loads(run_mailer(env, tmp_path, "stats", "harbour", "--json"))
        except AssertionError:
            logs = [postfix_root / "log", tmp_path / "bounces.log"]
            raise AssertionError("\n".join(p.read_text(errors="replace") for p in logs)) from None
        finally:
            subprocess.run([POSTFIX, "-c", str(postfix_root / "etc"), "stop"], capture_output=True)
            master.wait(timeout=30)
        accepted = readers.handler.messages

    # Postfix took every message (the ledger says sent) and relayed three of them, each
    # with its reader's VERP return path.
    assert sorted(r for m in accepted for r in m.rcpt_tos) == DELIVERED
    assert all(m.mail_from.startswith("bounces+") for m in accepted)
    with db.session(engine) as session:
        rows = session.execute(
            select(
                SubscriberRow.email, SubscriberRow.status, DeliveryRow.state, DeliveryRow.bounced
            )
            .join(DeliveryRow, DeliveryRow.subscriber_id == SubscriberRow.id)
            .order_by(SubscriberRow.email)
        ).all()
        events = dict(session.execute(select(BounceEventRow.kind, BounceEventRow.status)).all())
    found = {email: (status, state, bounced) for email, status, state, bounced in rows}
    for address in GONE:
        assert found[address] == ("bounced", "sent", True), address
    for address in BUSY + DELIVERED:
        assert found[address] == ("active", "sent", False), address  # one soft bounce: not yet
    assert events == {"hard": "5.1.1", "soft": "4.2.0"}
    assert (stats["sent"], stats["failed"], stats["bounced"], stats["soft_bounces"]) == (6, 0, 2, 1)
    log = (tmp_path / "bounces.log").read_text()
    assert log.count(": hard") == 2 and log.count(": soft") == 1, log
