"""DKIM's cost (issue 11): a whole send signed, against the same send unsigned, in one run.

Target: signed throughput at least 0.7x unsigned. Each send is measured as in
``send_bench`` (``mailer send --wait`` from start to exit, default settings, one worker with its
default processes, Postfix's ``smtp-sink``), one after the other on the same sink: unsigned,
signed with an RSA-2048 key (``MAILER_DKIM_KEY_FILE``), then with an Ed25519 key added
(``MAILER_DKIM_ED25519_KEY_FILE``: two signatures per message). The three run in turn for
several rounds, because one round's ratio swings by a tenth with the shared machine's load: each
round's ratio is signed over the unsigned send just before it, and the verdict is on their
median. Also the cost of one signature of the pipeline's own message, in this process, for each
key type, and the ceiling that cost sets: the signed send can at best add what signing adds
to a message in the pipeline (the signature, the body's hash and the signed headers) to the
unsigned send's CPU, on every core. And what signing adds to the worker's CPU per message in
the sends, against what it adds in a quiet process: signing's own cost, which the ratio mixes
with everything else the unsigned send waits on.

Readers from ``BENCH_DKIM_SIZE`` (default 20000), rounds from ``BENCH_DKIM_ROUNDS`` (default 3),
the database from ``BENCH_DKIM_DATABASE`` (``sqlite``, the default setting, or ``postgres``: a
throwaway database on the local server), the post from ``BENCH_SEND_POST``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

from bench.delivery_bench import BENCH_READER, paid_message, paid_personaliser, smtp_sink
from bench.send_bench import POST, Row, one_size, print_row
from mailer.compose import Publication, compose
from mailer.config import load_settings
from mailer.delivery.dkim import DkimKey, DkimSigner, generate_key, private_pem
from mailer.posts import parse_post

SIZE = int(os.environ.get("BENCH_DKIM_SIZE", "20000"))
ROUNDS = int(os.environ.get("BENCH_DKIM_ROUNDS", "3"))
POSTGRES = os.environ.get("BENCH_DKIM_DATABASE", "sqlite") == "postgres"
DATABASE = "PostgreSQL" if POSTGRES else "SQLite"
TARGET = 0.7
DOMAIN = "news.example.com"
SIGNATURES = 1000


def _keys(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The settings of an RSA-signed send, and of one signed with Ed25519 as well."""
    rsa_file, ed_file = folder / "dkim-rsa.pem", folder / "dkim-ed25519.pem"
    rsa_file.write_bytes(private_pem(generate_key()))
    ed_file.write_bytes(private_pem(generate_key(ed25519_key=True)))
    rsa = {
        "MAILER_DKIM_DOMAIN": DOMAIN,
        "MAILER_DKIM_SELECTOR": "bench",
        "MAILER_DKIM_KEY_FILE": str(rsa_file),
    }
    return rsa, {**rsa, "MAILER_DKIM_ED25519_KEY_FILE": str(ed_file)}


def signature_cost(ed25519_key: bool) -> tuple[float, float]:
    """Microseconds to sign the pipeline's paid message once with one key of that type, and
    what signing adds to each message as the pipeline makes it (a ``Personaliser`` given the
    signer relaxes its template's body once)."""
    settings = load_settings({"MAILER_ENV": "dev"}, env_file=None)
    composition = compose(parse_post(POST), Publication.from_settings(settings))
    message = paid_message(composition, settings)
    signer = DkimSigner([DkimKey(DOMAIN, "bench", generate_key(ed25519_key))])
    start = time.perf_counter()
    for _ in range(SIGNATURES):
        signer.sign(message)
    alone = (time.perf_counter() - start) / SIGNATURES * 1e6
    costs = []
    for dkim in (None, signer):
        personaliser = paid_personaliser(composition, settings, dkim)
        start = time.perf_counter()
        for _ in range(SIGNATURES):
            personaliser.personalise(BENCH_READER)
        costs.append((time.perf_counter() - start) / SIGNATURES * 1e6)
    return alone, costs[1] - costs[0]


