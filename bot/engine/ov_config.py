"""OpenVINO properties given as ``KEY=VALUE`` words on a command line (``--ov-config``), checked once for all.

The bot's configuration file gives them as a TOML table instead; the command line of ``chat``, ``serve`` and the
benchmark pass them here. A pair that can't be meant as given is refused with a sentence rather than dropped:
a silently ignored ``CACHE_DIR`` or ``INFERENCE_PRECISION_HINT`` changes what is measured or served.
"""

from __future__ import annotations

from collections.abc import Iterable

NOT_A_PAIR = "expected KEY=VALUE, got {pair!r}"
EMPTY_KEY = "the key is empty in {pair!r}"
SPACE_IN_KEY = "a key has no spaces, got {key!r}"
GIVEN_TWICE = "{key} is given twice ({first!r}, then {second!r}); give it once"


class BadPair(ValueError):
    """A ``KEY=VALUE`` word that can't be used; ``str()`` says which and why."""


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` as ``{"A": "1", "B": "x=y"}``: split at the first ``=``, spaces around trimmed.

    The value may be empty (``CACHE_DIR=`` turns OpenVINO's model cache off) and may contain ``=``; a word
    without ``=``, an empty key, a key with spaces and a key given twice raise :class:`BadPair`.
    """
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise BadPair(NOT_A_PAIR.format(pair=pair))
        if not key:
            raise BadPair(EMPTY_KEY.format(pair=pair))
        if any(c.isspace() for c in key):
            raise BadPair(SPACE_IN_KEY.format(key=key))
        if key in parsed:
            raise BadPair(GIVEN_TWICE.format(key=key, first=parsed[key], second=value))
        parsed[key] = value
    return parsed
