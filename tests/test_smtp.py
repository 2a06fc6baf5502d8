"""SmtpPool and probe against real SMTP servers (aiosmtpd on loopback, see smtp_servers)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
import uvloop
from helpers import free_port
from smtp_servers import (
    CloseAfter,
    DropAfterData,
    Recorder,
    Refuse,
    Slow,
    SmtpServer,
    black_hole,
    client_tls_context,
    greylist,
    serve,
)

from mailer.config import SmtpSettings
from mailer.delivery.smtp import MAX_REPLY, Outcome, SmtpPool, probe
from mailer.errors import PermanentDeliveryError, SmtpConnectError, TransientDeliveryError

SENDER = "bounces+t0k3n@news.test"
# The same outcomes whether or not the server offers PIPELINING (RFC 2920).
PIPELINING = pytest.mark.parametrize("pipelining", [False, True], ids=["sequential", "pipelined"])
MESSAGE = b"From: news@news.test\r\nSubject: Hello\r\n\r\nFirst line\r\n.a line with a dot\r\n"


def pool_for(server: SmtpServer | SmtpSettings, **changes: Any) -> SmtpPool:
    options: dict[str, Any] = {
        "size": 2,
        "connect_timeout": 2.0,
        "command_timeout": 2.0,
        "data_timeout": 2.0,
        "local_hostname": "client.test",
        "tls_context": client_tls_context(),
    }
    settings = server.settings() if isinstance(server, SmtpServer) else server
    return SmtpPool(settings, **(options | changes))


def send_each(
    server: SmtpServer | SmtpSettings, recipients: Sequence[str], **changes: Any
) -> list[Outcome]:
    """Sends MESSAGE to each recipient in turn over one pool."""

    async def run() -> list[Outcome]:
        async with pool_for(server, **changes) as pool:
            return [await pool.send(SENDER, rcpt, MESSAGE) for rcpt in recipients]

    return asyncio.run(run())


@PIPELINING
def test_delivers_the_exact_bytes_with_the_envelope(pipelining: bool) -> None:
    with serve(pipelining=pipelining) as server:
        [outcome] = send_each(server, ["reader@example.org"])
        [message] = server.handler.wait_for(1)
    assert outcome == Outcome("sent", 250, "2.0.0 OK: queued")
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ("reader@example.org",)
    assert message.data == MESSAGE  # the leading dot went through doubled and came back
    assert message.mail_options == ()  # 7-bit ASCII: no BODY or SMTPUTF8
    assert server.handler.pipelined == [pipelining]  # RCPT TO went with MAIL FROM if offered


@PIPELINING
def test_many_messages_reuse_few_connections(pipelining: bool) -> None:
    async def run(server: SmtpServer) -> list[Outcome]:
        async with pool_for(server, size=4) as pool:
            sends = (pool.send(SENDER, f"r{i}@example.org", MESSAGE) for i in range(60))
            return await asyncio.gather(*sends)

    with serve(pipelining=pipelining) as server:
        outcomes = asyncio.run(run(server))
        messages = server.handler.wait_for(60)
        connections = server.connections
    assert {o.state for o in outcomes} == {"sent"}
    assert sorted(m.rcpt_tos[0] for m in messages) == sorted(f"r{i}@example.org" for i in range(60))
    assert 1 <= connections <= 4


def test_a_pool_used_one_message_at_a_time_keeps_one_connection() -> None:
    with serve() as server:
        outcomes = send_each(server, [f"r{i}@example.org" for i in range(10)], size=8)
        connections = server.connections
    assert [o.state for o in outcomes] == ["sent"] * 10
    assert connections == 1


@PIPELINING
@pytest.mark.parametrize(
    ("stage", "reply", "state", "backoff"),
    [
        ("mail", "451 4.3.0 Try again later", "deferred", True),
        ("mail", "553 5.7.1 Sender address rejected", "failed", False),
        ("rcpt", "450 4.2.0 Mailbox busy", "deferred", True),
        ("rcpt", "452 4.5.3 Too many recipients", "deferred", True),
        ("rcpt", "454 4.7.1 Relay access temporarily denied", "deferred", True),
        ("rcpt", "441 4.4.1 No answer from host", "deferred", False),
        ("rcpt", "550 5.1.1 No such user", "failed", False),
        ("data", "451 4.3.0 Local error in processing", "deferred", True),
        ("data", "554 5.7.1 Message rejected as spam", "failed", False),
    ],
)
def test_a_refusal_maps_to_an_outcome_and_the_connection_stays_usable(
    stage: Any, reply: str, state: str, backoff: bool, pipelining: bool
) -> None:
    gone = SENDER if stage == "mail" else "gone@example.org"
    handler = Refuse(reply, stage=stage, address=gone, once=True)
    with serve(handler, pipelining=pipelining) as server:
        refused, after = send_each(server, ["gone@example.org", "next@example.org"])
        [message] = server.handler.wait_for(1)
        connections = server.connections
    code, text = reply.split(" ", 1)
    assert (refused.state, refused.code, refused.domain_backoff) == (state, int(code), backoff)
    # Only the reader's own refusal is a hard bounce; a refused sender is our problem.
    assert refused.bounce == (state == "failed" and stage != "mail")
    if stage == "mail":
        assert refused.reply == f"sender {SENDER} refused: {text}"
    else:
        assert refused.reply == text
    # The refusal left no half-open transaction behind (RSET): the next message goes through.
    assert after.state == "sent"
    assert message.rcpt_tos == ("next@example.org",)
    assert connections == 1


@PIPELINING
def test_greylisting_defers_then_the_retry_is_sent(pipelining: bool) -> None:
    with serve(greylist(), pipelining=pipelining) as server:
        first, retry = send_each(server, ["reader@example.org"] * 2)
    assert (first.state, first.code, first.domain_backoff) == ("deferred", 451, True)
    assert retry.state == "sent"


@PIPELINING
def test_421_defers_with_backoff_and_the_next_message_reconnects(pipelining: bool) -> None:
    handler = Refuse("421 4.7.0 Too busy, closing", address="busy@example.org")
    with serve(handler, pipelining=pipelining) as server:
        busy, after = send_each(server, ["busy@example.org", "next@example.org"])
        connections = server.connections
    assert (busy.state, busy.code, busy.domain_backoff) == ("deferred", 421, True)
    assert after.state == "sent"
    assert connections == 2


@PIPELINING
def test_421_mid_session_then_hang_up(pipelining: bool) -> None:
    with serve(CloseAfter(3), pipelining=pipelining) as server:
        outcomes = send_each(server, [f"r{i}@example.org" for i in range(8)])
        messages = server.handler.wait_for(6)
        connections = server.connections
    assert [o.state for o in outcomes] == ["sent"] * 3 + ["deferred"] + ["sent"] * 3 + ["deferred"]
    assert (outcomes[3].code, outcomes[3].domain_backoff) == (421, True)
    assert outcomes[3].reply.startswith(f"sender {SENDER} refused: 4.7.0")
    assert len(messages) == 6
    assert connections == 2


@PIPELINING
def test_connection_dropped_after_data_defers_without_a_code(pipelining: bool) -> None:
    with serve(DropAfterData(), pipelining=pipelining) as server:
        dropped, retry = send_each(server, ["reader@example.org"] * 2)
        connections = server.connections
    assert (dropped.state, dropped.code, dropped.domain_backoff) == ("deferred", None, False)
    assert dropped.reply.startswith("connection dropped during end of data")
    assert retry.state == "sent"
    assert connections == 2


@PIPELINING
def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_deferral(
    pipelining: bool,
) -> None:
    async def run(server: SmtpServer) -> list[Outcome]:
        async with pool_for(server) as pool:
            first = await pool.send(SENDER, "a@example.org", MESSAGE)
            # Block the loop: the client cannot notice the hang-up before it sends MAIL FROM.
            time.sleep(0.4)
            return [first, await pool.send(SENDER, "b@example.org", MESSAGE)]

    with serve(timeout=0.1, pipelining=pipelining) as server:  # aiosmtpd hangs up after 0.1 s idle
        outcomes = asyncio.run(run(server))
        connections = server.connections
    assert [o.state for o in outcomes] == ["sent", "sent"]
    assert connections == 2


@PIPELINING
@pytest.mark.parametrize(
    ("stage", "timeouts", "step"),
    [
        ("rcpt", {"command_timeout": 0.2}, "RCPT TO"),
        ("data", {"data_timeout": 0.2}, "end of data"),
    ],
)
def test_a_slow_reply_times_out_and_defers(
    stage: Any, timeouts: dict[str, float], step: str, pipelining: bool
) -> None:
    with serve(Slow(2.0, stage=stage, once=True), pipelining=pipelining) as server:
        slow, after = send_each(server, ["reader@example.org"] * 2, **timeouts)
        connections = server.connections
    assert slow == Outcome("deferred", None, f"timed out after 0.2s waiting for the {step} reply")
    assert after.state == "sent"
    assert connections == 2


@PIPELINING
def test_the_data_timeout_not_the_command_timeout_bounds_the_final_reply(pipelining: bool) -> None:
    with serve(Slow(0.4, stage="data"), pipelining=pipelining) as server:
        [outcome] = send_each(server, ["reader@example.org"], command_timeout=0.1, data_timeout=2.0)
    assert outcome.state == "sent"


def test_a_server_that_never_greets_times_out_and_defers() -> None:
    with black_hole() as port:
        [outcome] = send_each(SmtpSettings("127.0.0.1", port), ["a@x.org"], connect_timeout=0.2)
    reply = f"connect to 127.0.0.1:{port} timed out after 0.2s"
    assert outcome == Outcome("deferred", None, reply, unreachable=True)


def test_a_refused_connection_defers() -> None:
    port = free_port()
    [outcome] = send_each(SmtpSettings("127.0.0.1", port), ["a@example.org"])
    assert (outcome.state, outcome.code, outcome.unreachable) == ("deferred", None, True)
    assert outcome.reply.startswith(f"connect to 127.0.0.1:{port} failed:")
    assert len(outcome.reply) <= MAX_REPLY and "\n" not in outcome.reply


def test_a_421_greeting_defers_with_backoff() -> None:
    # aiosmtpd cannot refuse its greeting, so greet with 421 from a raw socket server.
    async def run() -> Outcome:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"421 4.3.2 Service shutting down\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, pool_for(SmtpSettings("127.0.0.1", port)) as pool:
            return await pool.send(SENDER, "a@example.org", MESSAGE)

    outcome = asyncio.run(run())
    assert (outcome.state, outcome.code, outcome.domain_backoff) == ("deferred", 421, True)


@PIPELINING
def test_auth(pipelining: bool) -> None:
    with serve(auth=("newsletter", "s3cret"), pipelining=pipelining) as server:
        [sent] = send_each(server, ["a@example.org"])
        with pytest.raises(PermanentDeliveryError, match="refused AUTH as 'newsletter': 535"):
            send_each(server.settings(password="wrong"), ["a@example.org"])
        with pytest.raises(PermanentDeliveryError, match="requires AUTH: 530"):
            send_each(server.settings(username=None, password=None), ["a@example.org"])
        assert len(server.handler.messages) == 1
    assert sent.state == "sent"


# A connection given up mid-handshake sometimes leaves its socket for the garbage collector to
# close (aiosmtplib closes its transport, the loop ends first): reported, but not our fault.
LEFT_TO_GC = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)


@LEFT_TO_GC
@pytest.mark.parametrize("mode", ["starttls", "implicit_tls"])
def test_tls(mode: str) -> None:
    with serve(**{mode: True}) as server:  # type: ignore[arg-type]
        [outcome] = send_each(server, ["a@example.org"])
        # The system's authorities do not know the test CA: a configuration error.
        with pytest.raises(PermanentDeliveryError, match=r"TLS with SMTP server .* failed"):
            send_each(server, ["a@example.org"], tls_context=ssl.create_default_context())
    assert outcome.state == "sent"  # the STARTTLS server refuses MAIL FROM before STARTTLS


@LEFT_TO_GC
def test_starttls_required_but_not_offered_is_a_configuration_error() -> None:
    with serve() as server, pytest.raises(PermanentDeliveryError, match="STARTTLS"):
        send_each(server.settings(starttls=True), ["a@example.org"])


@PIPELINING
def test_non_ascii_addresses_use_smtputf8(pipelining: bool) -> None:
    with serve(pipelining=pipelining) as server:
        [outcome] = send_each(server, ["jürgen@exämple.org"])
        [message] = server.handler.wait_for(1)
    assert outcome.state == "sent"
    assert message.rcpt_tos == ("jürgen@exämple.org",)
    assert set(message.mail_options) == {"SMTPUTF8", "BODY=8BITMIME"}


def test_an_address_that_cannot_go_on_a_command_line_fails_alone() -> None:
    with serve() as server:
        bad, good = send_each(server, ["a@example.org> NOTIFY=NEVER", "b@example.org"])
    assert (bad.state, bad.code, bad.bounce) == ("failed", None, True)
    assert bad.reply.startswith("invalid recipient: cannot put")
    assert good.state == "sent"


def test_probe() -> None:
    with serve(auth=("newsletter", "s3cret")) as server:
        asyncio.run(probe(server.settings(), 2.0))
        with pytest.raises(PermanentDeliveryError, match="535"):
            asyncio.run(probe(server.settings(password="wrong"), 2.0))
    with pytest.raises(SmtpConnectError, match=r"connect to 127\.0\.0\.1:\d+ failed") as info:
        asyncio.run(probe(SmtpSettings("127.0.0.1", free_port()), 2.0))
    assert isinstance(info.value, TransientDeliveryError)


def test_close_quits_idle_connections_and_the_pool_refuses_more() -> None:
    async def run(server: SmtpServer) -> None:
        pool = pool_for(server)
        await pool.send(SENDER, "a@example.org", MESSAGE)
        await pool.close()
        with pytest.raises(RuntimeError, match="closed"):
            await pool.send(SENDER, "b@example.org", MESSAGE)

    class CountQuits(Recorder):
        quits = 0

        async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
            CountQuits.quits += 1
            return "221 Bye"

    with serve(CountQuits()) as server:
        asyncio.run(run(server))
    assert CountQuits.quits == 1


async def _scripted_server(
    replies: dict[bytes, bytes],
    sessions: list[int],
    *,
    byte_by_byte: bool = False,
    hang_up_after: bytes | None = None,
) -> asyncio.Server:
    """A PIPELINING server that answers each command by its verb from ``replies`` (defaults:
    250, and 354 to DATA); the replies to commands that came together go out in one write,
    or byte by byte; it hangs up right after answering ``hang_up_after``. Appends to
    ``sessions`` once per connection."""
    answers = {b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n"}
    answers |= {b"RSET": b"250 reset\r\n", b"QUIT": b"221 bye\r\n", b".": b"250 queued\r\n"}
    answers |= replies

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(1)
        writer.write(b"220 scripted\r\n")
        in_data = False
        out = b""
        while line := await reader.readline():
            if in_data and line != b".\r\n":
                continue
            verb = line.split()[0]
            if verb == b"EHLO":
                out += b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            else:
                out += answers.get(verb, b"500 what\r\n")
                in_data = verb == b"DATA" and out.endswith(b"354 go\r\n")
            if verb != hang_up_after and b"\n" in getattr(reader, "_buffer"):  # noqa: B009
                continue  # more commands came with this one: answer them together
            for i in range(len(out)) if byte_by_byte else [0]:
                writer.write(out[i : i + 1] if byte_by_byte else out)
                await writer.drain()
            out = b""
            if verb in (b"QUIT", hang_up_after):
                break
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["together", "byte-by-byte"])
@pytest.mark.parametrize("run_loop", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_pipelined_replies_are_read_however_they_arrive(
    byte_by_byte: bool, run_loop: Callable[[Coroutine[Any, Any, list[Outcome]]], list[Outcome]]
) -> None:
    sessions: list[int] = []

    async def run() -> list[Outcome]:
        multiline = {b"MAIL": b"250-first line\r\n250 2.1.0 sender ok\r\n"}
        server = await _scripted_server(multiline, sessions, byte_by_byte=byte_by_byte)
        port = server.sockets[0].getsockname()[1]
        async with server, pool_for(SmtpSettings("127.0.0.1", port), size=1) as pool:
            return [await pool.send(SENDER, f"r{i}@example.org", MESSAGE) for i in range(3)]

    # The workers run uvloop (Runtime), whose transports take a new protocol their own way.
    assert run_loop(run()) == [Outcome("sent", 250, "queued")] * 3
    assert len(sessions) == 1


def test_a_server_that_takes_data_without_a_recipient_gets_an_empty_message_then_rset() -> None:
    # RFC 2920 says it must refuse DATA then; an RFC 1854 server may answer 354 all the same.
    sessions: list[int] = []

    async def run() -> list[Outcome]:
        script = {b"RCPT": b"550 5.1.1 no such user\r\n", b".": b"554 5.5.1 no recipients\r\n"}
        server = await _scripted_server(script, sessions)
        port = server.sockets[0].getsockname()[1]
        async with server, pool_for(SmtpSettings("127.0.0.1", port), size=1) as pool:
            return [await pool.send(SENDER, f"r{i}@example.org", MESSAGE) for i in range(2)]

    refused = Outcome("failed", 550, "5.1.1 no such user", bounce=True)
    assert asyncio.run(run()) == [refused, refused]
    assert len(sessions) == 1  # the empty message and RSET kept the session in step


@pytest.mark.parametrize(
    ("verb", "reply", "outcome"),
    [
        (
            b"MAIL",
            b"554 5.7.1 go away\r\n",
            Outcome("failed", 554, f"sender {SENDER} refused: 5.7.1 go away"),
        ),
        (
            b"RCPT",
            b"550 5.1.1 no such user\r\n",
            Outcome("failed", 550, "5.1.1 no such user", bounce=True),
        ),
        (b"RCPT", b"452 4.5.3 too many\r\n", Outcome("deferred", 452, "4.5.3 too many", True)),
    ],
)
def test_a_refusal_then_a_hang_up_keeps_the_refusals_outcome(
    verb: bytes, reply: bytes, outcome: Outcome
) -> None:
    # Pipelined, the replies to the commands behind the refused one never come.
    sessions: list[int] = []

    async def run() -> list[Outcome]:
        server = await _scripted_server({verb: reply}, sessions, hang_up_after=verb)
        port = server.sockets[0].getsockname()[1]
        async with server, pool_for(SmtpSettings("127.0.0.1", port), size=1) as pool:
            return [await pool.send(SENDER, f"r{i}@example.org", MESSAGE) for i in range(2)]

    assert asyncio.run(run()) == [outcome, outcome]
    assert len(sessions) == 2  # the broken session was not reused
