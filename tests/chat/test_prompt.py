"""Fitting a channel's history into the model's context window, with no question left hanging without its answer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from PIL import Image

from bot.chat.prompt import HistoryTurn, answered_turns, build_prompt
from bot.engine.base import ContextTooLong, ImageRef, Turn

IMAGE_TOKENS = 50
PICTURE = ImageRef.from_image(Image.new("RGB", (4, 4), (10, 20, 30)))


def count(conversation: Sequence[Turn]) -> int:
    """A stand-in tokenizer: one token per word, a fixed number per image, two per turn for the template."""
    return sum(len(turn.text.split()) + IMAGE_TOKENS * len(turn.images) + 2 for turn in conversation)


def load(sha256: str) -> ImageRef:
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


# --- questions that never got an answer ---------------------------------------------------------
PICTURES = {
    sha: ImageRef.from_image(Image.new("RGB", (8, 8), colour)) for sha, colour in (("cat", "red"), ("dog", "blue"))
}


def words(conversation: Sequence[Turn]) -> int:
    """A stand-in token count: one per word, and ten per image."""
    return sum(len(turn.text.split()) + 10 * len(turn.images) for turn in conversation)


def build(history: list[HistoryTurn], window: int = 1000) -> list[tuple[str, str, bool]]:
    prompt = build_prompt(history, PICTURES.__getitem__, words, window, reserve=0)
    return [(turn.role, turn.text, bool(turn.images)) for turn in prompt.conversation]


def test_a_question_whose_answer_failed_does_not_leave_two_questions_in_a_row() -> None:
    history = [
        HistoryTurn("user", "what is this?", "cat"),
        HistoryTurn("assistant", "a cat"),
        HistoryTurn("user", "how old is it?"),  # its answer failed
        HistoryTurn("user", "what is it sitting on?"),
    ]

    assert build(history) == [
        ("user", "what is this?", True),
        ("assistant", "a cat", False),
        ("user", "what is it sitting on?", False),
    ]


def test_the_picture_of_an_unanswered_question_stays_for_the_follow_up() -> None:
    history = [
        HistoryTurn("user", "what is this?", "dog"),
        HistoryTurn("assistant", "a dog"),
        HistoryTurn("user", "and this one?", "cat"),  # interrupted by a restart
        HistoryTurn("user", "describe it again, please"),  # asked again, without re-sending the picture
    ]

    prompt = build_prompt(history, PICTURES.__getitem__, words, 1000, reserve=0)

    assert [(turn.role, turn.text) for turn in prompt.conversation] == [
        ("user", "what is this?"),
        ("assistant", "a dog"),
        ("user", "describe it again, please"),
    ]
    assert prompt.image_sha256 == "cat"
    assert prompt.conversation[-1].images == (PICTURES["cat"],)
    assert all(not turn.images for turn in prompt.conversation[:-1])
    assert prompt.dropped == 0, "questions left out for lack of an answer are not 'older turns that did not fit'"


def test_a_new_picture_wins_over_the_one_of_an_unanswered_question() -> None:
    history = [
        HistoryTurn("user", "what is this?", "cat"),  # failed
        HistoryTurn("user", "and this?", "dog"),
    ]

    assert answered_turns(history) == [HistoryTurn("user", "and this?", "dog")]
    assert build(history) == [("user", "and this?", True)]


def test_several_unanswered_questions_in_a_row_leave_only_the_last() -> None:
    history = [
        HistoryTurn("user", "first", "cat"),
        HistoryTurn("user", "second"),
        HistoryTurn("user", "third"),
        HistoryTurn("assistant", "an answer to the third"),
        HistoryTurn("user", "fourth"),
    ]

    assert answered_turns(history) == [
        HistoryTurn("user", "third", "cat"),
        HistoryTurn("assistant", "an answer to the third"),
        HistoryTurn("user", "fourth"),
    ]


def test_answered_history_is_kept_as_it_is() -> None:
    history = [
        HistoryTurn("user", "what is this?", "cat"),
        HistoryTurn("assistant", "a cat"),
        HistoryTurn("user", "what colour?"),
    ]

    assert answered_turns(history) == history
    assert build(history) == [
        ("user", "what is this?", True),
        ("assistant", "a cat", False),
        ("user", "what colour?", False),
    ]
