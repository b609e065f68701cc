"""The loop watch notices a blocked event loop and reports it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from bot.loopwatch import LoopWatch


def test_quantiles_and_worst_come_from_the_recorded_lags() -> None:
    watch = LoopWatch()
    for lag_ms in [1] * 98 + [30, 250]:
        watch.record(lag_ms / 1000)
    summary = watch.summary()
    assert summary.samples == 100
    assert summary.p50_ms == 1
    assert summary.p99_ms == 30
    assert summary.worst_ms == pytest.approx(250)


async def test_a_blocking_call_on_the_loop_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(interval=0.01, warn_after=0.2)
    watch.start()
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="bot.loopwatch"):
        time.sleep(0.4)  # noqa: ASYNC251 - a blocking call on the loop, as everyone else sees it
        await asyncio.sleep(0.05)
    await watch.stop()
    assert watch.summary().worst_ms >= 300
    assert any("event loop was blocked" in record.getMessage() for record in caplog.records)
