"""Client support report (issue 13): what of our HTML the caniemail database says some clients
do not support, beyond what MJML's own minimal template already has. ``make email-clients``.

doiuse-email (npm ``@jsx-email/doiuse-email``, installed by the make target into
``.tools/node_modules``; nothing is fetched here) checks the free and paid variants of every
sample post under ``examples/posts/``, personalised as ``mailer preview`` does, and MJML's
minimal template (one section, one column, one text) compiled by the same mjml-python. It
prints one Markdown row per kind of error (a feature and the clients lacking it), marking the
kinds MJML's template does not have: those are ours, and docs/email-clients.md says why each
is there and how it degrades.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mjml import mjml2html

from mailer.compose import Publication, compose
from mailer.config import load_settings
from mailer.posts import parse_post
from mailer.preview import render_preview
from mailer.tokens import Signer
from mailer.vocabulary import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / ".tools" / "node_modules"
POSTS = sorted((ROOT / "examples" / "posts").glob("*.md"))
MJML_MINIMAL = (
    "<mjml><mj-body><mj-section><mj-column><mj-text>Hello World!</mj-text>"
    "</mj-column></mj-section></mj-body></mjml>"
)
# Prints {file: [error, ...]} for the files named on its command line, every client checked.
CHECK = """
const { doIUseEmail } = require('@jsx-email/doiuse-email');
const fs = require('fs');
const out = {};
for (const file of process.argv.slice(1)) {
  const result = doIUseEmail(fs.readFileSync(file, 'utf8'), { emailClients: ['*'] });
  out[file] = result.success ? [] : result.errors;
}
process.stdout.write(JSON.stringify(out));
"""
ERROR = re.compile(r"^`(?P<kind>.+)` is not supported by `(?P<client>[^`]+)`")


def kinds(errors: list[str]) -> dict[str, set[str]]:
    """Each kind of error with the clients it names."""
    found: dict[str, set[str]] = {}
    for error in errors:
        match = ERROR.match(error)
        if match is None:
            raise SystemExit(f"error: doiuse-email said something unexpected: {error!r}")
        found.setdefault(match["kind"], set()).add(match["client"])
    return found


def pages(folder: Path) -> dict[str, Path]:
    settings = load_settings(environ={}, env_file=None)
    publication = Publication.from_settings(settings)
    files = {"MJML minimal": folder / "mjml-minimal.html"}
    files["MJML minimal"].write_text(mjml2html(MJML_MINIMAL, disable_comments=True, fonts={}))
    for path in POSTS:
        post = parse_post(path)
        composition = compose(post, publication)
        for variant in VARIANTS:
            name = f"{post.slug} ({variant})"
            files[name] = folder / f"{post.slug}.{variant}.html"
            files[name].write_bytes(
                render_preview(
                    composition,
                    variant,
                    "html",
                    signer=Signer(settings.secret_keys),
                    tracker_url=settings.tracker_url,
                )
            )
    return files


def main() -> None:
    node = shutil.which("node")
    if node is None or not (MODULES / "@jsx-email" / "doiuse-email").is_dir():
        sys.exit("error: doiuse-email is not installed: run `make email-clients`")
    with tempfile.TemporaryDirectory() as tmp:
        files = pages(Path(tmp))
        answer = subprocess.run(
            [node, "-e", CHECK, *map(str, files.values())],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ | {"NODE_PATH": str(MODULES)},
        )
        by_file = json.loads(answer.stdout)
    found = {name: kinds(by_file[str(path)]) for name, path in files.items()}
    baseline = found.pop("MJML minimal")
    ours: dict[str, set[str]] = {}
    for page in found.values():
        for kind, clients in page.items():
            ours.setdefault(kind, set()).update(clients)
    print(f"Checked: MJML's minimal template and {', '.join(found)}.\n")
    print("| kind | clients | in MJML's minimal template | pages with it |")
    print("|---|---:|---|---|")
    for kind in sorted(ours | baseline, key=lambda k: (k in baseline, k.lower())):
        clients = ours.get(kind, set()) | baseline.get(kind, set())
        pages_with = [name for name, page in found.items() if kind in page]
        print(
            f"| `{kind}` | {len(clients)} | {'yes' if kind in baseline else '**no**'} | "
            f"{len(pages_with)} of {len(found)} |"
        )
    extra = sorted(set(ours) - set(baseline), key=str.lower)
    print(f"\nKinds beyond MJML's minimal template: {len(extra)}: {', '.join(extra) or 'none'}")


if __name__ == "__main__":
    main()
