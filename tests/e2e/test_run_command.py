"""`llava-bot run` as an operator starts it: a config file pointing at a REST/gateway URL, the token in the env.

It answers a mention with the default engine and never imports PyTorch or transformers (one process checks
both: each start costs seconds)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import png
from tests.engine.test_serving_imports import heavy_imports, imported


def write_config(tmp_path: Path, emulator: DiscordEmulator, model_dir: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[discord]
api_base_url = "{emulator.api_base}"
gateway_url = "{emulator.gateway_url}"
edit_interval = 0.2

[model]
dir = "{model_dir}"
max_new_tokens = 16

[model.ov_config]
CACHE_DIR = "{tmp_path / "cache"}"

[database]
url = "sqlite+aiosqlite:///{tmp_path / "data" / "bot.sqlite3"}"
"""
    )
    return config


async def test_run_command_answers_without_pytorch_and_stops_cleanly(
    tiny_llava: tuple[Path, Path], tmp_path: Path, emulator: DiscordEmulator
) -> None:
    config = write_config(tmp_path, emulator, tiny_llava[1])
    # The import profile is inherited by the batching engine's process as well.
    env = {**os.environ, "DISCORD_TOKEN": emulator.token, "HF_HUB_OFFLINE": "1", "PYTHONPROFILEIMPORTTIME": "1"}
    # To a file: the import profile would fill a pipe nobody reads until the end.
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    try:
        await emulator.wait_for(lambda: emulator.connected, 120)
        await emulator.wait_for(lambda: emulator.commands.get(None), 30)
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", png(), "image/png")]
        )
        reply = await emulator.wait_for_message(
            lambda m: m.reference_id == int(asked["id"]) and "▌" not in m.content and not m.content.startswith("⏳"),
            timeout=60,
        )
        assert reply.content.strip()
        assert {c["name"] for c in emulator.commands[None]} == {"ask", "reset", "precision", "status", "forget"}
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 60)
    log = stderr.read_text(errors="replace")
    assert process.returncode == 0, log
    assert "Traceback" not in log
    assert emulator.token not in log, "the token must never be logged"
    assert (tmp_path / "data" / "bot.sqlite3").exists()
    names = imported(log)
    assert names.count("bot.engine.template") == 2, "the profile should cover the bot and its engine process"
    assert heavy_imports(log) == []


async def test_a_refused_token_stops_the_bot_before_the_model_loads(
    tiny_llava: tuple[Path, Path], tmp_path: Path, emulator: DiscordEmulator
) -> None:
    config = write_config(tmp_path, emulator, tiny_llava[1])
    env = {**os.environ, "DISCORD_TOKEN": "not.the.token", "HF_HUB_OFFLINE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", "--config", str(config),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    log = stderr.decode()
    assert process.returncode == 1, log
    assert log.strip().splitlines()[-1] == (
        "llava-bot run: Discord refused the bot token; check DISCORD_TOKEN (Developer Portal > Bot > Token)."
    )
    # The operator hears of it at once, not after minutes of loading a large model.
    assert "Loading" not in log, log
    assert "Traceback" not in log and "not.the.token" not in log
