"""`llava-bot db upgrade` and `llava-bot db current`, run through the command line on a fresh SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.cli import main
from bot.store.db import head_revision


def db(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    """Run ``llava-bot db ARGS --config CONFIG``; returns the exit code, stdout and stderr."""
    code = main(["db", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path / "data" / "bot.sqlite3"}"\n')
    return path


def test_current_on_a_new_install_says_empty_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    assert db(capsys, config, "current") == (0, "(empty database)", "")
    assert not (config.parent / "data").exists()


def test_upgrade_step_by_step_keeps_what_was_stored(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    file = config.parent / "data" / "bot.sqlite3"
    assert db(capsys, config, "upgrade", "--revision", "0001")[:2] == (0, "0001")
    assert db(capsys, config, "current")[:2] == (0, "0001")
    with sqlite3.connect(file) as connection:
        connection.execute(
            "INSERT INTO turns (channel_id, role, text, message_ids) VALUES (7, 'user', 'what is this?', '[1]')"
        )

    assert db(capsys, config, "upgrade")[:2] == (0, head_revision())
    assert db(capsys, config, "current")[:2] == (0, head_revision())
    # Upgrading an up-to-date database is harmless: a deploy script may run it at every start.
    assert db(capsys, config, "upgrade")[:2] == (0, head_revision())
    with sqlite3.connect(file) as connection:
        assert connection.execute("SELECT channel_id, text FROM turns").fetchall() == [(7, "what is this?")]


def test_a_missing_configuration_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = db(capsys, tmp_path / "elsewhere.toml", "current")
    assert (code, out) == (1, "")
    assert err == f"llava-bot db: configuration file {tmp_path / 'elsewhere.toml'} does not exist"
