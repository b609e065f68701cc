"""One engine, many channels: a bounded first-come-first-served queue with one request per person.

``async with scheduler.slot(user_id, on_position=...)`` waits for a turn and holds it for the body of
the block. Whatever ends the block (an answer, an error, a cancelled task) hands the turn to the next
request, and a task cancelled while it waits simply leaves the queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
QUEUE_FULL = "I'm busy: {waiting} waiting already; please try again in a few minutes."
ALREADY_ASKING = "I'm still working on your previous question; please wait for that answer first."

PositionCallback = Callable[[int], Awaitable[None]]


class QueueFull(Exception):
    """Too many requests are waiting; ``str(error)`` is a sentence for the person."""

    def __init__(self, waiting: int) -> None:
        super().__init__(QUEUE_FULL.format(waiting="1 question is" if waiting == 1 else f"{waiting} questions are"))
        self.waiting = waiting


class AlreadyAsking(Exception):
    """The person already has a request waiting or running; ``str(error)`` is a sentence for them."""

    def __init__(self) -> None:
        super().__init__(ALREADY_ASKING)


@dataclass
class Ticket:
    """One admitted request. Times are from the event loop's monotonic clock."""

    user_id: int
    number: int
    queued_at: float
    started_at: float | None = None

    @property
    def waited(self) -> float:
        """Seconds spent in the queue (so far, if still waiting)."""
        end = self.started_at if self.started_at is not None else asyncio.get_running_loop().time()
        return end - self.queued_at


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    # Set whenever this waiter's position may have changed or its turn has come.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    granted: bool = False


class Scheduler:
    """Admits requests in arrival order, runs at most ``concurrency`` at once, queues up to ``max_queue``."""

    def __init__(self, *, max_queue: int = 20, concurrency: int = 1) -> None:
        if max_queue < 0 or concurrency < 1:
            raise ValueError("max_queue must be >= 0 and concurrency >= 1")
        self.max_queue = max_queue
        self.concurrency = concurrency
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._running = 0
        self._users: set[int] = set()
        self._issued = 0

    @property
    def queue_length(self) -> int:
        """Requests waiting for their turn (not counting those running)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests currently holding a turn."""
        return self._running

    def is_asking(self, user_id: int) -> bool:
        """Whether this person has a request waiting or running."""
        return user_id in self._users

    @asynccontextmanager
    async def slot(self, user_id: int, on_position: PositionCallback | None = None) -> AsyncIterator[Ticket]:
        """Wait for a turn and hold it for the duration of the ``async with`` block.

        Raises :class:`AlreadyAsking` or :class:`QueueFull` at once, before any waiting. While the
        request waits, ``await on_position(n)`` is called with its position (1 = next) when it joins
        the queue and whenever that position changes; a request that can start at once is never
        given a position.
        """
        ticket, waiter = self._admit(user_id)
        if waiter is not None:
            try:
                await self._wait_for_turn(waiter, on_position)
            except BaseException:
                self._abandon(waiter)
                raise
        try:
            yield ticket
        finally:
            self._release(ticket)

    # --- internals (no awaits between a check and the state change it guards) --------------------
    def _admit(self, user_id: int) -> tuple[Ticket, _Waiter | None]:
        if user_id in self._users:
            raise AlreadyAsking()
        now = asyncio.get_running_loop().time()
        if self._running < self.concurrency and not self._waiting:
            ticket = self._issue(user_id, now)
            ticket.started_at = now
            self._running += 1
            return ticket, None
        if len(self._waiting) >= self.max_queue:
            log.info("queue full (%d waiting); user %s turned away", len(self._waiting), user_id)
            raise QueueFull(len(self._waiting))
        waiter = _Waiter(self._issue(user_id, now))
        self._waiting.append(waiter)
        log.debug("request %d queued at position %d", waiter.ticket.number, len(self._waiting))
        return waiter.ticket, waiter

    def _issue(self, user_id: int, now: float) -> Ticket:
        self._issued += 1
        self._users.add(user_id)
        return Ticket(user_id=user_id, number=self._issued, queued_at=now)

    async def _wait_for_turn(self, waiter: _Waiter, on_position: PositionCallback | None) -> None:
        reported: int | None = None
        while True:
            # Clear before reading the state, so a change made during the callback below is not missed.
            waiter.changed.clear()
            if waiter.granted:
                return
            position = self._waiting.index(waiter) + 1
            if on_position is not None and position != reported:
                reported = position
                try:
                    await on_position(position)
                except Exception:
                    # A failed status update must not cost the person their place in the queue.
                    log.exception("queue position callback failed")
                continue
            await waiter.changed.wait()

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.granted:
            # The turn arrived just as the task was cancelled: pass it on.
            self._release(waiter.ticket)
            return
        self._waiting.remove(waiter)
        self._users.discard(waiter.ticket.user_id)
        log.debug("request %d left the queue", waiter.ticket.number)
        self._notify_waiting()

    def _release(self, ticket: Ticket) -> None:
        self._running -= 1
        self._users.discard(ticket.user_id)
        self._dispatch()

    def _dispatch(self) -> None:
        moved = False
        now = asyncio.get_running_loop().time()
        while self._running < self.concurrency and self._waiting:
            waiter = self._waiting.popleft()
            waiter.granted = True
            waiter.ticket.started_at = now
            self._running += 1
            waiter.changed.set()
            moved = True
        if moved:
            self._notify_waiting()

    def _notify_waiting(self) -> None:
        for waiter in self._waiting:
            waiter.changed.set()
