"""What the benchmark asks the engines: pictures, questions, and the timing of each answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image

from bot.engine.base import Engine, GenerationSettings, Turn

log = logging.getLogger(__name__)

FIRST_QUESTION = "What is in this image? Describe it in detail."
FOLLOW_UP_QUESTION = "What color is the largest object?"
# Phone-photo proportions, larger than the model's input: resizing and cropping are part of a real request.
IMAGE_SIZE = (640, 480)


def make_image(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """A deterministic picture that differs for every ``seed``.

    Each request of a "new image" measurement gets its own seed, so no engine can answer it from work it
    kept from an earlier request.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    # A smooth two-colour gradient with coloured blocks and a little noise: compresses and resizes like a photo.
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = np.broadcast_to(start + (end - start) * ramp, (height, width, 3)).copy()
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        pixels[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@dataclass
class Timing:
    """One generation as seen by the caller: every time is ``time.monotonic()``."""

    submitted: float
    first_token: float | None
    finished: float
    new_tokens: int
    prompt_tokens: int
    text: str

    @property
    def ttft(self) -> float | None:
        """Seconds from handing the conversation to the engine to the first generated token."""
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first one, over the time they took (prefill excluded)."""
        if self.first_token is None or self.new_tokens < 2 or self.finished <= self.first_token:
            return None
        return (self.new_tokens - 1) / (self.finished - self.first_token)


async def timed_generation(engine: Engine, conversation: Sequence[Turn], settings: GenerationSettings) -> Timing:
    """Run one generation to the end and time it.

    The engine's own statistics are preferred (its worker thread stamps the first token as it is produced);
    times seen on the event loop stand in for engines that leave a field unset.
    """
    submitted = time.monotonic()
    stream = engine.generate(conversation, settings)
    pieces: list[str] = []
    first_seen: float | None = None
    async for piece in stream:
        if first_seen is None:
            first_seen = time.monotonic()
        pieces.append(piece)
    last_seen = time.monotonic()
    stats = stream.stats
    new_tokens = stats.new_tokens
    if new_tokens <= 0 and settings.ignore_eos:
        # With ignore_eos the length is fixed, so an engine that does not count still produced this many.
        new_tokens = settings.max_new_tokens
    return Timing(
        submitted=submitted,
        first_token=stats.first_token if stats.first_token is not None else first_seen,
        finished=stats.finished if stats.finished is not None else last_seen,
        new_tokens=new_tokens,
        prompt_tokens=stats.prompt_tokens,
        text="".join(pieces),
    )


def decode_union_rate(timings: Sequence[Timing]) -> float | None:
    """Aggregate decode tokens/s of concurrent generations.

    Tokens after each generation's first one, divided by the time during which at least one of them was
    decoding. Periods in which every generation was still waiting or prefilling are left out, so the number
    compares how fast an engine produces tokens for several conversations at once with how fast it does for
    one; interleaved prefills that slow decoding down are still inside the window.
    """
    spans = sorted((t.first_token, t.finished) for t in timings if t.first_token is not None)
    tokens = sum(max(t.new_tokens - 1, 0) for t in timings if t.first_token is not None)
    covered, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        covered += stop - max(start, end)
        end = stop
    return tokens / covered if covered > 0 and tokens > 0 else None


class LoopLag:
    """Samples how late the event loop wakes a task that sleeps for a few milliseconds.

    A bot that shares its loop with inference must keep this small, or heartbeats and message edits stall.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(max(time.perf_counter() - before - self.interval, 0.0))

    @contextlib.asynccontextmanager
    async def measuring(self) -> AsyncIterator[LoopLag]:
        """Sample while the body runs."""
        self._task = asyncio.create_task(self._tick())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def percentiles_ms(self) -> tuple[float | None, float | None]:
        """(p50, p99) of the lag in milliseconds, or Nones without samples."""
        return percentile(self.samples, 50, scale=1000.0), percentile(self.samples, 99, scale=1000.0)


def percentile(values: Sequence[float], q: float, scale: float = 1.0) -> float | None:
    """The ``q``-th percentile (nearest-rank) of ``values`` times ``scale``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(np.ceil(q / 100.0 * len(ordered))) - 1))
    return ordered[rank] * scale


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that were measured, or None when none was."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def emit_result(result: dict[str, Any], path: str | None) -> None:
    """Hand a measuring child process's result to the parent: as a JSON file, or on stdout without one."""
    text = json.dumps(result)
    if path:
        Path(path).write_text(text + "\n")
    else:
        print(text)


def exit_without_teardown(code: int) -> NoReturn:
    """End a measuring process once its result is out, without the interpreter's teardown.

    Collecting the modules of the bot, discord.py and OpenVINO at exit costs every measuring process a second or
    more and measures nothing: whatever the measurement opened it has closed by then.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
