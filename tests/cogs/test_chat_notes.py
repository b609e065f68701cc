"""The line naming the attachments the model did not look at stays one short line."""

from __future__ import annotations

from bot.cogs.chat import _not_used_note


def test_no_other_attachments_no_note() -> None:
    assert _not_used_note("photo.png", []) == ""


def test_many_long_names_stay_one_short_line() -> None:
    others = [f"{'holiday_picture_' * 6}{i}.jpg" for i in range(9)]
    note = _not_used_note("first.png", others)
    assert note.startswith("\n-# I looked only at first.png; not used: ")
    assert note.endswith(" and 6 more.")
    assert "\n" not in note[1:] and len(note) < 200
    # Names are shown as written: underscores don't turn into italics.
    assert "holiday\\_picture" in note
