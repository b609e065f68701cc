"""The scripted engine through the registry and the model manager, as the bot loads it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import ConfigError, parse_config
from bot.engine.base import EngineError, GenerationSettings, ImageRef, Turn
from bot.engine.manager import ModelManager, load_engine, needs_model_folder
from bot.engine.supervisor import INTERRUPTED, STALLED, Backoff
from tests.conftest import sample_image
from tests.support.scripted import Reply, ScriptedEngine, count_tokens, default_answer, pixels, until

SETTINGS = GenerationSettings(max_new_tokens=64)


async def outcome(
    manager: ModelManager, conversation: list[Turn], settings: GenerationSettings = SETTINGS
) -> tuple[str, str | None]:
    pieces: list[str] = []
    try:
        async for piece in manager.generate(conversation, settings):
            pieces.append(piece)
    except EngineError as error:
        return "".join(pieces), str(error)
    return "".join(pieces), None


def test_config_accepts_the_engine_only_while_registered(scripted_engine: str, tmp_path: Path) -> None:
    model = {"dir": str(tmp_path / "none"), "engine": scripted_engine}
    assert parse_config({"discord": {"token": "t"}, "model": model}).model.engine == "scripted"


def test_config_refuses_it_otherwise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.engine must be one of"):
        parse_config({"discord": {"token": "t"}, "model": {"engine": "scripted"}})


async def test_it_loads_without_a_folder_answers_and_records_what_it_saw(scripted_engine: str, tmp_path: Path) -> None:
    manager = ModelManager(tmp_path / "missing", scripted_engine, ov_config={"context_window": "900"})
    assert manager.available() == ["INT4", "INT8", "FP16"]
    await manager.switch("INT8")
    engine = manager.engine
    assert isinstance(engine, ScriptedEngine) and engine.precision == "INT8"
    picture = sample_image()
    question = [Turn("user", "What is it?", (ImageRef.from_image(picture),))]
    assert await outcome(manager, question) == (default_answer(question), None)
    engine.script(Reply("One two three four", error=EngineError("The model failed.")))
    assert await outcome(manager, question) == ("One two three four", "The model failed.")
    engine.script("Cut short by the token limit")
    assert await outcome(manager, question, GenerationSettings(max_new_tokens=3)) == ("Cut short by ", None)
    assert engine.requests[0].seen == [("user", "What is it?", (pixels(picture),))]
    assert [r.outcome for r in engine.requests] == ["finished", "failed", "finished"]
    assert manager.context_window == 900
    assert manager.count_prompt_tokens(question) == count_tokens(question, 576) == 2 + 3 + 3 + 576
    await manager.close()
    assert engine.closed


async def test_stalls_until_released_and_dies_on_cue(scripted_engine: str, tmp_path: Path) -> None:
    manager = ModelManager(tmp_path, scripted_engine, stall_timeout=0.5, backoff=Backoff(first=0.01))
    await manager.switch("INT4")
    first = manager.engine
    assert isinstance(first, ScriptedEngine)
    question = [Turn("user", "Hello?")]
    first.script(Reply("Held for a while", stall_after=2))
    held = asyncio.create_task(outcome(manager, question))
    await until(lambda: first.stalled)
    assert first.requests[0].answer == "Held for "
    first.release()
    assert await held == ("Held for a while", None)
    # A stall nobody releases is the supervisor's to end.
    first.script(Reply("Stuck here", stall_after=1))
    assert await outcome(manager, question) == ("Stuck ", STALLED)
    assert first.killed
    await until(lambda: manager.healthy and manager.engine is not first)
    second = manager.engine
    assert isinstance(second, ScriptedEngine) and second is not first
    second.script(Reply("Gone now", die_after=1))
    assert await outcome(manager, question) == ("Gone ", INTERRUPTED)
    await until(lambda: manager.healthy)
    assert manager.health.restarts == 2
    await manager.close()


async def test_repeat_says_the_unscripted_answer_that_many_times(scripted_engine: str, tmp_path: Path) -> None:
    manager = ModelManager(tmp_path, scripted_engine, ov_config={"repeat": "3", "pace": "0"})
    await manager.switch("INT4")
    question = [Turn("user", "Tell me a story.")]
    once = default_answer(question)
    assert await outcome(manager, question, GenerationSettings(max_new_tokens=100)) == (f"{once} {once} {once}", None)
    await manager.close()


def test_only_engines_that_say_so_load_without_a_folder(scripted_engine: str, tmp_path: Path) -> None:
    assert needs_model_folder("genai") and needs_model_folder("genai-batching") and needs_model_folder("optimum")
    assert not needs_model_folder("openai") and not needs_model_folder(scripted_engine)
    with pytest.raises(EngineError, match="Cannot load the model"):
        load_engine("genai", tmp_path / "INT4")
    with pytest.raises(EngineError, match="Unknown engine 'nope'"):
        load_engine("nope", tmp_path / "INT4")
    assert isinstance(load_engine(scripted_engine, tmp_path / "INT4"), ScriptedEngine)
