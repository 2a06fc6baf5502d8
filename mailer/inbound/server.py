"""``mailer bounces serve``: an SMTP server (aiosmtpd) for the addresses inbound mail comes to.

It accepts mail for the VERP return path (``bounces+TOKEN@`` the From domain), the
List-Unsubscribe ``mailto:`` (``unsubscribe+TOKEN@`` the From domain) and the feedback
(ARF) address, each token checked at ``RCPT TO``; every other recipient gets 550. A message is
answered 250 only once ``handle`` has committed what it changed; if the database does not
answer, 451, and the sending server tries again later: nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine

from mailer.errors import MailerError
from mailer.inbound import Policy, handle
from mailer.inbound.verdict import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class Handler:
    """aiosmtpd's handler: which recipients are ours, and what to do with a message."""

    def __init__(self, engine: Engine, policy: Policy) -> None:
        self.engine = engine
        self.policy = policy

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.policy.ours.accepts(address):
            return f"550 5.1.1 <{address}>: no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.content
        assert isinstance(raw, bytes)  # decode_data is off
        recipients = list(envelope.rcpt_tos)
        try:
            result = await asyncio.to_thread(handle, self.engine, raw, self.policy, recipients)
        except MailerError as exc:
            log.warning("message to %s left with its sender: %s", ", ".join(recipients), exc)
            return "451 4.3.0 cannot record it now; try again later"
        log.info("message from <%s> to %s: %s", envelope.mail_from, ", ".join(recipients), result)
        return "250 2.0.0 OK"


async def serve(
    engine: Engine,
    policy: Policy,
    host: str,
    port: int,
    stop: asyncio.Event,
) -> None:
    """Serve until ``stop`` is set, then close: sessions in progress are cut off (their
    senders try again; a message being recorded is finished first). Raises ``OSError`` if it
    cannot listen."""
    handler = Handler(engine, policy)
    hostname = socket.gethostname()  # not getfqdn(): that may ask DNS
    sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory() -> SMTP:
        smtp = SMTP(
            handler,
            hostname=hostname,
            ident="mailer bounces",
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
        )
        sessions.add(smtp)
        return smtp

    server = await asyncio.get_running_loop().create_server(factory, host, port)
    log.info("listening on %s:%d for %s", host, port, policy.ours.describe())
    try:
        await stop.wait()
    finally:
        server.close()
        for smtp in list(sessions):
            if smtp.transport is not None:
                smtp.transport.close()
        await server.wait_closed()
