"""build_services: the one wiring point, with an engine registered the way tests and new engines register."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from bot import services as services_module
from bot.config import Config, ConfigError, parse_config
from bot.engine.base import Engine, EngineError, GenerationSettings, TextStream, Turn
from bot.engine.manager import ENGINES
from bot.services import build_services, ensure_model
from bot.store.db import current_revision, head_revision


class EchoEngine(Engine):
    """Answers with the question; loads no model folder."""

    name = "echo"
    needs_model_folder = False
    closed = threading.Event()

    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        stream = TextStream(asyncio.get_running_loop())
        stream.push(f"echo: {conversation[-1].text}")
        stream.finish()
        return stream

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return sum(len(turn.text.split()) for turn in conversation)

    @property
    def context_window(self) -> int:
        return 4096

    def close(self) -> None:
        EchoEngine.closed.set()


class BrokenEngine(EchoEngine):
    def __init__(self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None) -> None:
        raise EngineError("The test engine does not start.")


@pytest.fixture
def echo_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setitem(ENGINES, "echo", f"{__name__}:EchoEngine")
    monkeypatch.setitem(ENGINES, "broken", f"{__name__}:BrokenEngine")
    EchoEngine.closed.clear()
    return parse_config(
        {
            "model": {"engine": "echo", "dir": str(tmp_path / "no-model-here"), "auto_convert": False},
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}"},
        }
    )


def test_config_accepts_only_registered_engines(echo_config: Config) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"model": {"engine": "nope"}})
    assert str(refused.value) == (
        "model.engine must be one of genai, genai-batching, optimum, openai, echo, broken, got 'nope'"
    )


async def test_a_registered_engine_without_a_model_folder_serves(echo_config: Config, tmp_path: Path) -> None:
    ensure_model(echo_config)  # neither asks for a converted folder nor converts one
    assert not (tmp_path / "no-model-here").exists()
    services = await build_services(echo_config)
    try:
        assert await current_revision(echo_config.database.url) == head_revision()
        assert services.model_manager.precision == echo_config.model.precision
        stream = services.model_manager.generate([Turn("user", "hello?")], GenerationSettings())
        assert await stream.text() == "echo: hello?"
        await services.store.set_setting("precision", "INT8")
        assert await services.store.get_setting("precision") == "INT8"
        assert not EchoEngine.closed.is_set()
    finally:
        await services.close()
    assert EchoEngine.closed.is_set()
    assert services.http_session.closed
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "keep-claims"]
    # The next start takes the precision /precision saved.
    again = await build_services(echo_config)
    try:
        assert again.model_manager.precision == "INT8"
    finally:
        await again.close()


async def test_an_engine_that_fails_to_start_leaves_nothing_open(
    echo_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[aiohttp.ClientSession] = []

    real = aiohttp.ClientSession

    def recorded() -> aiohttp.ClientSession:
        opened.append(real())
        return opened[-1]

    monkeypatch.setattr(services_module.aiohttp, "ClientSession", recorded)
    echo_config.model.engine = "broken"
    with pytest.raises(EngineError) as failed:
        await build_services(echo_config)
    assert str(failed.value) == "The test engine does not start."
    assert len(opened) == 1 and opened[0].closed
