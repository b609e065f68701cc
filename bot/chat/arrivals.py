"""A person's questions reach the one-question-per-person check in the order they arrived.

Between arriving and that check a question does work of varying length: its image is downloaded and
decoded, a replied-to message fetched, the "Thinking…" placeholder posted. Without an order, a quick
follow-up could overtake the question before it and be answered, while the earlier one is told that the
person is still waiting for an answer. An :class:`Arrival` is taken the moment a question comes in (before
anything is awaited, so in the order the gateway delivered them), and waits for the person's earlier
arrivals to pass the check, or to drop out, before making it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)


class Arrival:
    """One question's place in its person's line; :meth:`leave` once it has passed the check or dropped out."""

    def __init__(self, order: ArrivalOrder, key: int) -> None:
        self._order = order
        self.key = key
        self._left = asyncio.Event()

    async def turn(self) -> None:
        """Wait until every earlier arrival of the same person has left the line."""
        for earlier in self._order.before(self):
            await earlier._left.wait()

    def leave(self) -> None:
        """Let the person's next question go ahead; calling it again does nothing."""
        if not self._left.is_set():
            self._left.set()
            self._order.remove(self)


class ArrivalOrder:
    """The lines of all people, each holding the questions not yet past the check, in arrival order."""

    def __init__(self) -> None:
        self._lines: dict[int, list[Arrival]] = {}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def arrive(self, key: int) -> Arrival:
        """A question of person ``key`` has come in: its place behind the person's earlier ones."""
        arrival = Arrival(self, key)
        self._lines.setdefault(key, []).append(arrival)
        return arrival

    def before(self, arrival: Arrival) -> list[Arrival]:
        """The arrivals of the same person still in line ahead of ``arrival``."""
        line = self._lines.get(arrival.key, [])
        return line[: line.index(arrival)] if arrival in line else []

    def remove(self, arrival: Arrival) -> None:
        """Take ``arrival`` out of its line (use :meth:`Arrival.leave`)."""
        line = self._lines.get(arrival.key)
        if line is not None and arrival in line:
            line.remove(arrival)
            if not line:
                del self._lines[arrival.key]


@contextlib.asynccontextmanager
async def in_turn(arrival: Arrival | None) -> AsyncIterator[None]:
    """Wait for ``arrival``'s turn and make the check inside the block; leave the line however it ends.

    Leaving awaits nothing, so code right after the block runs before the person's next question resumes.
    """
    try:
        if arrival is not None:
            await arrival.turn()
        yield
    finally:
        if arrival is not None:
            arrival.leave()
