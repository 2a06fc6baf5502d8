"""DKIM: keys from `mailer dkim keygen`, and every message of a send verified by dkimpy against
the record keygen printed (relaxed/relaxed, RSA 2048 and Ed25519); a bad key is one error."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import stat
import subprocess
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
import spf
from conftest import sqlite_only
from helpers import cli, dev_env, free_port, run_mailer
from smtp_servers import serve
from sqlalchemy import Engine
from workers import add_readers, environment

from mailer import db, sends

pytestmark = pytest.mark.subprocess

POST = "---\ntitle: Signed\n---\n\nHello {{ name }}.\n"
REQUIRED = {
    b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
    b"list-unsubscribe", b"list-unsubscribe-post", b"list-id", b"feedback-id",
}  # fmt: skip


def keygen(env: dict[str, str], cwd: Path, out: Path, *extra: str) -> dict[str, str]:
    args = ["dkim", "keygen", "--domain", "example.com", "--out", str(out), "--json", *extra]
    found: dict[str, str] = json.loads(run_mailer(env, cwd, *args))
    return found


def zone_records(lines: str, folder: Path) -> dict[str, str]:
    """Each record of ``lines`` (a zone file's, as `mailer dkim check` prints them), once BIND's
    own checker has loaded them into a zone: its name and its TXT strings joined, as a resolver
    hands them to a verifier (RFC 6376 3.6.2.2)."""
    zone = folder / "example.com.zone"
    zone.write_text(
        "$TTL 3600\n"
        "example.com. IN SOA ns1.example.com. hostmaster.example.com. 1 3600 600 86400 3600\n"
        "example.com. IN NS ns1.example.com.\n"
        f"ns1.example.com. IN A 192.0.2.1\n{lines}"
    )
    checked = subprocess.run(
        ["named-checkzone", "example.com", str(zone)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    records = {}
    for line in lines.splitlines():
        name, _, data = line.partition(" IN TXT ")
        strings = re.findall(r'"([^"]*)"', data)  # the comment after them holds no quote
        assert strings and all(len(string) <= 255 for string in strings), line
        records[name] = "".join(strings)
    return records


def spf_verdict(record: str, client: str) -> str:
    """pyspf's verdict on mail from ``client`` under ``record`` (strict: a syntax error is a
    permerror); DNS answers nothing, so only the record's own mechanisms can match."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spf, "DNSLookup", lambda *args, **kwargs: [])
        query = spf.query(i=client, s="news@example.com", h="mx.example.com", strict=True)
        verdict, _, _ = query.check(spf=record)
    return str(verdict)


@sqlite_only
def test_every_message_of_a_send_verifies_with_both_keys(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    add_readers(engine, 12)
    (tmp_path / "post.md").write_text(POST)
    with serve() as server:
        env = environment(db_url, f"redis://127.0.0.1:{free_port()}/0", server.settings().port)
        rsa = keygen(env, tmp_path, tmp_path / "rsa.pem", "--selector", "r2026")
        ed = keygen(env, tmp_path, tmp_path / "ed.pem", "--selector", "r2026-ed25519", "--ed25519")
        assert rsa == {
            "key_file": str(tmp_path / "rsa.pem"),
            "record_name": "r2026._domainkey.example.com",
            "record_value": rsa["record_value"],
        }
        assert rsa["record_value"].startswith("v=DKIM1; k=rsa; p=")
        assert ed["record_value"].startswith("v=DKIM1; k=ed25519; p=")
        for key in ("rsa.pem", "ed.pem"):
            assert stat.S_IMODE(os.stat(tmp_path / key).st_mode) == 0o600
        env |= {
            "MAILER_DKIM_DOMAIN": "example.com",
            "MAILER_DKIM_SELECTOR": "r2026",
            "MAILER_DKIM_KEY_FILE": str(tmp_path / "rsa.pem"),
            "MAILER_DKIM_ED25519_KEY_FILE": str(tmp_path / "ed.pem"),
        }
        records = run_mailer(env, tmp_path, "dkim", "check")
        published_as = zone_records(records, tmp_path)
        assert published_as["r2026._domainkey.example.com."] == rsa["record_value"]
        assert published_as["r2026-ed25519._domainkey.example.com."] == ed["record_value"]
        assert published_as["_dmarc.example.com."].startswith("v=DMARC1; p=none;")
        # The relay is 127.0.0.1: SPF's a: takes no address (RFC 7208), ip4: does.
        assert spf_verdict(published_as["example.com."], "127.0.0.1") == "pass"
        assert spf_verdict(published_as["example.com."], "192.0.2.9") == "softfail"
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        run_mailer(env, tmp_path, "send", "signed", "--segment", "all", "--yes")
        messages = server.handler.messages
    assert len(messages) == 12
    published = {
        f"{r['record_name']}.".encode(): r["record_value"].encode() for r in (rsa, ed)
    }  # what a verifier looks up in DNS

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name)

    for message in messages:
        follows_the_bulk_sender_rules(message.data)
        verifier = dkim.DKIM(message.data)
        assert verifier.verify(idx=0, dnsfunc=dns), message.rcpt_tos
        assert verifier.verify(idx=1, dnsfunc=dns), message.rcpt_tos
        head = message.data.split(b"\r\n\r\n", 1)[0]
        signed = head.split(b"h=", 1)[1].split(b";", 1)[0].split(b":")
        assert set(signed) >= REQUIRED and b"c=relaxed/relaxed" in head


