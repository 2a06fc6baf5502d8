"""``make bench``: every benchmark, printed as Markdown rows for docs/benchmarks.md."""

from __future__ import annotations

from bench import (
    cli_bench,
    compose_bench,
    delivery_bench,
    dkim_bench,
    import_bench,
    segments_bench,
    send_bench,
    tracker_bench,
)
from bench.machine import describe


def main() -> None:
    print(f"Machine: {describe()}\n")
    print("| measure | value | note |\n|---|---:|---|")
    for name, value, note in [
        *cli_bench.main(),  # issue 14: a command's start
        *compose_bench.main(),
        *import_bench.main(),
        *segments_bench.main(),
        # The send as the author sees it (issue 9): the headline delivery figures.
        *send_bench.main(),
        *dkim_bench.main(),  # issue 11: signed against unsigned
        # Issue 4's method (PostgreSQL, to the last 250, fixed costs left out), kept for its
        # planning, memory and smtp-source figures.
        *delivery_bench.main(),
        *tracker_bench.main(),
    ]:
        print(f"| {name} | {value:.1f} | {note} |")


if __name__ == "__main__":
    main()
