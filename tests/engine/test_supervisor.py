"""The supervisor through the model manager, with engines the test controls: death, stalls, restarts."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from bot.cogs.admin import health_lines
from bot.engine import manager as manager_module
from bot.engine.base import Engine, EngineError, GenerationSettings, TextStream, Turn
from bot.engine.genai import GenaiEngine
from bot.engine.manager import ModelManager
from bot.engine.supervisor import CANT_START, INTERRUPTED, STALLED, Backoff
from tests.e2e.helpers import HeldPipeline

QUESTION = [Turn("user", "What is this?")]
SETTINGS = GenerationSettings(max_new_tokens=8)


class FakeEngine(Engine):
    """An engine whose answers, death and killability the test decides."""

    name = "fake"

    def __init__(self, number: int, *, killable: bool = True) -> None:
        super().__init__(f"fake-{number}")
        self.number = number
        self.killable = killable
        self.dead: str | None = None
        self.killed = False
        self.closed = False
        self.streams: list[TextStream] = []

    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        stream = TextStream(asyncio.get_running_loop())
        self.streams.append(stream)
        return stream

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return 1

    @property
    def context_window(self) -> int:
        return 100

    def failure(self) -> str | None:
        return self.dead

    def kill(self) -> bool:
        self.killed = True
        return self.killable

    def close(self) -> None:
        self.closed = True


class Loader:
    """Stands in for ``load_engine``: hands out numbered engines, or fails when told to."""

    def __init__(self, *, killable: bool = True) -> None:
        self.killable = killable
        self.engines: list[FakeEngine] = []
        self.failures = 0  # the next this many loads fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(
        self, kind: str, folder: Path, device: str = "CPU", ov_config: object = None, batching: object = None
    ) -> Engine:
        if self.failures:
            self.failures -= 1
            raise EngineError("Cannot load the model: openvino_language_model.bin is missing.")
        self.gate.wait(30)  # a successful load waits until the test opens the gate
        engine = FakeEngine(len(self.engines) + 1, killable=self.killable)
        self.engines.append(engine)
        return engine


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loader]:
    fake = Loader()
    monkeypatch.setattr(manager_module, "load_engine", fake)
    yield fake
    fake.gate.set()


async def started(tmp_path: Path, *, stall_timeout: float = 60.0, backoff: Backoff | None = None) -> ModelManager:
    manager = ModelManager(
        tmp_path, "fake", stall_timeout=stall_timeout, backoff=backoff or Backoff(first=0.01, limit=0.04)
    )
    await manager.switch("INT4")
    return manager


async def until(predicate: Callable[[], object], seconds: float = 20.0) -> None:
    """Wait until ``predicate()`` holds (polling: the fakes have no events to wait on)."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never came true")


async def answer_with(engine: FakeEngine, index: int, pieces: Sequence[str]) -> None:
    """Let ``engine`` answer its ``index``-th request with ``pieces`` once that request arrives."""
    await until(lambda: len(engine.streams) > index)
    for piece in pieces:
        engine.streams[index].push(piece)
    engine.streams[index].finish()


async def outcome(stream: TextStream) -> tuple[str, str | None]:
    """The text a person would see, and the sentence the answer ended with (None: it finished)."""
    pieces: list[str] = []
    try:
        async for piece in stream:
            pieces.append(piece)
    except EngineError as error:
        return "".join(pieces), str(error)
    return "".join(pieces), None


def test_backoff_doubles_up_to_a_minute_and_starts_again_after_a_stable_run() -> None:
    backoff = Backoff()
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.failed_after(5.0)  # a crash loop keeps waiting long
    assert backoff.next_delay() == 60
    backoff.failed_after(600.0)  # a crash after a good run waits a second
    assert [backoff.next_delay() for _ in range(3)] == [1, 2, 4]


async def test_a_dead_engine_ends_its_answer_once_and_the_next_question_waits_for_the_restart(
    tmp_path: Path, loader: Loader
) -> None:
    manager = await started(tmp_path)
    first = loader.engines[0]
    interrupted = manager.generate(QUESTION, SETTINGS)
    first.streams[0].push("The cat")
    loader.gate.clear()  # the restart takes a while: the next question must wait for it
    first.dead = "the worker process 4242 was ended by SIGKILL"
    waiting = manager.generate(QUESTION, SETTINGS)
    assert not manager.healthy
    loader.gate.set()
    answered = asyncio.create_task(outcome(waiting))
    await until(lambda: len(loader.engines) == 2)
    await answer_with(loader.engines[1], 0, ["A dog", " on a sofa."])
    assert await outcome(interrupted) == ("The cat", INTERRUPTED)
    assert await answered == ("A dog on a sofa.", None)
    assert first.killed and manager.healthy
    health = manager.health
    assert health.state == "up" and health.restarts == 1
    assert health.last_failure is not None and "SIGKILL" in health.last_failure.reason
    await until(lambda: first.closed)  # the dead engine's resources are freed once it is replaced
    # Answers after the restart start at once on the new engine.
    later = manager.generate(QUESTION, SETTINGS)
    await answer_with(loader.engines[1], 1, ["Yes."])
    assert await outcome(later) == ("Yes.", None)
    await manager.close()


