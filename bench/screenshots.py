"""Screenshots of the sample posts as readers see them (issue 13): ``make screenshots``.

Each post under ``examples/posts/`` is composed with the default settings, its free and paid
variants personalised for the sample reader as ``mailer preview`` does, and headless Chromium
(Debian's ``chromium``) shoots each at 600 px (a desktop client's column) and 375 px (a phone).
The images go to ``docs/screenshots/`` as ``SLUG.VARIANT.WIDTH.png``, cut below the page's end.

Nothing is fetched: a post's images under ``https://example.com/`` are replaced by one picture
drawn here, so the shots show how images sit in the layout without any network.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from mailer.compose import Publication, compose
from mailer.config import load_settings
from mailer.posts import parse_post
from mailer.preview import render_preview
from mailer.tokens import Signer
from mailer.vocabulary import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
POSTS = sorted((ROOT / "examples" / "posts").glob("*.md"))
OUT = ROOT / "docs" / "screenshots"
WIDTHS = (600, 375)
WINDOW_HEIGHT = 6000  # taller than any sample post; the blank below the page is cut off
IMAGES = "https://example.com/images/"


def picture() -> str:
    """A 1200x700 stand-in photograph (sky, sea, a lighthouse) as a data: URL."""
    image = Image.new("RGB", (1200, 700), "#9fb8c9")
    draw = ImageDraw.Draw(image)
    for y in range(420):  # a sky darkening upwards
        shade = 120 + y * 100 // 420
        draw.line([(0, y), (1200, y)], fill=(shade - 40, shade - 10, shade + 20))
    draw.rectangle([(0, 420), (1200, 700)], fill="#35566b")
    draw.rectangle([(760, 230), (820, 430)], fill="#f4f1ea")
    draw.polygon([(750, 230), (830, 230), (790, 190)], fill="#8c2f1b")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def shoot(chromium: str, page: Path, width: int, out: Path) -> None:
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={width},{WINDOW_HEIGHT}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with Image.open(out) as shot:
        image = shot.convert("RGB")
    blank = Image.new("RGB", image.size, image.getpixel((0, image.height - 1)))
    box = ImageChops.difference(image, blank).getbbox()
    bottom = min(image.height, (box[3] if box else image.height) + 24)
    image.crop((0, 0, width, bottom)).save(out, optimize=True)


def main() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: chromium is not installed (apt-get install chromium)")
    settings = load_settings(environ={}, env_file=None)  # the defaults: the same shots anywhere
    publication = Publication.from_settings(settings)
    signer = Signer(settings.secret_keys)
    stand_in = picture()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for path in POSTS:
            post = parse_post(path)
            composition = compose(post, publication)
            for variant in VARIANTS if post.has_paywall else ("paid",):
                markup = render_preview(
                    composition,
                    variant,
                    "html",
                    signer=signer,
                    tracker_url=settings.tracker_url,
                ).decode()
                page = Path(tmp) / f"{post.slug}.{variant}.html"
                page.write_text(_stand_in_images(markup, stand_in), encoding="utf-8")
                for width in WIDTHS:
                    out = OUT / f"{post.slug}.{variant}.{width}.png"
                    shoot(chromium, page, width, out)
                    print(out.relative_to(ROOT))


def _stand_in_images(markup: str, stand_in: str) -> str:
    return re.sub(rf'src="{re.escape(IMAGES)}[^"]*"', f'src="{stand_in}"', markup)


if __name__ == "__main__":
    main()
