"""``mailer dkim``: make a signing key, and print the DNS records to publish."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.common import JsonFlag, print_json, settings
from mailer.config import dns_name
from mailer.errors import InputError

app = typer.Typer(name="dkim", help="DKIM: make a key, print the DNS records to publish.")


@app.command()
def keygen(
    domain: Annotated[str, typer.Option(help="The signing domain (d=), e.g. example.com.")],
    selector: Annotated[str, typer.Option(help="The selector (s=), e.g. mailer2026.")],
    out: Annotated[Path, typer.Option(help="Where to write the private key (PEM).")],
    ed25519_key: Annotated[
        bool, typer.Option("--ed25519", help="An Ed25519 key (RFC 8463) instead of RSA 2048.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write a new private key (mode 0600, never over a file) and print its DNS record."""
    from mailer.delivery.dkim import DkimKey, dns_record, generate_key, private_pem

    names = []
    for option, value in (("--domain", domain), ("--selector", selector)):
        try:
            names.append(dns_name(value))
        except ValueError as exc:
            raise InputError(f"{option}: {value!r} {exc}") from None
    key = DkimKey(names[0].lower(), names[1], generate_key(ed25519_key))
    try:
        # O_EXCL: refuses an existing file; 0600 from the start, never readable by others.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(f"--out: {out} exists; not overwriting a key") from None
    except OSError as exc:
        raise InputError(f"--out: cannot write {out}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(private_pem(key.key))
    name, value = dns_record(key)
    if as_json:
        print_json({"key_file": str(out), "record_name": name, "record_value": value})
        return
    typer.echo(f"wrote {out}; publish this TXT record:")
    typer.echo(f"{name}. IN TXT {_zone_text(value)}")


@app.command()
def check() -> None:
    """Read the configured key and print the SPF, DKIM and DMARC records to publish, as lines
    of a zone file."""
    from mailer.delivery.dkim import dns_record, signer_from_settings

    config = settings()
    signer = signer_from_settings(config)
    if signer is None:
        raise InputError(
            "DKIM is off: set MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR and "
            "MAILER_DKIM_KEY_FILE (`mailer dkim keygen` makes a key)"
        )
    domain = config.dkim_domain
    spf = _zone_text(f"v=spf1 mx {_spf_host(config.smtp.host)} ~all")
    typer.echo(f"{domain}. IN TXT {spf}  ; SPF: your SMTP relay")
    for key in signer.keys:
        name, value = dns_record(key)
        typer.echo(f"{name}. IN TXT {_zone_text(value)}  ; DKIM, {key.algorithm}")
    dmarc = _zone_text(f"v=DMARC1; p=none; rua=mailto:dmarc@{domain}")
    typer.echo(f"_dmarc.{domain}. IN TXT {dmarc}  ; DMARC")


def _zone_text(value: str) -> str:
    """``value`` as a zone file writes TXT data: quoted strings of at most 255 characters
    (RFC 1035; an RSA-2048 DKIM key is ~400), which resolvers join again (RFC 6376 3.6.2.2)."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def _spf_host(host: str) -> str:
    """The SPF mechanism for the relay: ``a:`` takes a name only (RFC 7208 5.3), an address
    goes in ``ip4:`` or ``ip6:``."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"a:{host}"
    return f"ip{address.version}:{address}"
