"""Real SMTP servers for tests: aiosmtpd on 127.0.0.1, on a free port, in a thread.

    from smtp_servers import CloseAfter, Refuse, serve

    with serve() as server:                       # accepts and records every message
        pool = SmtpPool(server.settings(), size=4, ...)
        ...
        messages = server.handler.wait_for(3)     # blocks until 3 messages were accepted
        server.connections                        # connections the server accepted

Handlers record each message they accept (``Message``: envelope and raw bytes) and may
inject one fault:

- ``Recorder()``: accepts everything.
- ``Refuse(reply, stage=..., address=..., once=...)``: answers ``reply`` to MAIL FROM
  (``stage="mail"``; ``address`` is then the sender), RCPT TO (``"rcpt"``, the default) or
  the final dot (``"data"``), for ``address`` only or everyone, every time or only on the
  first attempt (``once=True``). ``greylist()`` is 451 on each recipient's first attempt.
- ``DropAfterData(address=None, once=True)``: reads the message, then closes the connection
  without a reply.
- ``Slow(delay, stage="data")``: waits ``delay`` seconds before answering (then accepts).
- ``CloseAfter(k)``: on each connection, answers the MAIL FROM after ``k`` messages with
  421 and closes the connection.
- ``Outage(delay)``: waits ``delay`` seconds before answering each final dot and, for a
  stretch of time, injects a fault: ``refuse_all(seconds)`` answers every command (EHLO,
  MAIL, RCPT, DATA, RSET...) with 421 and closes the connection; ``cut_data(seconds, every=k)``
  answers every k-th DATA with 354, reads part of the message and hangs up without a reply
  (the partial message is not recorded).

``server.down()`` stops a server as a killed process would be (every open connection closed,
nothing listening); ``server.up()`` starts it again on the same port, with the same handler.

``serve(handler, pipelining=True)`` offers PIPELINING (aiosmtpd reads commands in turn, so it
takes them pipelined without offering it); ``handler.pipelined`` then says, per MAIL FROM,
whether the client had already sent RCPT TO behind it.

``serve(handler, auth=("user", "pass"))`` requires AUTH (PLAIN or LOGIN, no TLS needed);
``starttls=True`` requires STARTTLS and ``implicit_tls=True`` speaks TLS from the start,
both with a certificate from a throwaway CA that ``client_tls_context()`` trusts.
``black_hole()`` is a port that accepts connections but never greets (``helpers.free_port()``
is one with nothing listening). ``wait_until(condition)`` polls until a condition holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailer.config import SmtpSettings

HOST = "127.0.0.1"
Stage = Literal["mail", "rcpt", "data"]


@dataclass(frozen=True)
class Message:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    data: bytes  # exactly as received, after un-doubling leading dots


class Recorder:
    """An aiosmtpd handler that accepts every message and records it (thread-safe)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._messages: list[Message] = []
        # Set by serve(auth=...). aiosmtpd's own auth_required warns without TLS, every time.
        self.require_auth = False
        self.offer_pipelining = False  # set by serve(pipelining=True)
        self.pipelined: list[bool] = []

    @property
    def messages(self) -> list[Message]:
        with self._changed:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Message]:
        """The accepted messages, once there are at least ``count``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                raise AssertionError(f"{len(self._messages)} messages arrived, not {count}")
            return list(self._messages)

    # Fault hooks: a reply string refuses, None goes on as usual.
    async def on_mail(self, server: SMTP, session: Session, sender: str) -> str | None:
        return None

    async def on_rcpt(self, server: SMTP, session: Session, address: str) -> str | None:
        return None

    async def on_data(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        return None

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*lines[:-1], "250-PIPELINING", lines[-1]] if self.offer_pipelining else lines

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # Unread input behind MAIL FROM: the client did not wait for its reply.
        self.pipelined.append(b"RCPT" in getattr(server, "_reader")._buffer)  # noqa: B009
        if self.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = await self.on_mail(server, session, address)
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self.on_rcpt(server, session, address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await self.on_data(server, session, envelope)
        if reply is not None:
            return reply
        assert envelope.mail_from is not None and envelope.original_content is not None
        message = Message(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            tuple(envelope.mail_options),
            envelope.original_content,
        )
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        return "250 2.0.0 OK: queued"


class _Fault(Recorder):
    """Applies to ``address`` (everyone if None), every time or only on its first attempt."""

    def __init__(self, address: str | None, once: bool) -> None:
        super().__init__()
        self.address = address
        self.once = once
        self._seen: set[str] = set()

    def hits(self, address: str) -> bool:
        if self.address is not None and address != self.address:
            return False
        first = address not in self._seen
        self._seen.add(address)
        return first or not self.once


class Refuse(_Fault):
    def __init__(
        self, reply: str, *, stage: Stage = "rcpt", address: str | None = None, once: bool = False
    ) -> None:
        super().__init__(address, once)
        self.reply = reply
        self.stage = stage

    async def on_mail(self, server: SMTP, session: Session, sender: str) -> str | None:
        return self.reply if self.stage == "mail" and self.hits(sender) else None

    async def on_rcpt(self, server: SMTP, session: Session, address: str) -> str | None:
        return self.reply if self.stage == "rcpt" and self.hits(address) else None

    async def on_data(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        return self.reply if self.stage == "data" and self.hits(envelope.rcpt_tos[0]) else None


def greylist() -> Refuse:
    """451 to each recipient's first RCPT TO, 250 afterwards."""
    return Refuse("451 4.7.1 Greylisted, please try again later", once=True)


