"""The one-thread engines' shared worker: a failing pipeline ends the answer with a sentence, not a traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.engine.base import EngineError, GenerationSettings, TextStream, Turn
from bot.engine.threaded import ThreadedEngine


class BrokenPipeline(ThreadedEngine):
    """Streams two pieces, then its pipeline raises, as a device lost mid-answer would."""

    def __init__(self) -> None:
        super().__init__("broken-model", thread_name="broken")

    def generate(self, conversation: object, settings: GenerationSettings) -> TextStream:
        stream = TextStream(asyncio.get_running_loop())

        def work() -> None:
            stream.push("It is ")
            stream.push("a picture of ")
            raise RuntimeError("device lost")

        self.run_alone(stream, work)
        return stream


async def test_a_pipeline_failure_mid_answer_ends_it_with_a_sentence_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = BrokenPipeline()
    pieces: list[str] = []
    with caplog.at_level(logging.ERROR), pytest.raises(EngineError) as failure:
        async for piece in engine.generate([Turn("user", "What is this?")], GenerationSettings()):
            pieces.append(piece)
    engine.close()
    assert "".join(pieces) == "It is a picture of "
    assert str(failure.value) == "The model failed while answering (RuntimeError)."
    assert any("Generation failed in broken-model" in r.getMessage() and r.exc_info for r in caplog.records)
