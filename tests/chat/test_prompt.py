"""Fitting a channel's history into the model's context window."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from PIL import Image

from bot.chat.prompt import HistoryTurn, build_prompt
from bot.engine.base import ContextTooLong, Turn

IMAGE_TOKENS = 50
PICTURE = Image.new("RGB", (4, 4), (10, 20, 30))


def count(conversation: Sequence[Turn]) -> int:
    """A stand-in tokenizer: one token per word, a fixed number per image, two per turn for the template."""
    return sum(len(turn.text.split()) + IMAGE_TOKENS * len(turn.images) + 2 for turn in conversation)


def load(sha256: str) -> Image.Image:
    assert sha256 == "cat", f"only the cat picture exists, asked for {sha256}"
    return PICTURE


def history(*turns: tuple[str, str, str | None]) -> list[HistoryTurn]:
    return [HistoryTurn(role, text, image) for role, text, image in turns]


def test_everything_is_kept_when_it_fits() -> None:
    turns = history(("user", "what is this", "cat"), ("assistant", "a cat", None), ("user", "what colour", None))
    prompt = build_prompt(turns, load, count, context_window=1000, reserve=100)
    assert prompt.dropped == 0
    assert [t.text for t in prompt.conversation] == ["what is this", "a cat", "what colour"]
    assert prompt.conversation[0].images == (PICTURE,)
    assert prompt.image_sha256 == "cat"
    assert prompt.tokens == count(prompt.conversation)


def test_the_oldest_turns_go_first_and_the_image_turn_stays() -> None:
    long = " ".join(["word"] * 40)
    turns = history(
        ("user", "what is this", "cat"),
        ("assistant", long, None),
        ("user", "and this " + long, None),
        ("assistant", "short answer", None),
        ("user", "last question", None),
    )
    prompt = build_prompt(turns, load, count, context_window=130, reserve=20)
    texts = [t.text for t in prompt.conversation]
    assert texts[0] == "what is this", "the turn carrying the image is never dropped"
    assert texts[-1] == "last question", "the new question is never dropped"
    assert long not in texts
    assert prompt.dropped == len(turns) - len(texts)
    assert prompt.tokens <= 130 - 20


def test_a_trimmed_conversation_never_opens_with_the_assistant() -> None:
    turns = history(
        ("user", " ".join(["old"] * 30), None),
        ("assistant", " ".join(["reply"] * 30), None),
        ("user", "new question", None),
    )
    prompt = build_prompt(turns, load, count, context_window=40, reserve=10)
    assert [t.role for t in prompt.conversation] == ["user"]
    assert prompt.conversation[0].text == "new question"
    assert prompt.dropped == 2


def test_only_the_latest_image_is_shown() -> None:
    turns = history(("user", "first", "dog"), ("assistant", "a dog", None), ("user", "now this", "cat"))
    prompt = build_prompt(turns, load, count, context_window=1000, reserve=10)
    assert [len(t.images) for t in prompt.conversation] == [0, 0, 1]
    assert prompt.image_sha256 == "cat"


def test_a_question_too_long_for_the_window_is_refused_with_the_window_named() -> None:
    turns = history(("user", " ".join(["word"] * 100), None))
    with pytest.raises(ContextTooLong, match="context window \\(64 tokens, 16 kept for the answer\\)"):
        build_prompt(turns, load, count, context_window=64, reserve=16)


def test_history_must_end_with_the_new_question() -> None:
    with pytest.raises(ValueError, match="must end with the user's new turn"):
        build_prompt(history(("assistant", "hello", None)), load, count, context_window=100, reserve=10)