class DropAfterData(_Fault):
    def __init__(self, address: str | None = None, *, once: bool = True) -> None:
        super().__init__(address, once)

    async def on_data(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        if not self.hits(envelope.rcpt_tos[0]):
            return None
        assert server.transport is not None
        server.transport.close()
        await asyncio.Future()  # closing the connection cancels this handler: no reply at all
        raise AssertionError("unreachable")


class Slow(_Fault):
    def __init__(
        self, delay: float, *, stage: Stage = "data", address: str | None = None, once: bool = False
    ) -> None:
        super().__init__(address, once)
        self.delay = delay
        self.stage = stage

    async def _wait(self, stage: Stage, address: str) -> None:
        if stage == self.stage and self.hits(address):
            await asyncio.sleep(self.delay)

    async def on_mail(self, server: SMTP, session: Session, sender: str) -> str | None:
        await self._wait("mail", sender)
        return None

    async def on_rcpt(self, server: SMTP, session: Session, address: str) -> str | None:
        await self._wait("rcpt", address)
        return None

    async def on_data(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        await self._wait("data", envelope.rcpt_tos[0])
        return None


class CloseAfter(Recorder):
    """Per connection: ``k`` messages, then 421 to the next MAIL FROM, and hang up."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self._mails: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()

    async def on_mail(self, server: SMTP, session: Session, sender: str) -> str | None:
        self._mails[session] = count = self._mails.get(session, 0) + 1
        if count <= self.k:
            return None
        assert server.transport is not None
        # Runs once the reply is written: aiosmtpd pushes it before it next yields.
        server.loop.call_soon(server.transport.close)
        return "421 4.7.0 smtp.test Too many messages, closing connection"


@functools.cache
def _authority() -> trustme.CA:
    return trustme.CA()


def server_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _authority().issue_cert(HOST, "localhost").configure_cert(context)
    return context


def client_tls_context() -> ssl.SSLContext:
    """Trusts the test servers' certificates (and nothing else)."""
    context = ssl.create_default_context()
    _authority().configure_trust(context)
    return context


class Outage(Recorder):
    """Slow (``delay`` before each final reply) and, while a fault is on, faulty."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self._refuse_until = 0.0
        self._cut_until = 0.0
        self._cut_every = 1
        self._data_commands = 0
        self.refused = 0  # commands answered 421
        self.cut = 0  # messages cut off mid-DATA

    def refuse_all(self, seconds: float) -> None:
        """From now on, for ``seconds``: every command gets 421 and the connection closes."""
        self._refuse_until = time.monotonic() + seconds

    def cut_data(self, seconds: float, *, every: int = 1) -> None:
        """From now on, for ``seconds``: every ``every``-th DATA is cut off midway."""
        self._cut_every = every
        self._cut_until = time.monotonic() + seconds

    def refusing(self) -> bool:
        return time.monotonic() < self._refuse_until

    def cutting(self) -> bool:
        if time.monotonic() >= self._cut_until:
            return False
        self._data_commands += 1
        return self._data_commands % self._cut_every == 0

    async def on_data(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        await asyncio.sleep(self.delay)
        return None


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection at once (a reset: nothing buffered is sent)."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    elif transport is not None:
        transport.close()


def _guarded(smtp: SMTP, handler: Outage, command: str, method: Any) -> Any:
    """``method`` (an ``smtp_*`` command of aiosmtpd) behind ``handler``'s faults."""

    async def guarded(arg: str) -> None:
        transport = smtp.transport
        if handler.refusing() and transport is not None:
            handler.refused += 1
            await smtp.push("421 4.3.2 smtp.test Service not available, closing channel")
            transport.close()
            return
        if command == "DATA" and smtp.envelope and smtp.envelope.rcpt_tos and handler.cutting():
            handler.cut += 1
            await smtp.push("354 End data with <CR><LF>.<CR><LF>")
            # Part of the message (its first lines), then the line goes dead: no reply.
            for _ in range(3):
                await smtp._reader.readuntil(b"\r\n")
            _abort(transport)
            return
        await method(arg)

    return guarded


class _Controller(Controller):
    def __init__(self, handler: Recorder, port: int = 0, **kwargs: Any) -> None:
        super().__init__(
            handler,
            hostname=HOST,
            port=port,
            ready_timeout=5.0,
            server_hostname="smtp.test",
            **kwargs,
        )
        self.connections = 0
        self.live: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory(self) -> SMTP:
        self.connections += 1  # aiosmtpd makes one SMTP protocol per connection
        smtp: SMTP = super().factory()  # type: ignore[no-untyped-call]
        if isinstance(self.handler, Outage):
            smtp._smtp_methods = {
                name: _guarded(smtp, self.handler, name, method)
                for name, method in smtp._smtp_methods.items()
            }
        self.live.add(smtp)
        return smtp

    def hang_up(self) -> None:
        """Close every open connection (call in the server's loop)."""
        for smtp in list(self.live):
            if smtp.transport is not None:
                _abort(smtp.transport)

    def _trigger_server(self) -> None:
        # Bound to port 0: the controller must learn the real port before it connects.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpServer:
    def __init__(
        self,
        controller: _Controller,
        handler: Recorder,
        settings: SmtpSettings,
        options: dict[str, Any],
    ):
        self._controller: _Controller | None = controller
        self._settings = settings
        self._options = options
        self._earlier_connections = 0
        self.handler = handler
        self.host = settings.host
        self.port = settings.port

    @property
    def connections(self) -> int:
        """Connections accepted so far (the controllers' own start-up checks excluded)."""
        now = 0 if self._controller is None else self._controller.connections - 1
        return self._earlier_connections + now

    def down(self) -> None:
        """Stop as a killed server would: open connections closed, nothing listening."""
        controller, self._controller = self._controller, None
        assert controller is not None, "the server is down already"
        self._earlier_connections += controller.connections - 1
        controller.loop.call_soon_threadsafe(controller.hang_up)
        controller.stop()

    def up(self) -> None:
        """Listen again on the same port, with the same handler."""
        assert self._controller is None, "the server is up already"
        deadline = time.monotonic() + 10
        while True:
            controller = _Controller(self.handler, self.port, **self._options)
            try:
                controller.start()
                break
            except OSError:  # the port is not free yet (or was taken meanwhile)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def settings(self, **changes: Any) -> SmtpSettings:
        """How to reach this server (with its login and TLS mode), with ``changes`` made."""
        return dataclasses.replace(self._settings, **changes)


@contextlib.contextmanager
def serve(
    handler: Recorder | None = None,
    *,
    auth: tuple[str, str] | None = None,
    starttls: bool = False,
    implicit_tls: bool = False,
    pipelining: bool = False,
    **options: Any,
) -> Iterator[SmtpServer]:
    """Runs ``handler`` until the block ends; ``options`` go to aiosmtpd's ``SMTP`` (e.g.
    ``timeout=0.1`` hangs up connections idle that long)."""
    handler = handler or Recorder()
    handler.offer_pipelining = pipelining
    kwargs: dict[str, Any] = dict(options)
    if auth is not None:

        def authenticate(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                auth[0].encode(),
                auth[1].encode(),
            )
            return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535

        kwargs |= {"authenticator": authenticate, "auth_require_tls": False}
        handler.require_auth = True
    if starttls:
        kwargs |= {"tls_context": server_tls_context(), "require_starttls": True}
    if implicit_tls:
        kwargs["ssl_context"] = server_tls_context()
    controller = _Controller(handler, **kwargs)
    controller.start()
    username, password = auth or (None, None)
    settings = SmtpSettings(HOST, controller.port, username, password, implicit_tls, starttls)
    server = SmtpServer(controller, handler, settings, kwargs)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel does) but never says a word."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls ``condition()`` until it holds: for state that servers or workers change."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g}s")
        time.sleep(0.01)