async def test_restarts_that_keep_failing_give_a_sentence_and_the_log_says_why(
    tmp_path: Path, loader: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await started(tmp_path)
    loader.failures = 3
    loader.gate.clear()  # the attempt after the failures waits, so the bot stays down while we look
    loader.engines[0].dead = "the worker process 4242 exited with status 1"
    waiting = manager.generate(QUESTION, SETTINGS)
    with caplog.at_level(logging.ERROR, logger="bot.engine.supervisor"):
        assert await outcome(waiting) == ("", CANT_START)
        assert manager.health.state == "down"
        shown = health_lines(manager.health)  # what /status says meanwhile
        assert shown["health"].startswith("can't start; the log says why (next attempt <t:")
        assert re.fullmatch(r"<t:\d+:f>: restart failed: Cannot load the model: .*", shown["failure"])
        assert await outcome(manager.generate(QUESTION, SETTINGS)) == ("", CANT_START)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("openvino_language_model.bin is missing" in e for e in errors)
    assert any("can't start" in e for e in errors)
    assert "restart failed" in (manager.health.last_failure.reason if manager.health.last_failure else "")
    # Retrying goes on in the background; once a restart works, questions are answered again.
    loader.gate.set()
    await until(lambda: manager.healthy)
    later = manager.generate(QUESTION, SETTINGS)
    await answer_with(loader.engines[1], 0, ["Back."])
    assert await outcome(later) == ("Back.", None)
    assert manager.health.restarts == 1
    await manager.close()


async def test_a_stalled_answer_is_ended_and_the_engine_killed_and_restarted(tmp_path: Path, loader: Loader) -> None:
    manager = await started(tmp_path, stall_timeout=0.5)
    stuck = manager.generate(QUESTION, SETTINGS)
    loader.engines[0].streams[0].push("The sign")
    assert await outcome(stuck) == ("The sign", STALLED)
    assert loader.engines[0].killed
    await until(lambda: manager.healthy and len(loader.engines) == 2)
    health = manager.health
    assert health.restarts == 1
    assert health.last_failure is not None and health.last_failure.reason == "an answer made no progress for 0.5 s"
    # An answer that keeps producing tokens is never cut, however long it runs.
    steady = manager.generate(QUESTION, SETTINGS)
    stream = loader.engines[1].streams[0]
    for _ in range(75):  # three times the stall timeout
        stream.push("la ")
        await asyncio.sleep(0.02)
    stream.finish()
    text, ended_with = await outcome(steady)
    assert ended_with is None and text == "la " * 75
    assert manager.health.restarts == 1
    await manager.close()


async def test_time_waiting_for_a_restart_does_not_count_as_a_stall(tmp_path: Path, loader: Loader) -> None:
    manager = await started(tmp_path, stall_timeout=0.5)
    loader.gate.clear()
    loader.engines[0].dead = "the worker process 4242 was ended by SIGSEGV"
    waiting = manager.generate(QUESTION, SETTINGS)
    answered = asyncio.create_task(outcome(waiting))
    await asyncio.sleep(1.5)  # three stall timeouts pass while the question waits for the engine
    assert not answered.done()
    loader.gate.set()
    await answer_with_when_loaded(loader, ["Fine."])
    assert await answered == ("Fine.", None)
    await manager.close()


async def answer_with_when_loaded(loader: Loader, pieces: Sequence[str]) -> None:
    await until(lambda: len(loader.engines) == 2)
    await answer_with(loader.engines[1], 0, pieces)


async def test_a_stuck_in_process_engine_is_abandoned_and_replaced(tmp_path: Path, loader: Loader) -> None:
    loader.killable = False  # a thread in this process: it can't be stopped from outside
    manager = await started(tmp_path, stall_timeout=0.5)
    stuck = manager.generate(QUESTION, SETTINGS)
    assert await outcome(stuck) == ("", STALLED)
    assert loader.engines[0].streams[0].cancelled, "the stuck thread is told to stop at its next token"
    await until(lambda: manager.healthy and len(loader.engines) == 2)
    later = manager.generate(QUESTION, SETTINGS)
    await answer_with(loader.engines[1], 0, ["Here."])
    assert await outcome(later) == ("Here.", None)
    await manager.close()
    # Closing would wait for the stuck thread for ever; the new engine is closed as usual.
    assert not loader.engines[0].closed and loader.engines[1].closed


async def test_switching_to_the_same_precision_reloads_a_broken_engine(tmp_path: Path, loader: Loader) -> None:
    manager = await started(tmp_path, backoff=Backoff(first=600))  # no automatic restart during this test
    await manager.switch("INT4")
    assert len(loader.engines) == 1, "a healthy engine at that precision is kept"
    loader.engines[0].dead = "the worker process 4242 was ended by SIGKILL"
    await manager.switch("INT4")
    assert len(loader.engines) == 2 and manager.healthy and manager.health.restarts == 1
    answered = manager.generate(QUESTION, SETTINGS)
    await answer_with(loader.engines[1], 0, ["Again."])
    assert await outcome(answered) == ("Again.", None)
    await manager.close()


async def test_a_real_genai_engine_that_hangs_is_replaced_and_answers_again(tiny_llava: tuple[Path, Path]) -> None:
    manager = ModelManager(tiny_llava[1], "genai", stall_timeout=2.0, backoff=Backoff(first=0.01))
    await manager.switch("INT4")
    stuck_engine = manager.engine
    assert isinstance(stuck_engine, GenaiEngine)
    held = HeldPipeline(stuck_engine.pipeline, after=3)  # a step that never returns, after a few words
    stuck_engine.pipeline = held
    settings = GenerationSettings(max_new_tokens=40, ignore_eos=True)
    try:
        text, sentence = await outcome(manager.generate(QUESTION, settings))
        assert sentence == STALLED and text.strip(), "the words written before the hang stay"
        await until(lambda: manager.healthy and manager.engine is not stuck_engine)
        # The fresh engine answers while the old thread is still stuck.
        assert held.entered.is_set() and not held.release.is_set()
        text, sentence = await outcome(manager.generate(QUESTION, settings))
        assert sentence is None and text.strip()
        assert manager.health.restarts == 1
    finally:
        held.release.set()
        await manager.close()
