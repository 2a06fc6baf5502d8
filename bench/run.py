"""``make bench``: every benchmark, printed as Markdown rows for docs/benchmarks.md."""

from __future__ import annotations

from bench import compose_bench, delivery_bench, import_bench, segments_bench, tracker_bench
from bench.machine import describe


def main() -> None:
    print(f"Machine: {describe()}\n")
    print("| measure | value | note |\n|---|---:|---|")
    for name, value, note in [
        *compose_bench.main(),
        *import_bench.main(),
        *segments_bench.main(),
        *delivery_bench.main(),
        *tracker_bench.main(),
    ]:
        print(f"| {name} | {value:.1f} | {note} |")


if __name__ == "__main__":
    main()
