"""Settings: read once from MAILER_* and .env; a bad value is one line naming the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import DEV

from mailer.config import FIELDS, SmtpSettings, describe, load_settings
from mailer.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_need_nothing(tmp_path: Path) -> None:
    settings = load_settings(DEV, env_file=tmp_path / ".env")
    assert settings.database_url == "sqlite:///var/mailer.db"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.smtp == SmtpSettings(host="127.0.0.1", port=2525)
    assert settings.from_email == "newsletter@example.com"


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "MAILER_PUBLICATION_NAME=From Dotenv\nMAILER_POSTAL_ADDRESS='2 Dotenv Road'\n"
    )
    settings = load_settings({**DEV, "MAILER_PUBLICATION_NAME": "From Env"}, env_file=env_file)
    assert settings.publication_name == "From Env"
    assert settings.postal_address == "2 Dotenv Road"


def test_describe_shows_each_setting_its_source_and_help_with_secrets_masked(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAILER_SMTP_URL=smtp://u:hunter2@mail.example.com:587\n")
    secret = "s3cret-key-of-at-least-thirty-two-bytes"
    shown = {
        s.env: s
        for s in describe(
            {**DEV, "MAILER_SECRET_KEY": secret, "MAILER_BATCH_SIZE": "250"}, env_file=env_file
        )
    }
    assert list(shown) == [f.env for f in FIELDS]
    assert all(s.help for s in shown.values())
    assert (shown["MAILER_BATCH_SIZE"].value, shown["MAILER_BATCH_SIZE"].source) == (
        "250",
        "environment",
    )
    assert (shown["MAILER_SMTP_URL"].value, shown["MAILER_SMTP_URL"].source) == (
        "smtp://u:***@mail.example.com:587",
        ".env",
    )
    assert shown["MAILER_SECRET_KEY"].value == "***"
    assert shown["MAILER_TIMEZONE"].source == "default"
    assert "hunter2" not in repr(shown) and secret not in repr(shown)
    with pytest.raises(ConfigError, match="MAILER_BATCH_SIZE"):
        describe({**DEV, "MAILER_BATCH_SIZE": "lots"}, env_file=env_file)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpSettings("mail.example.com", 25)),
        (
            "smtp://u%40x:p%3Aw@mail.example.com:587?starttls=true",
            SmtpSettings("mail.example.com", 587, "u@x", "p:w", starttls=True),
        ),
        ("smtps://u:p@mail.example.com", SmtpSettings("mail.example.com", 465, "u", "p", True)),
    ],
)
def test_smtp_urls(url: str, expected: SmtpSettings) -> None:
    assert load_settings({**DEV, "MAILER_SMTP_URL": url}, env_file=None).smtp == expected


def test_rates_durations_and_domain_limits() -> None:
    settings = load_settings(
        {
            **DEV,
            "MAILER_RATE_LIMIT": "600/m",
            "MAILER_DOMAIN_LIMITS": "gmail.com=50/s, Yahoo.com=36000/h",
            "MAILER_RETRY_MAX_AGE": "2h",
            "MAILER_BATCH_LEASE": "500ms",
        },
        env_file=None,
    )
    assert settings.rate_limit == 10
    assert settings.domain_limits == (("gmail.com", 50), ("yahoo.com", 10))
    assert settings.retry_max_age == 7200
    assert settings.batch_lease == 0.5


def test_postgres_urls_use_psycopg() -> None:
    settings = load_settings({**DEV, "MAILER_DATABASE_URL": "postgres://u@h/db"}, env_file=None)
    url = settings.database_url
    assert url == "postgresql+psycopg://u@h/db"


def test_sizes() -> None:
    settings = load_settings(
        {**DEV, "MAILER_TRACKER_MAX_BODY": "512KB", "MAILER_POST_MAX_SIZE": "1048576"}, None
    )
    assert (settings.tracker_max_body, settings.post_max_size) == (512 * 1024, 1024 * 1024)
    assert load_settings(DEV, None).tracker_max_body == 1024 * 1024


def test_secret_keys_rotate() -> None:
    keys = "new-key-0123456789, old-key-0123456789"
    settings = load_settings({**DEV, "MAILER_SECRET_KEY": keys}, None)
    assert settings.secret_keys == ("new-key-0123456789", "old-key-0123456789")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAILER_DATABASE_URL", "mysql://x"),
        ("MAILER_BROKER_URL", "amqp://x"),
        ("MAILER_SMTP_URL", "http://mail.example.com"),
        ("MAILER_SMTP_URL", "smtps://h?starttls=true"),
        ("MAILER_SMTP_URL", "smtp://h:99999"),
        ("MAILER_SMTP_URL", "smtp://h?tls=1"),
        ("MAILER_FROM", "not an address"),
        ("MAILER_FROM", "A <a@b.com>\r\nBcc: x@y.com"),
        ("MAILER_PUBLICATION_NAME", "  "),
        ("MAILER_POSTAL_ADDRESS", "line\nbreak"),
        ("MAILER_SITE_URL", "example.com"),
        ("MAILER_TRACKER_URL", "ftp://t.example.com"),
        ("MAILER_SECRET_KEY", "short"),
        ("MAILER_SMPT_URL", "smtp://typo"),
        ("MAILER_SMTP_CONCURRENCY", "0"),
        ("MAILER_SMTP_DATA_TIMEOUT", "soon"),
        ("MAILER_RATE_LIMIT", "fast"),
        ("MAILER_DOMAIN_LIMITS", "gmail.com"),
        ("MAILER_DOMAIN_LIMITS", "gmail.com=0"),
        ("MAILER_RETRY_ATTEMPTS", "many"),
        ("MAILER_RETRY_MAX_AGE", "-1h"),
        ("MAILER_BATCH_SIZE", "0"),
        ("MAILER_BATCH_LEASE", "0s"),
        ("MAILER_ENV", "staging"),
        ("MAILER_DEBUG", "maybe"),
        ("MAILER_TRACKER_MAX_BODY", "0"),
        ("MAILER_POST_MAX_SIZE", "2 TB"),
        ("MAILER_DATABASE_URL", "postgresql://h:port/db"),
        # A DKIM name goes as it is into the signature's tags and the DNS record's name.
        ("MAILER_DKIM_DOMAIN", "example.com;t=y"),
        ("MAILER_DKIM_DOMAIN", "-example.com"),
        ("MAILER_DKIM_DOMAIN", "exämple.com"),
        ("MAILER_DKIM_SELECTOR", "s=1"),
        ("MAILER_DKIM_SELECTOR", "sé"),
        ("MAILER_DKIM_SELECTOR", "a..b"),
        ("MAILER_DKIM_ED25519_SELECTOR", "_ed"),
        ("MAILER_DKIM_SELECTOR", "x" * 64),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**DEV, name: value}, env_file=None)
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAILER_SECRET_KEY", "tiny,secret"),
        ("MAILER_SMTP_URL", "smtp://u:hunter2@:25"),
        ("MAILER_DATABASE_URL", "postgresql://u:hunter2@h:x/db"),
        ("MAILER_BROKER_URL", "redis://:hunter2@"),
    ],
)
def test_secrets_are_never_echoed(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**DEV, name: value}, env_file=None)
    assert "hunter2" not in str(caught.value) and "tiny" not in str(caught.value)


def test_readme_documents_every_variable() -> None:
    table = set(re.findall(r"^\| `(MAILER_[A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))
    assert table == {field.env for field in FIELDS}
