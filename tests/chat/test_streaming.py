"""The reply streamer, seen through a fake sink that records every message and edit."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from bot.chat import streaming
from bot.chat.splitting import split_message
from bot.chat.streaming import ReplyStreamer

INTERVAL = 0.05
MARKER = streaming.DEFAULT_MARKER
# Time measured by the sink is read a few microseconds after the streamer's own reading.
CLOCK_SLACK = 1e-3


@dataclass
class Call:
    kind: str  # "send" or "edit"
    message: int
    content: str
    at: float
    ok: bool
    live: bool = False


class FakeSink:
    """Records every call; ``fail`` decides which calls raise (after being recorded)."""

    def __init__(self, limit: int = 2000, fail: Callable[[Call], bool] | None = None) -> None:
        self.limit = limit
        self.fail = fail or (lambda call: False)
        self.contents: list[str] = []
        self.calls: list[Call] = []
        self.deleted: set[int] = set()
        # Whether each message shows controls meant only while it changes (the Stop button).
        self.live: list[bool] = []

    def _record(self, kind: str, message: int, content: str, live: bool) -> None:
        assert len(content) <= self.limit, f"{len(content)} characters sent"
        assert content.strip(), "blank message sent"
        call = Call(kind, message, content, asyncio.get_running_loop().time(), ok=True, live=live)
        call.ok = not self.fail(call) and message not in self.deleted
        self.calls.append(call)
        if message in self.deleted:
            raise streaming.MessageGone("Unknown Message")
        if not call.ok:
            raise ConnectionError("simulated failure")

    async def send(self, content: str, *, live: bool) -> int:
        self._record("send", len(self.contents), content, live)
        self.contents.append(content)
        self.live.append(live)
        return len(self.contents) - 1

    async def edit(self, handle: int, content: str, *, live: bool) -> None:
        self._record("edit", handle, content, live)
        self.contents[handle] = content
        self.live[handle] = live

    def assert_throttled(self, interval: float = INTERVAL) -> None:
        """No message was touched twice within ``interval`` (failed attempts count too).

        The one exception: the first text of the answer follows the placeholder at once.
        """
        by_message: dict[int, list[Call]] = {}
        for call in self.calls:
            by_message.setdefault(call.message, []).append(call)
        for calls in by_message.values():
            for earlier, later in itertools.pairwise(calls):
                if earlier is self.calls[0] and later is self.first_text():
                    continue
                assert later.at - earlier.at >= interval - CLOCK_SLACK

    def first_text(self) -> Call | None:
        """The first call that showed answer text (still growing, or already final) instead of a status."""
        first = [call for call in self.calls if call.message == 0]
        final = first[-1].content if first else None
        return next((call for call in first[1:] if call.content.endswith(MARKER) or call.content == final), None)


def make(sink: FakeSink, *, edit_interval: float = INTERVAL, final_attempts: int = 3) -> ReplyStreamer[int]:
    return ReplyStreamer(
        sink,
        limit=sink.limit,
        edit_interval=edit_interval,
        final_attempts=final_attempts,
        retry_delay=0.01,
    )


async def stream(streamer: ReplyStreamer[int], answer: str, piece: int = 7, pause: float = 0.002) -> None:
    for start in range(0, len(answer), piece):
        streamer.feed(answer[start : start + piece])
        await asyncio.sleep(pause)


def words(count: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    vocabulary = ["the", "cat", "sits", "on", "a", "red", "mat,", "quietly", "watching.", "\n", "\n\n", "🙂"]
    return " ".join(rng.choice(vocabulary) for _ in range(count))


# --- the first message and the waiting placeholder ------------------------------------------------


async def test_start_posts_the_placeholder_at_once() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Queued (position 2)…")
    assert sink.contents == ["⏳ Queued (position 2)…"]
    assert streamer.messages == [0]
    await streamer.finish()


async def test_status_updates_are_coalesced_and_throttled() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Queued (position 3)…")
    await streamer.status("⏳ Queued (position 2)…")
    await streamer.status("⏳ Queued (position 1)…")
    await streamer.status("Thinking…")
    await asyncio.sleep(INTERVAL * 3)
    # Only the latest status is worth an edit.
    assert sink.contents == ["Thinking…"]
    assert [call.content for call in sink.calls] == ["⏳ Queued (position 3)…", "Thinking…"]
    streamer.feed("A cat.")
    await streamer.status("⏳ Queued (position 9)…")  # too late: the answer has begun
    assert await streamer.finish()
    assert sink.contents == ["A cat."]
    sink.assert_throttled()


# --- streaming a short answer ---------------------------------------------------------------------


async def test_answer_grows_with_marker_and_ends_without_it() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    answer = "The photo shows a red bicycle leaning against a blue door. " * 5
    await stream(streamer, answer)
    await asyncio.sleep(INTERVAL * 2)
    previews = [call.content for call in sink.calls if call.kind == "edit"]
    assert previews, "the answer should be visible while it is written"
    assert all(preview.endswith(MARKER) for preview in previews)
    assert all(answer.startswith(preview.removesuffix(MARKER)) for preview in previews)
    assert await streamer.finish()
    assert sink.contents == [answer]
    assert streamer.text == answer
    sink.assert_throttled()


async def test_edits_coalesce_many_pieces() -> None:
    sink = FakeSink()
    streamer = make(sink, edit_interval=0.5)
    await streamer.start("Thinking…")
    for _ in range(300):
        streamer.feed("word ")
    await asyncio.sleep(0)
    assert await streamer.finish()
    # 300 pieces, yet two edits: the first text at once, then the final text after the interval.
    assert [call.kind for call in sink.calls] == ["send", "edit", "edit"]
    assert sink.calls[1].content == "word " * 300 + MARKER
    assert sink.calls[2].at - sink.calls[1].at >= 0.5 - CLOCK_SLACK
    assert sink.contents == ["word " * 300]


async def test_the_first_text_does_not_wait_for_the_interval() -> None:
    sink = FakeSink()
    streamer = make(sink, edit_interval=1.0)
    await streamer.start("Thinking…")
    streamer.feed("The first")
    await _until(lambda: len(sink.calls) == 2)
    assert sink.contents == ["The first" + MARKER]
    # Throttling would have held this edit back until a whole interval after the placeholder.
    assert sink.calls[1].at - sink.calls[0].at < 1.0
    streamer.feed(" words.")
    assert await streamer.finish()
    assert sink.contents == ["The first words."]
    assert sink.calls[2].at - sink.calls[1].at >= 1.0 - CLOCK_SLACK, "from the second edit on the interval applies"


async def test_the_first_text_does_not_wait_behind_a_status_update() -> None:
    sink = FakeSink()
    streamer = make(sink, edit_interval=1.0)
    await streamer.start("⏳ Waiting in line: position 2.")
    await streamer.status("⏳ Waiting in line: position 1.")
    await asyncio.sleep(0.05)
    streamer.feed("Now")
    await _until(lambda: sink.contents == ["Now" + MARKER])
    # The status never showed: it was still waiting out the interval when the text came.
    assert [call.content for call in sink.calls] == ["⏳ Waiting in line: position 2.", "Now" + MARKER]
    assert sink.calls[1].at - sink.calls[0].at < 1.0
    assert await streamer.finish()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never met")


async def test_finish_without_start_posts_the_answer() -> None:
    sink = FakeSink()
    streamer = make(sink)
    streamer.feed("Just text.")
    assert await streamer.finish()
    assert sink.contents == ["Just text."]


async def test_empty_answer_gets_a_placeholder() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("  \n")
    assert await streamer.finish()
    assert sink.contents == [streaming.EMPTY_ANSWER]


async def test_final_suffix_is_appended() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("It is a heron.")
    assert await streamer.finish("\n-# Only the last 10 messages were used.")
    assert sink.contents == ["It is a heron.\n-# Only the last 10 messages were used."]
    assert streamer.text == "It is a heron."


async def test_feed_after_finish_is_a_mistake() -> None:
    streamer = make(FakeSink())
    await streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("late")
    with pytest.raises(RuntimeError):
        await streamer.finish()


# --- failures -----------------------------------------------------------------------------------


async def test_fail_keeps_the_text_and_adds_an_error_line() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("The sign says")
    assert await streamer.fail("The model stopped unexpectedly.")
    assert sink.contents == ["The sign says\n\n⚠️ The model stopped unexpectedly."]


async def test_fail_before_any_text_shows_only_the_sentence() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Queued (position 1)…")
    assert await streamer.fail("The prompt is too long for the model.")
    assert sink.contents == ["The prompt is too long for the model."]


async def test_transient_edit_failures_do_not_lose_text() -> None:
    failed: list[Call] = []

    def every_third_edit(call: Call) -> bool:
        if call.kind == "edit" and len(sink.calls) % 3 == 0:
            failed.append(call)
            return True
        return False

    sink = FakeSink(fail=every_third_edit)
    streamer = make(sink)
    await streamer.start("Thinking…")
    answer = words(900)
    await stream(streamer, answer, piece=11)
    assert await streamer.finish()
    assert failed, "the test should have exercised failures"
    assert "".join(sink.contents) == answer
    assert not any(content.endswith(MARKER) for content in sink.contents)
    sink.assert_throttled()


async def test_final_edit_is_retried() -> None:
    final_attempts: list[Call] = []

    def first_two_final_edits(call: Call) -> bool:
        if call.content == "Done.":
            final_attempts.append(call)
            return len(final_attempts) <= 2
        return False

    sink = FakeSink(fail=first_two_final_edits)
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("Done.")
    assert await streamer.finish()
    assert sink.contents == ["Done."]
    assert len(final_attempts) == 3
    sink.assert_throttled()


async def test_final_edit_gives_up_after_a_few_attempts() -> None:
    sink = FakeSink(fail=lambda call: call.kind == "edit")
    streamer = make(sink, final_attempts=3)
    await streamer.start("Thinking…")
    streamer.feed("Lost.")
    assert not await streamer.finish()
    assert len([call for call in sink.calls if call.content == "Lost."]) == 3
    assert sink.contents == ["Thinking…"]


# --- stopping and deleted messages ------------------------------------------------------------------


async def test_stop_ends_the_text_with_the_note() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("A red")
    assert await streamer.stop("\n-# Stopped.")
    assert sink.contents == ["A red\n-# Stopped."]


async def test_stop_before_any_text_shows_only_the_note() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Waiting in line: position 1.")
    assert await streamer.stop("\n-# Stopped.")
    assert sink.contents == ["-# Stopped."]


async def test_only_the_last_write_of_a_message_is_not_live() -> None:
    sink = FakeSink(limit=100)
    streamer = make(sink, edit_interval=0.01)
    await streamer.start("Thinking…")
    assert sink.live == [True]
    await stream(streamer, words(60), piece=9, pause=0.003)
    assert len(sink.contents) >= 2
    # A part that was split off is complete: its last write already drops the live controls.
    assert sink.live[:-1] == [False] * (len(sink.contents) - 1)
    assert sink.live[-1]
    assert await streamer.finish()
    assert sink.live == [False] * len(sink.contents)
    for index in range(len(sink.contents)):
        writes = [call for call in sink.calls if call.message == index]
        assert [call.live for call in writes] == [True] * (len(writes) - 1) + [False]


async def test_a_deleted_message_is_never_written_again() -> None:
    gone: list[bool] = []
    sink = FakeSink()
    streamer = make(sink, final_attempts=3)
    streamer.on_gone = lambda: gone.append(True)
    await streamer.start("Thinking…")
    streamer.feed("Some")
    await asyncio.sleep(INTERVAL * 2)
    sink.deleted.add(0)
    streamer.feed(" more text")
    await asyncio.sleep(INTERVAL * 3)
    assert gone == [True]
    assert not await streamer.stop("\n-# Stopped.")
    attempts = [call for call in sink.calls if call.message == 0 and not call.ok]
    # One edit found the message gone; no retry, no final edit, no new message.
    assert len(attempts) == 1
    assert len(sink.contents) == 1 and streamer.gone


async def test_a_message_reported_gone_is_left_alone_and_the_others_are_closed() -> None:
    sink = FakeSink(limit=100)
    streamer = make(sink, edit_interval=0.01)
    await streamer.start("Thinking…")
    await stream(streamer, words(60), piece=9, pause=0.003)
    await asyncio.sleep(0.05)
    assert len(sink.contents) >= 2
    first = sink.contents[0]
    streamer.message_gone(0)
    sink.deleted.add(0)
    assert not await streamer.stop("\n-# Stopped.")
    assert not [call for call in sink.calls if not call.ok]
    assert sink.contents[0] == first
    assert sink.contents[-1].endswith("\n-# Stopped.")


# --- long answers ---------------------------------------------------------------------------------


async def test_long_answer_is_split_losslessly() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    answer = words(2500)
    assert len(answer) > 3 * 2000
    await stream(streamer, answer, piece=23, pause=0.001)
    assert await streamer.finish()
    assert "".join(sink.contents) == answer
    assert sink.contents == split_message(answer, 2000)
    assert all(len(content) <= 2000 for content in sink.contents)
    assert not any(content.endswith(MARKER) for content in sink.contents)
    assert streamer.messages == list(range(len(sink.contents)))
    sink.assert_throttled()


async def test_finished_messages_are_never_edited_again() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("Thinking…")
    answer = words(1500, seed=7)
    await stream(streamer, answer, piece=31, pause=0.001)
    assert await streamer.finish()
    for index, final in enumerate(sink.contents[:-1]):
        touches = [call.content for call in sink.calls if call.message == index]
        # Once a message shows its final text, nothing else is written to it.
        assert touches.index(final) == len(touches) - 1


async def test_one_big_piece_is_split_at_once() -> None:
    sink = FakeSink()
    streamer = make(sink)
    answer = "x" * 5000
    streamer.feed(answer)
    assert await streamer.finish()
    assert sink.contents == ["x" * 2000, "x" * 2000, "x" * 1000]


async def test_marker_never_pushes_a_message_over_the_limit() -> None:
    sink = FakeSink(limit=100)
    streamer = make(sink)
    await streamer.start("Thinking…")
    streamer.feed("y" * 99)
    await asyncio.sleep(INTERVAL * 2)
    assert sink.contents == ["y" * (100 - len(MARKER)) + MARKER]
    streamer.feed("z")
    assert await streamer.finish()
    # Exactly at the limit: still one message.
    assert sink.contents == ["y" * 99 + "z"]


async def test_suffix_that_overflows_moves_to_a_new_message() -> None:
    sink = FakeSink(limit=100)
    streamer = make(sink)
    answer = ("abc " * 25)[:98]
    streamer.feed(answer)
    assert await streamer.finish("\n-# note")
    assert "".join(sink.contents) == answer + "\n-# note"
    assert len(sink.contents) == 2


async def test_trailing_whitespace_never_makes_a_blank_message() -> None:
    sink = FakeSink(limit=20)
    streamer = make(sink)
    answer = "aaaa bbbb cccc dddd" + "   \n\n  "
    await stream(streamer, answer, piece=3)
    assert await streamer.finish()
    assert "".join(sink.contents) == answer
    assert all(content.strip() for content in sink.contents)


# --- where the splits fall ------------------------------------------------------------------------


def check(parts: list[str], text: str, limit: int) -> None:
    assert "".join(parts) == text
    assert all(0 < len(part) <= limit for part in parts)


def test_split_prefers_a_line_break() -> None:
    text = "a" * 1900 + "\n" + "b" * 50 + " " + "c" * 200
    parts = split_message(text, 2000)
    check(parts, text, 2000)
    assert parts[0] == "a" * 1900 + "\n"


def test_split_falls_back_to_a_space() -> None:
    text = "a" * 1900 + " " + "b" * 300
    parts = split_message(text, 2000)
    check(parts, text, 2000)
    assert parts[0] == "a" * 1900 + " "


def test_split_ignores_a_line_break_far_back() -> None:
    # A break 1500 characters back would waste most of a message: cut at the nearer space.
    text = "a" * 500 + "\n" + "b" * 1400 + " " + "c" * 300
    parts = split_message(text, 2000)
    check(parts, text, 2000)
    assert parts[0].endswith("b ")


def test_split_without_whitespace_is_a_hard_cut() -> None:
    text = "z" * 4500
    assert split_message(text, 2000) == ["z" * 2000, "z" * 2000, "z" * 500]


def test_split_keeps_combined_characters_whole() -> None:
    family = "👨\u200d👩\u200d👧"  # one emoji made of three joined by zero-width joiners
    for text in ("q" * 1999 + "e\u0301" + "r" * 10, "q" * 1998 + family + "r" * 10, "q" * 1999 + "👍🏽" + "r"):
        parts = split_message(text, 2000)
        check(parts, text, 2000)
        first, second = parts[0], parts[1]
        assert not first.endswith("\u200d")
        assert second[0] not in ("\u0301", "\u200d", "🏽")


def test_split_keeps_flags_whole() -> None:
    flags = "🇫🇷🇩🇪🇯🇵" * 10
    for offset in range(1, 4):
        text = "w" * (2000 - offset) + flags
        parts = split_message(text, 2000)
        check(parts, text, 2000)
        # Each part holds whole flags: an even number of regional indicators.
        assert all(sum(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in part) % 2 == 0 for part in parts)


def test_split_avoids_cutting_a_code_block() -> None:
    prose = ("Here is how it works. " * 60)[:1300] + "\n"
    code = "```python\n" + "print('hello world')\n" * 40 + "```\n"
    text = prose + code + "That is all."
    parts = split_message(text, 2000)
    check(parts, text, 2000)
    assert parts[1].startswith("```python")


def test_split_never_creates_blank_parts() -> None:
    text = "aaaa bbbb cccc dddd" + "   \n\n  "
    parts = split_message(text, 20)
    check(parts, text, 20)
    assert all(part.strip() for part in parts)


@pytest.mark.parametrize("seed", range(20))
def test_split_is_lossless_on_random_text(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = ["a", "b", " ", "\n", "```", "é", "e\u0301", "🇫🇷", "👍🏽", "\u200d", "\r\n", "  "]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6000)))
    limit = rng.choice([50, 300, 2000])
    check(split_message(text, limit), text, limit)


async def test_streamed_splits_match_the_offline_split() -> None:
    rng = random.Random(5)
    alphabet = ["word ", "longerword ", "\n", "```", "🇫🇷", "\n\n", "x"]
    answer = "".join(rng.choice(alphabet) for _ in range(400))
    sink = FakeSink(limit=300)
    streamer = make(sink, edit_interval=0.01)
    await stream(streamer, answer, piece=5, pause=0.001)
    assert await streamer.finish()
    assert sink.contents == split_message(answer, 300)
