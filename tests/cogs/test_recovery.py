"""What a start does to a message that a crash left looking unfinished."""

from __future__ import annotations

import pytest

from bot.cogs.recovery import CUT_OFF, closed_content


@pytest.mark.parametrize(
    ("content", "last", "closed"),
    [
        ("A cat sits on a ▌", True, f"A cat sits on a\n\n⚠️ {CUT_OFF}"),
        ("A cat sits on a ▌", False, f"A cat sits on a\n\n⚠️ {CUT_OFF}"),
        ("⏳ Thinking…", True, CUT_OFF),
        ("⏳ Waiting in line: position 3.", True, CUT_OFF),
        ("A cat sits on a mat.", True, None),  # its final edit got through before the crash
        ("A cat sits on a mat.\n\n⚠️ Something went wrong while answering.", True, None),
        ("⏳ Thinking… is what I wrote", False, None),
    ],
)
def test_only_messages_still_looking_unfinished_are_changed(content: str, last: bool, closed: str | None) -> None:
    assert closed_content(content, last=last) == closed