def test_keygen_refuses_to_overwrite_and_names_a_bad_input(tmp_path: Path) -> None:
    env = dev_env()
    key = tmp_path / "key.pem"
    key.write_text("precious")
    done = cli(env, tmp_path, "dkim", "keygen", "--domain", "example.com",
                  "--selector", "s", "--out", str(key))  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("error: --out:")
    assert "not overwriting" in done.stderr and key.read_text() == "precious"
    for option, bad in (("--domain", "exa mple.com"), ("--domain", "-x.com"),
                        ("--selector", "sé"), ("--selector", "s;t=y")):  # fmt: skip
        names = {"--domain": "example.com", "--selector": "s", option: bad}
        args = [word for pair in names.items() for word in pair]
        done = cli(env, tmp_path, "dkim", "keygen", *args, "--out", str(tmp_path / "new.pem"))
        assert done.returncode == 1 and done.stderr.startswith(f"error: {option}:"), done
        assert not (tmp_path / "new.pem").exists()
    # Without --json, the record as a zone file's line, which BIND loads.
    written = run_mailer(env, tmp_path, "dkim", "keygen", "--domain", "Example.COM.",
                         "--selector", "s", "--out", str(tmp_path / "new.pem"))  # fmt: skip
    instructions, record = written.strip().splitlines()
    assert instructions == f"wrote {tmp_path / 'new.pem'}; publish this TXT record:"
    assert zone_records(record, tmp_path)["s._domainkey.example.com."].startswith("v=DKIM1; k=rsa")


@sqlite_only
def test_a_bad_key_is_one_error_at_send_and_fails_the_send_not_a_batch(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    add_readers(engine, 3)
    (tmp_path / "post.md").write_text(POST)
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    with serve() as server:
        env = environment(db_url, f"redis://127.0.0.1:{free_port()}/0", server.settings().port)
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        send = ["send", "signed", "--segment", "all", "--yes"]
        bad_keys = (
            ("bad.pem", "is not an unencrypted PEM"),
            ("gone.pem", "cannot read"),
            ("/dev/zero", "is over 64 KB: not a key"),  # read to its end, it would never end
        )
        for path, reason in bad_keys:
            env |= {
                "MAILER_DKIM_DOMAIN": "example.com",
                "MAILER_DKIM_SELECTOR": "s",
                "MAILER_DKIM_KEY_FILE": str(tmp_path / path),
            }
            done = cli(env, tmp_path, *send)
            assert done.returncode == 1 and done.stdout == "", done
            assert done.stderr.startswith("error: MAILER_DKIM_KEY_FILE:") and reason in done.stderr
        done = cli({**env, "MAILER_DKIM_SELECTOR": ""}, tmp_path, *send)
        assert done.stderr.startswith("error: MAILER_DKIM_SELECTOR: required with")
        with db.session(engine) as session:
            assert sends.list_sends(session) == []  # nothing half-made

        # The key went away after the send was planned: the send fails, saying why.
        keygen(env, tmp_path, tmp_path / "good.pem", "--selector", "s")
        env["MAILER_DKIM_KEY_FILE"] = str(tmp_path / "good.pem")
        send_id = int(run_mailer(env, tmp_path, *send, "--at", "in 1h"))
        (tmp_path / "good.pem").unlink()
        run_mailer(env, tmp_path, "sends", "start", str(send_id), "--yes")
        assert server.handler.messages == []
    with db.session(engine) as session:
        info = sends.show(session, send_id)
    assert info.status == "failed" and "MAILER_DKIM_KEY_FILE" in (info.error or "")
    assert info.counts["queued"] == 3


def follows_the_bulk_sender_rules(data: bytes) -> None:
    """What Gmail's and Yahoo's 2024 rules for bulk senders ask of each message."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    for header in ("From", "Message-ID", "Date", "Feedback-ID", "List-Id"):
        assert len(parsed.get_all(header) or []) == 1, header
    unsubscribe = str(parsed["List-Unsubscribe"])
    assert "<https://" in unsubscribe or "<http://" in unsubscribe
    assert "<mailto:unsubscribe+" in unsubscribe
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert isinstance(parsed, EmailMessage)
    for kind in ("plain", "html"):
        part = parsed.get_body((kind,))
        assert part is not None, kind
        assert "/u/" in part.get_content(), f"no visible unsubscribe link in the {kind} part"
