"""Hand personalised messages to the SMTP server over a pool of reused connections.

``SmtpPool.send`` runs one transaction (MAIL FROM, RCPT TO, DATA) for one recipient and
returns an ``Outcome``; an SMTP-level problem is never an exception:

- 250 after the final dot: ``sent``.
- 4xx to MAIL FROM, RCPT TO, DATA or the final dot: ``deferred`` with the reply's code.
- 5xx to RCPT TO, DATA or the final dot: ``failed`` with ``bounce`` set (a hard bounce).
- 5xx to MAIL FROM: ``failed``, no bounce, and the reply says the *sender* was refused.
- A dropped or refused connection, a garbled reply, any timeout: ``deferred``, code None.
- A 4xx greeting or EHLO reply: ``deferred`` with the reply's code.
- ``unreachable`` is set when nothing was handed over (no connection, no greeting, or the
  new connection dropped before MAIL FROM was answered): the batch gives the reader their
  attempt back and stops using that connection.
- A recipient address that cannot go on a command line: ``failed``, ``bounce``; a non-ASCII
  address to a server without SMTPUTF8: ``failed``, no bounce.

``domain_backoff`` is set for 421, 450, 451, 452 and 454: the throttle should slow down for
the recipient's domain. After a refusal mid-transaction the connection is RSET and reused;
after 421, a timeout or a dropped connection it is closed and reopened when next needed. A
connection the server closed while it sat idle is replaced before anything is sent, without
a deferral.

Configuration problems raise ``PermanentDeliveryError`` from ``send`` instead, because they
would fail every reader alike and a batch must stop rather than mark them all failed: AUTH
refused or unsupported, a TLS error (such as an untrusted certificate), STARTTLS wanted but not
offered, a 5xx greeting, EHLO or STARTTLS reply, and a 530 (authentication required) to
MAIL FROM.

Timeouts: ``connect_timeout`` bounds connecting, TLS, the greeting, EHLO and AUTH together;
``command_timeout`` each of MAIL, RCPT, DATA and RSET; ``data_timeout`` the reply to the
final dot, which is when servers scan and queue the message.

A server that offers PIPELINING (RFC 2920) gets MAIL, RCPT and DATA in one write, and the
message after the 354: two round trips per message instead of four, with the same outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPException,
    SMTPHeloError,
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol

from mailer.config import Settings, SmtpSettings
from mailer.errors import DeliveryError, PermanentDeliveryError, SmtpConnectError, foreign

BACKOFF_CODES = frozenset({421, 450, 451, 452, 454})
MAX_REPLY = 500

_UNSAFE_ADDRESS = re.compile(r'[\s<>"\x00-\x1f\x7f]')
# A literal search: ~10 µs on 33 KB, where a multiline ^ anchor costs ~150 µs.
_DOT_AFTER_NEWLINE = re.compile(rb"\n\.")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient's message."""

    state: Literal["sent", "deferred", "failed"]
    code: int | None
    reply: str  # the server's reply text, or what went wrong; one line, at most MAX_REPLY
    domain_backoff: bool = False  # 421/450/451/452/454: slow down for this recipient's domain
    bounce: bool = False  # failed because of the recipient or the message (5xx to RCPT or DATA)
    # Deferred before anything was handed over: the server could not be reached or greeted.
    unreachable: bool = False


class _StaleConnection(Exception):
    """The connection was found closed when MAIL FROM was sent: nothing was sent yet."""


