"""Splitting an answer into Discord messages of at most ``limit`` characters (2000 for Discord).

``"".join(parts)`` equals the answer exactly. A split, once made, never moves: it depends only on text
already received, so the reply streamer can finalise a message while the answer still grows and never
touch it again.
"""

from __future__ import annotations

import re
import unicodedata

# A split looks this far back from the limit for a line break, then for a space; beyond that a
# hard cut is better than a message much shorter than the limit.
SPLIT_LOOKBACK = 200
CODE_FENCE = "```"

_NON_SPACE = re.compile(r"\S")
_ZWJ = "\u200d"


def split_message(text: str, limit: int = 2000) -> list[str]:
    """Split a complete text into parts of at most ``limit`` characters; ``"".join(parts) == text``.

    This is exactly how :class:`bot.chat.streaming.ReplyStreamer` lays out a finished answer.
    """
    parts: list[str] = []
    start = 0
    while len(text) - start > limit:
        cut = find_cut(text, start, limit, final=True)
        assert cut is not None
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def find_cut(text: str, start: int, limit: int, *, final: bool) -> int | None:
    """Where the message starting at ``text[start]`` should end, given ``len(text) - start > limit``.

    Prefers a line break, then a space, in the last :data:`SPLIT_LOOKBACK` characters; moves the cut
    before an opening code fence when that does not leave a short message; never separates a
    character from the marks and joiners that belong to it. While streaming (``final=False``) it
    returns None when only whitespace would follow the cut, since no visible message can be made
    of that yet; for a complete text it moves the last word across instead.
    """
    end = start + limit
    cut = _boundary_cut(text, start, end)
    cut = _outside_code_block(text, start, end, cut)
    cut = _settle(text, start, cut)
    if _NON_SPACE.search(text, cut):
        return cut
    if not final:
        return None
    last_visible = start + len(text[start:end].rstrip())
    word_start = last_visible - 1
    while word_start > start and not text[word_start - 1].isspace():
        word_start -= 1
    return _settle(text, start, word_start) if word_start > start else cut


def _boundary_cut(text: str, start: int, end: int) -> int:
    low = max(start + 1, end - SPLIT_LOOKBACK)
    for separator in ("\n", " "):
        found = text.rfind(separator, low, end)
        if found != -1:
            return found + 1
    return end


def _outside_code_block(text: str, start: int, end: int, cut: int) -> int:
    if text.count(CODE_FENCE, 0, cut) % 2 == 0:
        return cut
    opening = text.rfind(CODE_FENCE, start, cut)
    # A block that began in an earlier message, or one that starts early in this message, has to be
    # split anyway; only move the cut when the message keeps at least half its length.
    if opening == -1 or opening - start < (end - start) // 2:
        return cut
    return opening


def _settle(text: str, start: int, cut: int) -> int:
    while cut > start + 1 and _inseparable(text, cut):
        cut -= 1
    return cut


def _inseparable(text: str, index: int) -> bool:
    """Whether ``text[index - 1]`` and ``text[index]`` belong to the same visible character."""
    before, after = text[index - 1], text[index]
    if (before, after) == ("\r", "\n") or _ZWJ in (before, after):
        return True
    if unicodedata.category(after) in ("Mn", "Mc", "Me"):  # accents, variation selectors
        return True
    code = ord(after)
    if 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F:  # skin tones, flag tags
        return True
    if _regional_indicator(before) and _regional_indicator(after):
        # Flags are pairs of regional indicators: inside a run, an odd count before means mid-flag.
        run = 0
        while index - run - 1 >= 0 and _regional_indicator(text[index - run - 1]):
            run += 1
        return run % 2 == 1
    return False


def _regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF
