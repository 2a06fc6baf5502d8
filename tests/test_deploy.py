"""Deployment: docker-compose.yml as Debian's docker-compose reads it, the image's inputs, and
a normal (non-editable) install of the wheel that composes from outside the checkout."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import sqlite_only

from mailer.config import load_settings
from mailer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LONG_RUNNING = ("postgres", "redis", "worker", "beat", "tracker", "bounces", "flower")


def compose_config(tmp_path: Path, env: str) -> subprocess.CompletedProcess[str]:
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose is missing: `make test` installs Debian's package"
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    (tmp_path / ".env").write_text(env)
    return subprocess.run(
        [docker_compose, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


KEY = "k" * 43  # as long as `mailer secret` prints


def filled_in(example: str) -> str:
    """.env.example as a user leaves it: the signing key filled in."""
    assert "\nMAILER_SECRET_KEY=\n" in example
    return example.replace("\nMAILER_SECRET_KEY=\n", f"\nMAILER_SECRET_KEY={KEY}\n")


@pytest.mark.subprocess
def test_docker_compose_accepts_the_file_with_the_example_env(tmp_path: Path) -> None:
    example = (ROOT / ".env.example").read_text()
    refused = compose_config(tmp_path, example)
    assert refused.returncode != 0 and "set MAILER_SECRET_KEY in .env" in refused.stderr
    assert "`mailer secret`" in refused.stderr
    done = compose_config(tmp_path, filled_in(example))
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    services = config["services"]
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("worker", "beat", "tracker", "bounces", "postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
    assert services["bounces"]["command"][:2] == ["bounces", "serve"]
    assert "redisdata" in config["volumes"]
    assert "redisdata:/data:rw" in services["redis"]["volumes"]
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555/tcp"]
    images = {
        services[name]["image"] for name in ("migrate", "worker", "beat", "tracker", "bounces")
    }
    assert images == {"mailer:latest"}
    # Settable from .env, with the bundled services as defaults.
    worker = services["worker"]["environment"]
    assert worker["MAILER_SMTP_URL"].startswith("smtp://user:password@smtp.example.com")
    assert worker["MAILER_DATABASE_URL"] == "postgresql://mailer@postgres:5432/mailer"


@pytest.mark.subprocess
def test_the_database_url_comes_from_env_and_flower_needs_a_password(tmp_path: Path) -> None:
    env = f"MAILER_SECRET_KEY={KEY}\nMAILER_DATABASE_URL=postgresql://db.internal/news\n"
    done = compose_config(tmp_path, env)
    assert done.returncode != 0 and "set FLOWER_BASIC_AUTH=user:password" in done.stderr
    done = compose_config(tmp_path, env + "FLOWER_BASIC_AUTH=a:b\n")
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["worker"]["environment"]["MAILER_DATABASE_URL"].endswith("db.internal/news")


def test_the_example_env_is_valid_settings_once_its_key_is_filled_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"MAILER_SECRET_KEY: .*`mailer secret`"):
        load_settings({}, env_file=ROOT / ".env.example")
    env_file = tmp_path / ".env"
    env_file.write_text(filled_in((ROOT / ".env.example").read_text()))
    settings = load_settings({}, env_file=env_file)
    assert settings.tracker_url == "https://t.example.com" and settings.env == "production"


@pytest.mark.subprocess
@sqlite_only
def test_an_installed_wheel_composes_outside_the_checkout(tmp_path: Path, db_url: str) -> None:
    wheels = tmp_path / "wheels"
    run = {"capture_output": True, "text": True, "timeout": 300}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=ROOT,
        **run,  # type: ignore[call-overload]
    )
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("mailer-*.whl")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies come from this environment; mailer itself only from the wheel.
    [fresh_site] = venv.glob("lib/python*/site-packages")
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(fresh_site),
            str(wheel),
        ],
        **run,  # type: ignore[call-overload]
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "examples/posts/the-quiet-harbour.md", elsewhere / "post.md")
    env = {"PATH": "/usr/bin:/bin", "MAILER_DATABASE_URL": db_url, "MAILER_ENV": "dev"}
    python = str(venv / "bin" / "python")
    for args in (
        ["db", "upgrade"],
        ["posts", "add", "post.md"],
        [
            "preview",
            "the-quiet-harbour",
            "--variant",
            "free",
            "--format",
            "html",
            "--out",
            "f.html",
        ],
    ):
        done = subprocess.run(
            [python, "-m", "mailer", *args],
            cwd=elsewhere,
            env=env,
            **run,  # type: ignore[call-overload]
        )
        assert done.returncode == 0, done.stderr
    where = subprocess.run(
        [
            python,
            "-c",
            "import mailer, mailer.paths; print(mailer.__file__, mailer.paths.TEMPLATES)",
        ],
        cwd=elsewhere,
        env=env,
        **run,  # type: ignore[call-overload]
    ).stdout
    assert str(ROOT) not in where, where  # the wheel's copy, not the checkout's
    assert "Keep reading with a 7-day free trial" in (elsewhere / "f.html").read_text()
