"""Answers about a spoilered image: hidden in every message, streaming included, within the length limit."""

from __future__ import annotations

import random
import re

from bot.chat.spoilers import SpoilerStreamer, spoiler
from bot.chat.streaming import FAILURE_LINE
from tests.chat.test_streaming import INTERVAL, MARKER, FakeSink, stream

LOOKALIKE = "\u01c0"
HIDDEN = re.compile(r"\|\|([^|]+)\|\|")


def make(sink: FakeSink) -> SpoilerStreamer[int]:
    return SpoilerStreamer(sink, limit=sink.limit, edit_interval=INTERVAL, retry_delay=0.01)


def words(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = ["red", "ball", "on", "the", "grass", "a | b", "||", "sky\n", "blue."]
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def revealed(content: str) -> tuple[str, str]:
    """(the hidden text, what is left outside the tags) of one message."""
    hidden = "".join(HIDDEN.findall(content))
    return hidden, HIDDEN.sub("", content)


async def test_every_message_hides_the_answer_while_streaming_and_at_the_end() -> None:
    sink = FakeSink(limit=120)
    streamer = make(sink)
    answer = words(200)
    await streamer.start("⏳ Thinking…")
    await stream(streamer, answer, piece=5)
    assert await streamer.finish()

    assert sink.calls[0].content == "⏳ Thinking…", "the status line is not hidden"
    for call in sink.calls[1:]:
        # FakeSink already refuses anything over the limit; here: nothing of the answer is outside the tags.
        hidden, outside = revealed(call.content)
        assert hidden and outside.strip() in ("", MARKER.strip()), call.content
    assert len(sink.contents) > 5, "a long answer continues in more messages"
    assert all(len(content) <= 120 for content in sink.contents)
    assert "".join(revealed(c)[0] for c in sink.contents) == answer.replace("|", LOOKALIKE)
    assert streamer.text == answer, "the stored answer keeps the model's own text"


async def test_notes_after_the_answer_stay_outside_the_tags() -> None:
    sink = FakeSink(limit=60)
    streamer = make(sink)
    answer = words(30, seed=1)
    note = "\n-# I looked only at a.png; not used: b.png."
    await streamer.start("⏳ Thinking…")
    await stream(streamer, answer)
    assert await streamer.finish(note)
    assert "".join(revealed(c)[0] for c in sink.contents) == answer.replace("|", LOOKALIKE)
    assert "".join(revealed(c)[1] for c in sink.contents) == note
    assert all(len(content) <= 60 for content in sink.contents)


async def test_a_failure_sentence_alone_is_not_hidden() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Thinking…")
    assert await streamer.fail("The model failed while answering.")
    assert sink.contents == ["The model failed while answering."]


async def test_a_failure_after_part_of_the_answer_hides_only_the_answer() -> None:
    sink = FakeSink()
    streamer = make(sink)
    await streamer.start("⏳ Thinking…")
    streamer.feed("It is a red")
    assert await streamer.fail("The model failed while answering.")
    assert sink.contents == ["||It is a red||" + FAILURE_LINE.format(sentence="The model failed while answering.")]


def test_spoiler_tags() -> None:
    assert spoiler("") == ""
    assert spoiler("a||b|c") == f"||a{LOOKALIKE * 2}b{LOOKALIKE}c||"