def main(report: Callable[[Row], None] = lambda row: None) -> list[Row]:
    out: list[Row] = []

    def add(row: Row) -> None:
        report(row)
        out.append(row)

    signing_us: dict[str, float] = {}  # what signing adds to a message in the pipeline
    for ed25519_key, name in ((False, "RSA-2048"), (True, "Ed25519")):
        alone, in_pipeline = signature_cost(ed25519_key)
        signing_us[name] = in_pipeline
        add((f"one DKIM signature, {name} (us)", alone, "this process"))
        add((f"what it adds to a personalised message, {name} (us)", in_pipeline, "this process"))
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dkim_bench_")))
        sink = stack.enter_context(smtp_sink(folder))
        rsa, both = _keys(folder)
        kinds: dict[str, dict[str, str]] = {
            "unsigned": {},
            "signed, RSA-2048": rsa,
            "signed, RSA-2048 + Ed25519": both,
        }
        rounds = [
            {
                kind: one_size(SIZE, sink, extra, loops=False, postgres=POSTGRES)
                for kind, extra in kinds.items()
            }
            for _ in range(ROUNDS)
        ]
    unsigned = [r["unsigned"] for r in rounds]
    unsigned_rate = statistics.median(u.rate for u in unsigned)
    add(
        (
            f"`mailer send --wait`, {SIZE:,} readers, {DATABASE}, unsigned (msg/s)",
            unsigned_rate,
            f"median of {ROUNDS} rounds: {_listed(u.rate for u in unsigned)}; worker CPU "
            f"{statistics.median(u.worker_us for u in unsigned):.0f} us/msg",
        )
    )
    # The most a signed send could do here: the unsigned send's CPU per message (worker, command
    # and sink) and what signing adds to a message, on every core, with no core ever idle.
    # Where this is under the target, no signer is fast enough on this CPU: the unsigned send
    # is too cheap beside one RSA operation.
    cores = len(os.sched_getaffinity(0))
    signing_rsa_us = signing_us["RSA-2048"]
    unsigned_us = statistics.median(u.worker_us + u.cli_us + u.sink_us for u in unsigned)
    ceiling = cores * 1e6 / (unsigned_us + signing_rsa_us)
    add(
        (
            f"`mailer send --wait`, {SIZE:,} readers, {DATABASE}, signed RSA-2048: this "
            "machine's ceiling (msg/s)",
            ceiling,
            f"{cores} cores / (the unsigned send's CPU per message, {unsigned_us:.0f} us, + what "
            f"signing adds to one, {signing_rsa_us:.0f} us): at most "
            f"{ceiling / unsigned_rate:.2f}x unsigned",
        )
    )
    # Signing's own cost in the send, which no other speed-up moves: the worker's CPU per
    # message, signed less unsigned, each round against the unsigned send just before it.
    added = statistics.median(
        r["signed, RSA-2048"].worker_us - r["unsigned"].worker_us for r in rounds
    )
    add(
        (
            f"`mailer send --wait`, {SIZE:,} readers, {DATABASE}: what signing (RSA-2048) adds "
            "to the worker's CPU per message (us)",
            added,
            f"median of {ROUNDS} rounds; {added / signing_rsa_us:.2f}x what it adds in this "
            f"process ({signing_rsa_us:.0f} us)",
        )
    )
    for kind in list(kinds)[1:]:
        signed = [r[kind] for r in rounds]
        ratios = [s.rate / u.rate for s, u in zip(signed, unsigned, strict=True)]
        ratio = statistics.median(ratios)
        verdict = "met" if ratio >= TARGET else "missed"
        add(
            (
                f"`mailer send --wait`, {SIZE:,} readers, {DATABASE}, {kind} (msg/s)",
                statistics.median(s.rate for s in signed),
                f"{ratio:.3g}x unsigned (median; by round {_listed(ratios, '.2f')}), target >= "
                f"{TARGET}: {verdict}; worker CPU "
                f"{statistics.median(s.worker_us for s in signed):.0f} us/msg",
            )
        )
    return out


def _listed(values: Iterable[float], spec: str = ",.0f") -> str:
    return ", ".join(format(v, spec) for v in values)


if __name__ == "__main__":
    main(print_row)
