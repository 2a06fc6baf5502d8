"""A sample list of readers for ``make demo``: ``python examples/make_sample_list.py OUT.csv``.

About 3,000 readers across every tier, with tags (politics among them), a couple of attribute
columns, a few duplicates and five bad rows, so the import's rejects report has something to
show. The same file every time (a fixed seed), so importing it again changes nothing.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

READERS = 3000
FIRST = ["Ada", "Björn", "Chloé", "Dmitri", "Eun-ji", "Farah", "Gus", "Hana", "Iñigo", "Jo"]
LAST = ["Lovelace", "Østergaard", "Nakamura", "O'Brien", "Silva", "Kowalski", "Mbeki", "Ng"]
DOMAINS = ["gmail.com", "outlook.com", "proton.me", "fastmail.com", "example.org", "uni.edu"]
TAGS = ["politics", "culture", "science", "local", "weekly-digest"]
CITIES = ["Lisbon", "Zürich", "Oslo", "Kraków", "Montréal", "Osaka", ""]
BAD_ROWS = [
    ["not-an-address", "Broken Address", "free", "", "", "", ""],
    ["gold@example.org", "Unknown Tier", "gold", "", "", "", ""],
    ["late@example.org", "Bad Date", "trial", "", "next Tuesday", "", ""],
    ["", "No Address", "paid", "politics", "", "", ""],
    ["two@@example.org", "Two Ats", "free", "", "", "", ""],
]


def rows(seed: int = 7) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for n in range(READERS):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        tier = rng.choices(["free", "trial", "paid", "comped"], [70, 8, 18, 4])[0]
        local = f"{first}.{last}{n}".lower().replace("'", "")
        out.append(
            [
                f"{local}@{rng.choice(DOMAINS)}",
                f"{first} {last}",
                tier,
                ";".join(rng.sample(TAGS, rng.choice([0, 1, 1, 2, 3]))),
                f"2026-12-{rng.randrange(1, 29):02d}" if tier == "trial" else "",
                rng.choice(CITIES),
                rng.choice(["twitter", "podcast", "friend", "search"]),
            ]
        )
    for n in rng.sample(range(READERS), 10):  # the same reader again, in capitals: last wins
        out.append([out[n][0].upper(), *out[n][1:]])
    for bad in BAD_ROWS:
        out.insert(rng.randrange(len(out)), bad)
    return out


def main(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "tier", "tags", "trial_ends_at", "city", "heard_from"])
        writer.writerows(rows())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/sample-readers.csv"))