class _Replies(asyncio.Protocol):
    """Reads the replies to pipelined commands, standing in for aiosmtplib's protocol.

    aiosmtplib reads one reply per command and drops whatever arrives while a reply waits to
    be picked up, so replies that come together, as pipelined ones may, would be lost. While
    installed on the transport, this parses every reply that arrives, in order; the
    connection's loss still reaches aiosmtplib's protocol.
    """

    def __init__(self, smtp: SMTPProtocol) -> None:
        self._smtp = smtp
        self._buffer = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def leftover(self) -> bool:
        """Something arrived that no command asked for: the session is out of step."""
        return bool(self._replies or self._buffer)

    async def next(self, timeout: float) -> SMTPResponse:
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from None
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._error = exc
        self._wake()

    def _parse(self) -> None:
        """Move every complete reply from the buffer to the queue (as aiosmtplib parses one)."""
        lines: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start : end + 1])
            if len(line) > MAX_LINE_LENGTH:
                raise SMTPResponseException(500, "Response too long")
            start = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                raise SMTPResponseException(
                    500, f"Malformed SMTP response line: {line.decode('utf-8', 'ignore')}"
                ) from None
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] == b"-":
                continue
            text = b"\n".join(lines).decode("utf-8", "surrogateescape")
            self._replies.append(SMTPResponse(code, text))
            lines = []
            del self._buffer[:start]
            start = 0
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            raise SMTPResponseException(500, "Response too long")

    def eof_received(self) -> bool:
        self._error = SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not isinstance(self._error, SMTPServerDisconnected):
            self._error = SMTPServerDisconnected("Connection lost")
        self._wake()
        self._smtp.connection_lost(exc)

    def pause_writing(self) -> None:
        self._smtp.pause_writing()

    def resume_writing(self) -> None:
        self._smtp.resume_writing()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_REPLY]


def _reply(code: int, text: str, *, sender: str | None = None) -> Outcome:
    """The outcome of a reply other than the one we hoped for (to MAIL FROM if ``sender``)."""
    reply = _one_line(text if sender is None else f"sender {sender} refused: {text}")
    if not 500 <= code < 600:
        return Outcome("deferred", code, reply, code in BACKOFF_CODES)
    # A refused sender is our problem, not the reader's: no bounce.
    return Outcome("failed", code, reply, bounce=sender is None)


def _auth_required(reply: SMTPResponse) -> PermanentDeliveryError:
    return PermanentDeliveryError(
        _one_line(f"the SMTP server requires AUTH: {reply.code} {reply.message}")
    )


def _deferred(reply: str) -> Outcome:
    return Outcome("deferred", None, _one_line(reply))


def _failed(reply: str, *, bounce: bool = False) -> Outcome:
    return Outcome("failed", None, _one_line(reply), bounce=bounce)


def _path(address: str, utf8: bool) -> bytes:
    """``<address>`` for MAIL FROM or RCPT TO, refusing what could smuggle in a command."""
    if not address or _UNSAFE_ADDRESS.search(address):
        raise ValueError(f"cannot put {address!r} on an SMTP command line")
    return b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"


