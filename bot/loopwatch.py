"""Watches the event loop's responsiveness: every channel, heartbeat and edit waits when it is blocked.

A timer asks to wake up every ``interval`` seconds; how late it wakes is the loop's lag at that moment.
A lag of more than ``warn_after`` seconds is logged as a warning (something ran on the loop that should
have been off it), and :meth:`LoopWatch.summary` gives the figures over the process's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LagSummary:
    """Lag figures in milliseconds over every sample taken."""

    samples: int
    p50_ms: float
    p99_ms: float
    worst_ms: float

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, worst {self.worst_ms:.1f} ms"


class LoopWatch:
    """Measures how late the event loop runs a periodic timer. Start it on the loop, stop it at shutdown."""

    # Lags are kept in a fixed histogram (1 ms buckets up to 10 s), so months of running cost no memory.
    _BUCKETS = 10_000

    def __init__(self, interval: float = 0.05, warn_after: float = 0.5) -> None:
        self.interval = interval
        self.warn_after = warn_after
        self._counts = [0] * (self._BUCKETS + 1)
        self._samples = 0
        self._worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def record(self, lag: float) -> None:
        """Count one measured lag (seconds)."""
        lag = max(0.0, lag)
        self._samples += 1
        self._worst = max(self._worst, lag)
        self._counts[min(int(lag * 1000), self._BUCKETS)] += 1
        if lag > self.warn_after:
            log.warning("The event loop was blocked for %.2f s; replies and heartbeats waited meanwhile", lag)

    def summary(self) -> LagSummary:
        """Median, 99th percentile and worst lag so far."""
        return LagSummary(self._samples, self._quantile(0.5), self._quantile(0.99), self._worst * 1000)

    def _quantile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        wanted = q * self._samples
        seen = 0
        for bucket, count in enumerate(self._counts):
            seen += count
            if seen >= wanted:
                return float(bucket)
        return float(self._BUCKETS)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(loop.time() - due)
