"""Token ids to streamed text, for engines that receive ids rather than text (the batching worker sends ids)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


class IncrementalText:
    """Turns a growing list of token ids into text pieces that concatenate to exactly the final text.

    The text is decoded from all ids each time, so a character spread over several tokens comes out whole.
    Until :meth:`finish`, an incomplete character (decoded as U+FFFD) and trailing whitespace (which the next
    token may merge or clean up) are held back, so every piece only ever extends what was sent.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: Sequence[int]) -> str:
        """Take new tokens; return the text they settle (possibly empty)."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._advance(text.rstrip("\ufffd").rstrip())

    def finish(self) -> str:
        """The rest of the text, now that no token follows."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        if not text.startswith(self.sent):
            # Not seen with LLaVA's tokenizers; the stream keeps what it has rather than contradict itself.
            log.warning("Decoded text changed before the end of the answer; some text may be missing")
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
