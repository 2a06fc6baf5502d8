"""Post parsing: front matter fields, the paywall split, and every refused input."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from mailer.errors import InputError, PostError
from mailer.posts import PAYWALL_MARKER, Post, parse_post, parse_post_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "posts"

PAID = f"""\
---
title: The Quiet Harbour
subtitle: Keepers of the light
author: Ada Lantern
date: 2024-05-17
audience: paid
preheader: Three keepers, one lamp.
---

First paragraph for everyone.

Second paragraph for everyone.

{PAYWALL_MARKER}

Only for paid readers.
"""


def write(tmp_path: Path, text: str | bytes, name: str = "post.md") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def post_with(front: str, body: str = "Hello.\n") -> str:
    return f"---\n{front}\n---\n\n{body}"


def assert_refused(tmp_path: Path, text: str | bytes, *fragments: str) -> str:
    """Parse and expect one PostError line naming the file and every given fragment."""
    path = write(tmp_path, text)
    with pytest.raises(PostError) as caught:
        parse_post(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- valid posts ---------------------------------------------------------------------------


def test_paid_post_splits_at_the_marker(tmp_path: Path) -> None:
    post = parse_post(write(tmp_path, PAID))

    assert post == Post(
        slug="the-quiet-harbour",
        title="The Quiet Harbour",
        subtitle="Keepers of the light",
        author="Ada Lantern",
        date=dt.date(2024, 5, 17),
        audience="paid",
        preheader="Three keepers, one lamp.",
        body=(
            "First paragraph for everyone.\n\nSecond paragraph for everyone.\n\n\n\n"
            "Only for paid readers."
        ),
        free_body="First paragraph for everyone.\n\nSecond paragraph for everyone.",
    )
    assert post.has_paywall
    assert PAYWALL_MARKER not in post.body


def test_minimal_post_gets_defaults(tmp_path: Path) -> None:
    post = parse_post(write(tmp_path, post_with("title: Hello, World!")))

    assert post.slug == "hello-world"
    assert post.audience == "everyone"
    assert (post.subtitle, post.author, post.date, post.preheader) == (None, None, None, None)
    assert post.free_body is None
    assert not post.has_paywall
    assert post.body == "Hello."


def test_empty_optional_fields_become_none(tmp_path: Path) -> None:
    front = 'title: T\nsubtitle: ""\nauthor: ""\npreheader:\ndate: ""\nslug: ""\naudience: ""'
    post = parse_post(write(tmp_path, post_with(front)))

    assert (post.subtitle, post.author, post.preheader, post.date) == (None, None, None, None)
    assert post.slug == "t"
    assert post.audience == "everyone"


def test_marker_without_blank_lines_keeps_blocks_apart(tmp_path: Path) -> None:
    text = post_with("title: T\naudience: paid", f"Above.\n{PAYWALL_MARKER}\nBelow.\n")
    post = parse_post(write(tmp_path, text))

    assert post.free_body == "Above."
    assert post.body == "Above.\n\nBelow."  # not "Above.\nBelow.", one merged paragraph


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbf" + PAID.replace("\n", "\r\n").encode("utf-8")
    post = parse_post(write(tmp_path, raw))

    assert post.title == "The Quiet Harbour"
    assert post.free_body == "First paragraph for everyone.\n\nSecond paragraph for everyone."
    assert "\r" not in post.body


def test_parse_post_text_names_the_given_source() -> None:
    assert parse_post_text(post_with("title: T"), "inline").title == "T"
    with pytest.raises(PostError, match=r"^inline: front matter: 'title'"):
        parse_post_text(post_with("author: A"), "inline")


def test_post_error_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        parse_post(write(tmp_path, "no front matter\n"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-17", dt.date(2024, 5, 17)),
        ("'2024-05-17'", dt.date(2024, 5, 17)),
        ("2024-05-17 08:30:00", dt.date(2024, 5, 17)),
        ("2024-05-17T23:59:00+02:00", dt.date(2024, 5, 17)),
    ],
)
def test_date_forms(tmp_path: Path, value: str, expected: dt.date) -> None:
    post = parse_post(write(tmp_path, post_with(f"title: T\ndate: {value}")))
    assert post.date == expected


@pytest.mark.parametrize(
    ("title", "slug"),
    [
        ("Café société", "cafe-societe"),
        ("  Hello --- World!! ", "hello-world"),
        ("Ünïcödé & Friends: Part 2", "unicode-friends-part-2"),
        # NFKD folds the "fi" ligature and full-width letters to plain ASCII.
        ("\ufb01nal \uff57\uff49\uff44\uff45", "final-wide"),
    ],
)
def test_slug_is_derived_from_title(tmp_path: Path, title: str, slug: str) -> None:
    post = parse_post(write(tmp_path, post_with(f"title: {title!r}")))
    assert post.slug == slug


def test_long_derived_slug_is_cut_at_a_hyphen(tmp_path: Path) -> None:
    title = " ".join(["harbour"] * 20)  # 159 characters as a slug
    post = parse_post(write(tmp_path, post_with(f"title: {title}")))

    assert len(post.slug) <= 80
    assert post.slug == "-".join(["harbour"] * 10)  # 79 characters, no chopped word
    assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", post.slug)


def test_long_single_word_slug_is_cut_at_80(tmp_path: Path) -> None:
    post = parse_post(write(tmp_path, post_with(f"title: {'a' * 100}")))
    assert post.slug == "a" * 80


def test_explicit_slug_wins(tmp_path: Path) -> None:
    post = parse_post(write(tmp_path, post_with("title: Whatever\nslug: harbour-2024")))
    assert post.slug == "harbour-2024"


def test_marker_inside_code_fences_is_ignored(tmp_path: Path) -> None:
    body = (
        "Intro.\n\n"
        f"```markdown\n{PAYWALL_MARKER}\n```\n\n"
        f"~~~~\n{PAYWALL_MARKER}\n```\nstill fenced\n~~~~\n\n"
        f"{PAYWALL_MARKER}\n\n"
        "After.\n"
    )
    post = parse_post(write(tmp_path, post_with("title: T\naudience: paid", body)))

    assert post.free_body is not None
    assert post.free_body.endswith("still fenced\n~~~~")
    assert post.body.count(PAYWALL_MARKER) == 2  # the two inside fences are content
    assert post.body.endswith("After.")


def test_marker_with_surrounding_spaces_counts(tmp_path: Path) -> None:
    text = post_with("title: T\naudience: paid", f"Above.\n\n   {PAYWALL_MARKER}  \n\nBelow.\n")
    assert parse_post(write(tmp_path, text)).free_body == "Above."


def test_example_posts_parse() -> None:
    paths = sorted(EXAMPLES.glob("*.md"))
    assert paths, "examples/posts/ should hold at least one sample post"
    for path in paths:
        post = parse_post(path)
        assert post.audience == "paid"
        assert post.free_body
        assert len(post.body) > len(post.free_body)
    # One sample has neither preheader nor subtitle, so its preheader comes from its text.
    assert {bool(parse_post(path).preheader) for path in paths} == {True, False}


# --- refused: encoding and front matter ----------------------------------------------------


def test_not_utf8(tmp_path: Path) -> None:
    raw = "---\ntitle: Café\n---\n\nBody.\n".encode("latin-1")
    message = assert_refused(tmp_path, raw, "not UTF-8 at byte 14 (0xe9, line 2)")
    assert "save the file as UTF-8" in message


@pytest.mark.parametrize(
    "text",
    ["", "title: T\n\nBody.\n", "\n---\ntitle: T\n---\nBody.\n", "# Heading\n---\ntitle: T\n---\n"],
)
def test_missing_front_matter(tmp_path: Path, text: str) -> None:
    assert_refused(tmp_path, text, "front matter: missing")


def test_unclosed_front_matter(tmp_path: Path) -> None:
    assert_refused(tmp_path, "---\ntitle: T\n\nBody.\n", "front matter: not closed")


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    text = "---\ntitle: T\nsubtitle: [unclosed\n---\n\nBody.\n"
    assert_refused(tmp_path, text, "front matter: broken YAML at line ")


def test_broken_yaml_mapping_values(tmp_path: Path) -> None:
    text = "---\ntitle: T\nauthor: a: b\n---\n\nBody.\n"
    assert_refused(tmp_path, text, "front matter: broken YAML at line 3", "mapping values")


def test_raw_nul_byte_in_front_matter(tmp_path: Path) -> None:
    assert_refused(tmp_path, post_with("title: a\0b"), "broken YAML at line 2", "#x0000")


def test_impossible_date(tmp_path: Path) -> None:
    assert_refused(tmp_path, post_with("title: T\ndate: 2024-02-30"), "'date'", "day is out")


@pytest.mark.parametrize("front", ["- title\n- T", "just a string", "42"])
def test_front_matter_not_a_mapping(tmp_path: Path, front: str) -> None:
    assert_refused(tmp_path, post_with(front), "front matter: must be a mapping")


@pytest.mark.parametrize(
    "front", ["author: A", "title:", "title: ''", "title: '   '", "", "# just a comment"]
)
def test_title_required(tmp_path: Path, front: str) -> None:
    assert_refused(tmp_path, post_with(front), "front matter: 'title' is required")


def test_unknown_field_is_refused_with_a_hint(tmp_path: Path) -> None:
    message = assert_refused(
        tmp_path, post_with("title: T\naudiance: paid"), "unknown field 'audiance'"
    )
    assert "did you mean 'audience'?" in message
    assert "known fields: title, subtitle, author, date, slug, audience, preheader" in message


def test_unknown_field_without_a_close_match(tmp_path: Path) -> None:
    message = assert_refused(tmp_path, post_with("title: T\ntags: [a, b]"), "unknown field 'tags'")
    assert "did you mean" not in message


@pytest.mark.parametrize("value", ["gold", "Paid", "[paid]", "true"])
def test_unknown_audience(tmp_path: Path, value: str) -> None:
    text = post_with(f"title: T\naudience: {value}")
    assert_refused(tmp_path, text, "'audience' must be 'everyone' or 'paid'")


def test_audience_message_shows_the_value(tmp_path: Path) -> None:
    assert_refused(
        tmp_path,
        post_with("title: T\naudience: gold"),
        "front matter: 'audience' must be 'everyone' or 'paid' (got 'gold')",
    )


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("title", "[a, b]", "list"),
        ("title", "2024", "int"),
        ("subtitle", "{a: b}", "dict"),
        ("author", "yes", "bool"),
        ("preheader", "3.5", "float"),
    ],
)
def test_string_fields_refuse_other_types(
    tmp_path: Path, field: str, value: str, kind: str
) -> None:
    front = f"{field}: {value}" if field == "title" else f"title: T\n{field}: {value}"
    assert_refused(tmp_path, post_with(front), f"'{field}' must be a string (got {kind})")


@pytest.mark.parametrize("value", ["17 May 2024", "2024/05/17", "20240517", "'2024-5-7x'", "[1]"])
def test_bad_date(tmp_path: Path, value: str) -> None:
    assert_refused(tmp_path, post_with(f"title: T\ndate: {value}"), "'date' must be a date")


@pytest.mark.parametrize("value", ["'2024-13-01'", "'2023-02-29'"])
def test_quoted_date_that_does_not_exist(tmp_path: Path, value: str) -> None:
    assert_refused(tmp_path, post_with(f"title: T\ndate: {value}"), "'date' is not a real date")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.md"
    with pytest.raises(PostError, match=rf"^{re.escape(str(path))}: cannot read file"):
        parse_post(path)


@pytest.mark.parametrize(
    "value", ["Hello World", "hello_world", "-hello", "hello-", "hello--world", "héllo", "42"]
)
def test_bad_explicit_slug(tmp_path: Path, value: str) -> None:
    assert_refused(tmp_path, post_with(f"title: T\nslug: {value}"), "'slug' must be lowercase")


@pytest.mark.parametrize("title", ["日本語のタイトル", "!!!", "— · —"])
def test_title_without_a_slug(tmp_path: Path, title: str) -> None:
    message = assert_refused(tmp_path, post_with(f"title: '{title}'"), "'slug' cannot be derived")
    assert "set 'slug'" in message


def test_title_without_a_slug_is_fine_with_an_explicit_slug(tmp_path: Path) -> None:
    post = parse_post(write(tmp_path, post_with("title: 日本語\nslug: nihongo")))
    assert (post.title, post.slug) == ("日本語", "nihongo")


# --- refused: header injection -------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "escaped"),
    [
        ("title", "Hi\\0there"),
        ("title", "Hi\\r\\nBcc: victim@example.com"),
        ("subtitle", "one\\rtwo"),
        ("subtitle", "one\\ntwo"),
        ("author", "Ada\\nBcc: x@example.com"),
        ("author", "Ada\\rLantern"),
        ("preheader", "tab\\there"),
        ("title", "bell\\a"),
        ("title", "next line\\N"),  # U+0085
        ("subtitle", "line\\Lsep"),  # U+2028
        ("author", "para\\Psep"),  # U+2029
    ],
)
def test_control_characters_are_refused(tmp_path: Path, field: str, escaped: str) -> None:
    value = f'"{escaped}"'  # a YAML double-quoted escape, as an attacker would write it
    front = f"title: {value}" if field == "title" else f"title: T\n{field}: {value}"
    assert_refused(tmp_path, post_with(front), f"'{field}'", "CR/LF/NUL or control character")


def test_block_scalar_newline_is_refused(tmp_path: Path) -> None:
    front = "title: T\nsubtitle: |\n  first line\n  second line"
    assert_refused(tmp_path, post_with(front), "'subtitle'", "CR/LF/NUL")


# --- refused: body and paywall -------------------------------------------------------------


@pytest.mark.parametrize("body", ["", "\n\n", "   \n\t\n"])
def test_empty_body(tmp_path: Path, body: str) -> None:
    assert_refused(tmp_path, post_with("title: T", body), "body: empty")


def test_two_markers(tmp_path: Path) -> None:
    body = f"One.\n\n{PAYWALL_MARKER}\n\nTwo.\n\n{PAYWALL_MARKER}\n\nThree.\n"
    text = post_with("title: T\naudience: paid", body)
    # Front matter is lines 1-4, a blank line 5, then the body: markers on lines 8 and 12.
    assert_refused(tmp_path, text, "paywall: 2 '<!-- paywall -->' markers (lines 8, 12)")


def test_two_markers_in_an_everyone_post(tmp_path: Path) -> None:
    body = f"One.\n\n{PAYWALL_MARKER}\n\n{PAYWALL_MARKER}\n\nTwo.\n"
    assert_refused(tmp_path, post_with("title: T", body), "paywall: 2", "lines 7, 9")


def test_paid_post_without_marker(tmp_path: Path) -> None:
    text = post_with("title: T\naudience: paid", "All of it.\n")
    assert_refused(tmp_path, text, "paywall: 'audience: paid' needs a '<!-- paywall -->' line")


def test_paid_post_with_marker_only_in_a_fence(tmp_path: Path) -> None:
    text = post_with("title: T\naudience: paid", f"Text.\n\n```\n{PAYWALL_MARKER}\n```\n")
    assert_refused(tmp_path, text, "paywall: 'audience: paid' needs")


@pytest.mark.parametrize("front", ["title: T", "title: T\naudience: everyone"])
def test_marker_in_an_everyone_post(tmp_path: Path, front: str) -> None:
    text = post_with(front, f"Above.\n\n{PAYWALL_MARKER}\n\nBelow.\n")
    message = assert_refused(tmp_path, text, "paywall:", "audience is 'everyone'")
    assert "set audience: paid or remove the marker" in message


def test_paid_post_with_nothing_above_the_marker(tmp_path: Path) -> None:
    text = post_with("title: T\naudience: paid", f"\n  \n{PAYWALL_MARKER}\n\nPaid part.\n")
    assert_refused(tmp_path, text, "paywall: nothing above", "free readers would get only")


def test_paid_post_that_is_only_a_marker(tmp_path: Path) -> None:
    assert_refused(tmp_path, post_with("title: T\naudience: paid", f"{PAYWALL_MARKER}\n"), "body")


def test_duplicate_front_matter_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.md"
    path.write_text(
        "---\ntitle: T\naudience: paid\naudience: everyone\n---\n\nA\n\n<!-- paywall -->\n\nB\n",
        encoding="utf-8",
    )
    with pytest.raises(PostError, match=r"dup\.md: front matter: .*'audience' appears twice"):
        parse_post(path)


@pytest.mark.parametrize(
    ("title", "slug"),
    [("Straße nach Ørsted", "strasse-nach-orsted"), ("Æsir þing", "aesir-thing")],
)
def test_slug_spells_out_letters_without_decomposition(title: str, slug: str) -> None:
    assert parse_post_text(f"---\ntitle: {title}\n---\n\nBody\n", "t.md").slug == slug
