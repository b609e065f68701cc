"""Answers about a spoilered image: the answer itself stays hidden behind Discord's spoiler tags.

Every message of the reply shows its share of the answer as ``||…||``, while it streams and when it is
done. Status lines ("Thinking…"), a failure sentence with no answer before it, and notes after the
answer stay outside the tags: they reveal nothing about the picture.
"""

from __future__ import annotations

from typing import TypeVar

from bot.chat.streaming import MessageSink, ReplyStreamer

H = TypeVar("H")

SPOILER = "||"
# A "||" in the answer would end the spoiler early and show the rest. A look-alike of the same length
# keeps every message within Discord's limit, which an escape ("\|") would not.
_BAR = "|"
_BAR_LOOKALIKE = "\u01c0"


def spoiler(text: str) -> str:
    """``text`` inside spoiler tags, with bars that would close them replaced; "" stays ""."""
    if not text:
        return ""
    return f"{SPOILER}{text.replace(_BAR, _BAR_LOOKALIKE)}{SPOILER}"


class SpoilerStreamer(ReplyStreamer[H]):
    """A :class:`ReplyStreamer` whose messages show the answer inside spoiler tags.

    The tags take four characters of every message, so the answer is split at ``limit - 4`` and no
    message exceeds ``limit``. The split, the marker and the retries are the base class's.
    """

    def __init__(self, sink: MessageSink[H], *, limit: int = 2000, **options: object) -> None:
        super().__init__(sink, limit=limit - 2 * len(SPOILER), **options)  # type: ignore[arg-type]

    def _layout(self, *, final: bool) -> list[str]:
        wanted = super()._layout(final=final)
        answer = self.text
        if not answer.strip() and not self._parts:
            return wanted  # the placeholder, or a sentence alone: nothing to hide
        shown: list[str] = []
        start = 0
        for index, content in enumerate(wanted):
            # While streaming, the message after the finished ones ends with the "still writing" marker.
            streaming = not final and index >= len(self._parts)
            body = content[: len(content) - len(self._marker)] if streaming else content
            # Both the answer and what follows it (a note, a failure line) are slices of the same text.
            hidden = max(0, min(len(body), len(answer) - start))
            shown.append(spoiler(body[:hidden]) + body[hidden:] + (self._marker if streaming else ""))
            start += len(body)
        return shown
