"""How many questions one person may ask in a sliding window of time, e.g. ``"10/10m"``.

Independent of Discord: keys are plain integers (user ids) and time comes from an injectable clock, so
tests can move time forward without waiting.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

OFF = "off"
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
FORMAT_HINT = 'write it as "COUNT/PERIOD" with a unit s, m, h or d, e.g. "10/10m", or "off"'
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd])\s*$")
# Forgetting people who have been quiet for a whole period keeps the memory bounded by recent askers.
_SWEEP_EVERY = 256


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` questions within any ``period`` seconds."""

    count: int
    period: float

    def describe(self) -> str:
        """The limit in words, e.g. "10 questions per 10 minutes"."""
        questions = "question" if self.count == 1 else "questions"
        return f"{self.count} {questions} per {describe_seconds(self.period)}"


def describe_seconds(seconds: float) -> str:
    """A period in the largest unit that divides it, e.g. 600 -> "10 minutes", 86400 -> "day"."""
    for unit, name in ((86400.0, "day"), (3600.0, "hour"), (60.0, "minute"), (1.0, "second")):
        if seconds >= unit and seconds % unit == 0:
            amount = int(seconds // unit)
            return name if amount == 1 else f"{amount} {name}s"
    return f"{seconds:g} seconds"


def parse_rate_limit(text: str) -> RateLimit | None:
    """Read ``"COUNT/PERIOD"`` (``"10/10m"``, ``"3/30s"``, ``"100/1d"``, ``"5/h"``); ``"off"`` gives ``None``.

    Raises ValueError saying what is wrong and how to write it.
    """
    if text.strip().lower() == OFF:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate limit: {FORMAT_HINT}")
    count = int(match.group(1))
    period = float(match.group(2) or 1) * UNITS[match.group(3)]
    if count < 1 or period <= 0:
        raise ValueError(f"{text!r} must allow at least one question in a period longer than zero ({FORMAT_HINT})")
    return RateLimit(count, period)


@dataclass(frozen=True)
class Refusal:
    """A question over the limit: when the next one is allowed, and whether the person was already told."""

    retry_after: float
    already_told: bool


class RateLimiter:
    """A sliding-window counter per person; only admitted questions count."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._asked: dict[int, collections.deque[float]] = {}
        # Until when each refused person has already been told to wait: one sentence per wait, not one per try.
        self._told_until: dict[int, float] = {}
        self._checks = 0

    def check(self, key: int) -> Refusal | None:
        """Admit (and count) a question from ``key``, or say how long until the next one is allowed."""
        now = self._clock()
        self._checks += 1
        if self._checks % _SWEEP_EVERY == 0:
            self._sweep(now)
        asked = self._asked.setdefault(key, collections.deque())
        while asked and asked[0] <= now - self.limit.period:
            asked.popleft()
        if len(asked) < self.limit.count:
            asked.append(now)
            self._told_until.pop(key, None)
            return None
        allowed_at = asked[0] + self.limit.period
        already_told = self._told_until.get(key, float("-inf")) >= allowed_at
        self._told_until[key] = allowed_at
        return Refusal(retry_after=allowed_at - now, already_told=already_told)

    def _sweep(self, now: float) -> None:
        horizon = now - self.limit.period
        for key in [k for k, asked in self._asked.items() if not asked or asked[-1] <= horizon]:
            del self._asked[key]
        for key in [k for k, until in self._told_until.items() if until <= now]:
            del self._told_until[key]
        log.debug("Rate limiter tracks %d people", len(self._asked))