def _data_payload(message: bytes) -> bytes:
    """``message`` as DATA carries it: leading dots doubled, then the final dot.

    The message is final: its lines must already end in CRLF (``Personaliser``'s do).
    """
    if message.startswith(b"."):
        message = b"." + message
    message = _DOT_AFTER_NEWLINE.sub(b"\n..", message)
    return message + (b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n")


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _open(
    smtp: SmtpSettings,
    timeout: float,
    local_hostname: str,
    tls_context: ssl.SSLContext | None,
) -> SMTP:
    """A connected, greeted (EHLO), authenticated connection.

    Raises ``SmtpConnectError`` when worth retrying later, ``PermanentDeliveryError`` on a
    configuration problem.
    """
    conn = SMTP(
        hostname=smtp.host,
        port=smtp.port,
        username=smtp.username,
        password=smtp.password,
        local_hostname=local_hostname,
        timeout=timeout,
        use_tls=smtp.implicit_tls,
        start_tls=smtp.starttls,  # never opportunistic: a self-signed relay would fail it
        tls_context=tls_context,
    )
    try:
        async with asyncio.timeout(timeout):
            await conn.connect()
            if conn.is_ehlo_or_helo_needed:
                try:
                    await conn.ehlo()
                except SMTPHeloError:
                    await conn.helo()  # a pre-ESMTP server
    except (SMTPException, OSError) as exc:  # TimeoutError is an OSError
        conn.close()
        raise _connect_fault(exc, smtp, timeout) from None
    return conn


def _connect_fault(exc: Exception, smtp: SmtpSettings, timeout: float) -> DeliveryError:
    """``exc``, raised while connecting, as ours: its class from ``errors.FOREIGN``, except
    that a TLS failure under it is ours to fix, and anything unlisted there (an OSError, a
    timeout) means the server was not reached."""
    where = f"{smtp.host}:{smtp.port}"
    timed_out = isinstance(exc, SMTPTimeoutError | TimeoutError)
    tls = None if timed_out else _tls_error(exc)
    if tls is not None:
        return PermanentDeliveryError(_one_line(f"TLS with SMTP server {where} failed: {tls}"))
    code = exc.code if isinstance(exc, SMTPResponseException) else None
    said = f"{code} {exc.message}" if isinstance(exc, SMTPResponseException) else str(exc)
    if (foreign(exc) or SmtpConnectError) is SmtpConnectError:
        what = f"timed out after {timeout:g}s" if timed_out else f"failed: {said}"
        return SmtpConnectError(_one_line(f"connect to {where} {what}"), code)
    if isinstance(exc, SMTPAuthenticationError):
        said = f" refused AUTH as {smtp.username!r}: {said}"
    elif code is not None:  # a 5xx greeting, EHLO or STARTTLS
        said = f" refused us: {said}"
    else:  # STARTTLS or AUTH wanted but not offered
        said = f": {said}"
    return PermanentDeliveryError(_one_line(f"SMTP server {where}{said}"))


async def _default_local_hostname() -> str:
    return await asyncio.to_thread(socket.getfqdn)


async def probe(
    smtp: SmtpSettings,
    timeout: float,
    *,
    local_hostname: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Connect, greet, authenticate and quit: fail fast, before a send is planned.

    Raises ``SmtpConnectError`` (a ``TransientDeliveryError``) when the server cannot be
    reached or is busy, ``PermanentDeliveryError`` when it refuses our TLS or credentials.
    """
    hostname = local_hostname or await _default_local_hostname()
    conn = await _open(smtp, timeout, hostname, tls_context)
    try:
        await conn.quit(timeout=timeout)
    except (SMTPException, OSError):
        pass  # we only wanted to know that it answers
    finally:
        conn.close()


class SmtpPool:
    """Up to ``size`` SMTP connections, opened lazily and reused across messages.

    Use it from one event loop. Each connection serves one transaction at a time; a
    connection that failed, timed out or got 421 is dropped and reopened when next needed.
    ``tls_context`` overrides the system's certificate authorities (tests, private relays).
    """

    def __init__(
        self,
        smtp: SmtpSettings,
        *,
        size: int,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._smtp = smtp
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        self._slots = asyncio.Semaphore(size)
        self._idle: list[SMTP] = []
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, *, size: int | None = None) -> SmtpPool:
        """The configured server and timeouts; ``size`` connections (the configured
        concurrency unless given)."""
        return cls(
            settings.smtp,
            size=settings.smtp_concurrency if size is None else size,
            connect_timeout=settings.smtp_connect_timeout,
            command_timeout=settings.smtp_command_timeout,
            data_timeout=settings.smtp_data_timeout,
        )

    async def __aenter__(self) -> SmtpPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> Outcome:
        """Send ``message`` (final bytes) to one recipient; see the module doc for outcomes.

        Raises ``PermanentDeliveryError`` only on a configuration problem (AUTH, TLS).
        """
        if self._closed:
            raise RuntimeError("the SMTP pool is closed")
        async with self._slots:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._send_on(conn, envelope_from, recipient, message)
                except _StaleConnection:
                    pass  # the server had closed it while idle; nothing was sent: reopen
            try:
                conn = await self._connect()
            except SmtpConnectError as exc:
                backoff = exc.code in BACKOFF_CODES
                return Outcome("deferred", exc.code, str(exc), backoff, unreachable=True)
            try:
                return await self._send_on(conn, envelope_from, recipient, message)
            except _StaleConnection:
                return Outcome(
                    "deferred",
                    None,
                    "connection dropped before MAIL FROM was answered",
                    unreachable=True,
                )

    def _take_idle(self) -> SMTP | None:
        # Most recently used first: a light load keeps few connections open.
        while self._idle:
            conn = self._idle.pop()
            if conn.is_connected:
                return conn
            conn.close()
        return None

    async def _send_on(self, conn: SMTP, sender: str, recipient: str, message: bytes) -> Outcome:
        keep = False
        try:
            outcome, keep = await self._transact(conn, sender, recipient, message)
        finally:
            # On an exception (cancelled, a configuration error) the session's state is unknown.
            if keep and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()
        return outcome

    async def close(self) -> None:
        """QUIT the idle connections; those in use close when their transaction ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    async def _quit(self, conn: SMTP) -> None:
        try:
            await conn.quit(timeout=self._command_timeout)
        except (SMTPException, OSError):
            pass  # closing anyway
        finally:
            conn.close()

    async def _connect(self) -> SMTP:
        if self._local_hostname is None:
            self._local_hostname = await _default_local_hostname()
        return await _open(
            self._smtp, self._connect_timeout, self._local_hostname, self._tls_context
        )

    async def _transact(
        self, conn: SMTP, sender: str, recipient: str, message: bytes
    ) -> tuple[Outcome, bool]:
        """One MAIL/RCPT/DATA transaction: the outcome, and whether ``conn`` can be reused."""
        utf8 = not (sender.isascii() and recipient.isascii())
        if utf8 and not conn.supports_extension("smtputf8"):
            return _failed(f"the SMTP server does not take non-ASCII addresses: {recipient}"), True
        try:
            mail_from = b"FROM:" + _path(sender, utf8)
        except ValueError as exc:
            return _failed(f"invalid sender: {exc}"), True
        try:
            rcpt_to = b"TO:" + _path(recipient, utf8)
        except ValueError as exc:  # an address nobody can deliver to
            return _failed(f"invalid recipient: {exc}", bounce=True), True
        options = [b"SMTPUTF8"] if utf8 else []
        if (utf8 or not message.isascii()) and conn.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")

        mail = b" ".join([b"MAIL", mail_from, *options])
        rcpt = b"RCPT " + rcpt_to
        if conn.supports_extension("pipelining"):
            return await self._transact_pipelined(conn, sender, mail, rcpt, message)

        timeout = self._command_timeout
        step = "MAIL FROM"
        try:
            try:
                reply = await conn.execute_command(mail, timeout=timeout)
            except SMTPServerDisconnected:
                raise _StaleConnection from None
            if reply.code == 530:
                raise _auth_required(reply)
            if reply.code != 250:
                outcome = _reply(reply.code, reply.message, sender=sender)
                return outcome, reply.code != 421
            step = "RCPT TO"
            reply = await conn.execute_command(rcpt, timeout=timeout)
            if reply.code not in (250, 251):
                return await self._refused(conn, reply)
            step = "DATA"
            reply = await conn.execute_command(b"DATA", timeout=timeout)
            if reply.code != 354:
                return await self._refused(conn, reply)
            # aiosmtplib's data() would wait for the final reply with the command timeout.
            protocol = conn.protocol
            if protocol is None:
                raise SMTPServerDisconnected("connection lost")
            step = "end of data"
            timeout = self._data_timeout
            protocol.write(_data_payload(message))
            reply = await protocol.read_response(timeout=timeout)
        except SMTPResponseException as exc:  # a garbled or overlong reply
            return _deferred(f"bad reply to {step}: {exc.message}"), False
        except (SMTPTimeoutError, TimeoutError):
            return _deferred(f"timed out after {timeout:g}s waiting for the {step} reply"), False
        except (SMTPServerDisconnected, OSError) as exc:
            return _deferred(f"connection dropped during {step}: {exc}"), False
        if reply.code == 250:
            return Outcome("sent", 250, _one_line(reply.message)), True
        return _reply(reply.code, reply.message), reply.code != 421

    async def _transact_pipelined(
        self, conn: SMTP, sender: str, mail: bytes, rcpt: bytes, message: bytes
    ) -> tuple[Outcome, bool]:
        """``_transact`` with MAIL, RCPT and DATA in one write: the same outcomes, in two
        round trips. The first refusal among the three replies decides, as it would have
        stopped the unpipelined transaction there."""
        protocol = conn.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None or transport.is_closing():
            raise _StaleConnection
        replies = _Replies(protocol)
        timeout = self._command_timeout
        step = "MAIL FROM"
        refused: tuple[SMTPResponse, str | None] | None = None  # the first, and its sender
        transport.set_protocol(replies)
        try:
            try:
                protocol.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
                mail_reply = await replies.next(timeout)
            except SMTPServerDisconnected:
                raise _StaleConnection from None
            if mail_reply.code == 530:
                raise _auth_required(mail_reply)
            if mail_reply.code != 250:
                refused = mail_reply, sender
            # After a 421 the server hangs up without answering the rest: stop reading there.
            if mail_reply.code != 421:
                step = "RCPT TO"
                rcpt_reply = await replies.next(timeout)
                if refused is None and rcpt_reply.code not in (250, 251):
                    refused = rcpt_reply, None
                if rcpt_reply.code != 421:
                    step = "DATA"
                    data_reply = await replies.next(timeout)
                    if refused is None and data_reply.code != 354:
                        refused = data_reply, None
                    if refused is None:
                        step = "end of data"
                        timeout = self._data_timeout
                        protocol.write(_data_payload(message))
                        reply = await replies.next(timeout)
                    elif data_reply.code == 354:
                        # A server that took DATA with no recipient (RFC 2920 says it must
                        # not) gets an empty message, which it must refuse; then RSET.
                        step = "end of data"
                        protocol.write(b".\r\n")
                        await replies.next(timeout)
        except (
            SMTPResponseException,
            SMTPTimeoutError,
            TimeoutError,
            SMTPServerDisconnected,
            OSError,
        ) as exc:
            if refused is not None:  # the refusal stands; the session is past saving
                return _reply(refused[0].code, refused[0].message, sender=refused[1]), False
            if isinstance(exc, SMTPResponseException):  # a garbled or overlong reply
                return _deferred(f"bad reply to {step}: {exc.message}"), False
            if isinstance(exc, SMTPTimeoutError | TimeoutError):
                return _deferred(
                    f"timed out after {timeout:g}s waiting for the {step} reply"
                ), False
            return _deferred(f"connection dropped during {step}: {exc}"), False
        finally:
            transport.set_protocol(protocol)
        if refused is not None:
            return await self._refused(conn, refused[0], sender=refused[1])
        keep = not replies.leftover and reply.code != 421
        if reply.code == 250:
            return Outcome("sent", 250, _one_line(reply.message)), keep
        return _reply(reply.code, reply.message), keep

    async def _refused(
        self, conn: SMTP, reply: SMTPResponse, *, sender: str | None = None
    ) -> tuple[Outcome, bool]:
        """After a refusal mid-transaction, RSET so the connection can carry the next one."""
        outcome = _reply(reply.code, reply.message, sender=sender)
        if reply.code == 421 or not conn.is_connected:
            return outcome, False
        try:
            await conn.rset(timeout=self._command_timeout)
        except (SMTPException, OSError):
            return outcome, False
        return outcome, True
