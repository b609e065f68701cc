"""Build the model's conversation from a channel's stored history, within the context window."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.engine.base import ContextTooLong, ImageRef, Turn

log = logging.getLogger(__name__)

TOO_LONG = "Your question is too long for the model's context window ({window} tokens, {reserve} kept for the answer)."


@dataclass(frozen=True)
class HistoryTurn:
    """What the prompt builder needs of a stored turn."""

    role: str
    text: str
    image_sha256: str | None = None


@dataclass(frozen=True)
class BuiltPrompt:
    conversation: list[Turn]
    dropped: int  # older turns left out to fit the context window
    image_sha256: str | None  # the image being discussed, if any
    tokens: int


def build_prompt(
    history: Sequence[HistoryTurn],
    load_image: Callable[[str], ImageRef],
    count_tokens: Callable[[Sequence[Turn]], int],
    context_window: int,
    reserve: int,
) -> BuiltPrompt:
    """Turn history (oldest first, ending with the new user turn) into a conversation that fits.

    Only the most recent image is shown to the model: it is "the image being discussed", and LLaVA
    models answer about one image at a time. Oldest turns are dropped first; the turn that carries
    the image and the new question are never dropped. Questions that never got an answer are left out
    (see :func:`answered_turns`).
    """
    if not history or history[-1].role != "user":
        raise ValueError("history must end with the user's new turn")
    history = answered_turns(history)
    image_index = next((i for i in range(len(history) - 1, -1, -1) if history[i].image_sha256), None)
    image_sha = history[image_index].image_sha256 if image_index is not None else None
    image = load_image(image_sha) if image_sha else None

    def to_turns(indices: list[int]) -> list[Turn]:
        turns = []
        for i in indices:
            item = history[i]
            images = (image,) if i == image_index and image is not None else ()
            turns.append(Turn("assistant" if item.role == "assistant" else "user", item.text, images))
        return turns

    budget = context_window - reserve
    kept = list(range(len(history)))
    protected = {len(history) - 1} | ({image_index} if image_index is not None else set())
    while True:
        conversation = to_turns(kept)
        tokens = count_tokens(conversation)
        if tokens <= budget:
            break
        droppable = [i for i in kept if i not in protected]
        if not droppable:
            raise ContextTooLong(TOO_LONG.format(window=context_window, reserve=reserve))
        kept.remove(droppable[0])
        # A conversation that opens with the assistant's answer confuses chat templates.
        while kept and history[kept[0]].role == "assistant" and kept[0] not in protected:
            kept.pop(0)
    dropped = len(history) - len(kept)
    if dropped:
        log.debug("Dropped %d old turns to fit %d tokens", dropped, budget)
    return BuiltPrompt(conversation, dropped, image_sha, tokens)


def answered_turns(history: Sequence[HistoryTurn]) -> list[HistoryTurn]:
    """The history without questions that never got an answer, so that no two user turns follow each other.

    A question stays unanswered when its answer failed or the bot stopped (a restart, a crash) before it was
    stored. Two questions in a row would have the model answer the old one too; left out, it still lends its
    picture to the next question, which is what a follow-up ("and what colour is it?") is about.
    """
    kept: list[HistoryTurn] = []
    carried: str | None = None
    for index, turn in enumerate(history):
        if turn.role == "user" and index + 1 < len(history) and history[index + 1].role == "user":
            carried = turn.image_sha256 or carried
            continue
        inherits = carried is not None and turn.role == "user" and turn.image_sha256 is None
        kept.append(HistoryTurn(turn.role, turn.text, carried) if inherits else turn)
        carried = None
    return kept
