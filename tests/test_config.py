"""Configuration: the example file documents the defaults, and mistakes are caught at start."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from bot.config import Config, ConfigError, load_config, parse_config
from tests.conftest import ROOT


def test_example_file_is_valid_and_shows_every_default() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert parse_config(example) == Config()
    for name, section in typing.get_type_hints(Config).items():
        keys = {f.name for f in dataclasses.fields(section)}
        assert set(example[name]) == keys, f"config.example.toml [{name}] is out of date"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"model": {"precison": "INT4"}}, "unknown key model.precison"),
        ({"modle": {}}, "unknown key modle"),
        ({"model": {"precision": "INT3"}}, "model.precision must be one of"),
        ({"model": {"engine": "llama"}}, "model.engine must be"),
        ({"chat": {"max_queue": "ten"}}, "chat.max_queue must be int"),
        ({"discord": {"edit_interval": 0.01}}, "edit_interval must be at least"),
        ({"discord": {"shutdown_grace": -1}}, "discord.shutdown_grace must be 0 or more"),
        ({"discord": {"recovery_interval": 0}}, "discord.recovery_interval must be more than 0"),
        ({"discord": {"reset_permission": "nobody"}}, "reset_permission"),
        ({"discord": {"admin_ids": [1, "x"]}}, "admin_ids[1] must be int"),
        (
            {"chat": {"rate_limit": "10 per minute"}},
            "chat.rate_limit: '10 per minute' is not a rate limit: write it as \"COUNT/PERIOD\"",
        ),
        ({"chat": {"rate_limit": "0/1m"}}, "chat.rate_limit: '0/1m' must allow at least one question"),
        ({"chat": {"retention_days": -1}}, "chat.retention_days must be a number of days, or 0 to keep everything"),
        ({"discord": {"denied_user_ids": ["alice"]}}, "discord.denied_user_ids[0] must be int"),
        ({"model": {"engine": "openai"}}, "needs model.base_url"),
        ({"model": {"engine": "openai", "base_url": "http://10.0.0.5:8000/v3"}}, "needs model.remote_model"),
        ({"model": {"remote_models": {"INT5": "llava"}}}, "model.remote_models keys must be"),
        (
            {"model": {"engine": "openai", "base_url": "http://h/v3", "remote_models": {"FP16": "a"}}},
            "no name for model.precision INT4",
        ),
        ({"model": {"request_timeout": 0}}, "model.request_timeout must be positive"),
        ({"model": {"concurrency": 0}}, "model.concurrency must be between 1 and 64, got 0"),
        ({"model": {"max_batched_tokens": 8}}, "model.max_batched_tokens must be at least 16"),
        ({"model": {"concurrency": 32, "max_batched_tokens": 16}}, "at least the concurrency \\(32\\), got 16"),
        ({"model": {"kv_cache_gb": -1}}, "model.kv_cache_gb must be a whole number of GB"),
        ({"model": {"image_cache_size": -2}}, "model.image_cache_size must be 0"),
        ({"discord": {"shard_count": -1}}, "shard_count must be 0"),
        ({"discord": {"shard_ids": [0]}}, "shard_ids needs discord.shard_count"),
        ({"discord": {"shard_count": 2, "shard_ids": [0, 2]}}, "must lie in 0..1 .*got 2"),
        ({"discord": {"shard_count": 2, "shard_ids": [-1]}}, "got -1"),
        ({"discord": {"shard_count": 4, "shard_ids": [1, 3, 1]}}, "lists a shard twice"),
    ],
)
def test_mistakes_name_the_key(document: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(document)


def test_shards_are_optional_and_a_process_may_take_some_of_them() -> None:
    assert (Config().discord.shard_count, Config().discord.shard_ids) == (0, [])
    one_of_two = parse_config({"discord": {"shard_count": 2, "shard_ids": [1]}})
    assert (one_of_two.discord.shard_count, one_of_two.discord.shard_ids) == (2, [1])
    assert parse_config({"discord": {"shard_count": 3}}).discord.shard_ids == []


def test_token_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[discord]\ntoken = "from-file"\n')
    monkeypatch.setenv("DISCORD_TOKEN", "from-env")
    assert load_config(path).discord.token == "from-env"
    monkeypatch.delenv("DISCORD_TOKEN")
    assert load_config(path).discord.token == "from-file"
    path.write_text("")
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        load_config(path)


def run_bot(tmp_path: Path, config: str, token: str = "secret-token-value") -> subprocess.CompletedProcess[str]:
    (tmp_path / "config.toml").write_text(config)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "DISCORD_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "bot", "run", "--config", str(tmp_path / "config.toml")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_run_refuses_to_start_half_working(tmp_path: Path) -> None:
    missing = run_bot(tmp_path, f'[model]\ndir = "{tmp_path / "models"}"\n')
    assert missing.returncode == 1
    assert "llava-bot convert llava-hf/llava-1.5-7b-hf --out" in missing.stderr
    assert "secret-token-value" not in missing.stderr + missing.stdout

    bad = run_bot(tmp_path, "[model]\nprecision = 'int5'\n")
    assert bad.returncode == 1 and "model.precision must be one of" in bad.stderr

    no_token = run_bot(tmp_path, "", token="")
    assert no_token.returncode == 1 and "DISCORD_TOKEN" in no_token.stderr
