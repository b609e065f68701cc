"""The per-person rate limit, with a clock the tests move by hand."""

from __future__ import annotations

import re

import pytest

from bot.chat.ratelimit import RateLimit, RateLimiter, Refusal, describe_seconds, parse_rate_limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/10m", RateLimit(10, 600.0)),
        ("3/30s", RateLimit(3, 30.0)),
        ("100/1d", RateLimit(100, 86400.0)),
        ("5/h", RateLimit(5, 3600.0)),
        (" 2 / 1.5h ", RateLimit(2, 5400.0)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_rate_limits_are_read(text: str, expected: RateLimit | None) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["", "10", "10/10", "10/10x", "ten/10m", "0/10m", "10/0m", "-1/10m", "10 per 10m"])
def test_bad_rate_limits_say_how_to_write_them(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape('e.g. "10/10m"')):
        parse_rate_limit(text)


def test_the_limit_is_described_in_words() -> None:
    assert RateLimit(10, 600).describe() == "10 questions per 10 minutes"
    assert RateLimit(1, 86400).describe() == "1 question per day"
    assert describe_seconds(90) == "90 seconds"
    assert describe_seconds(7200) == "2 hours"


def test_the_question_over_the_limit_waits_for_the_oldest_to_leave_the_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(3, 600), clock)
    for minute in (0, 1, 2):
        clock.now = 1000 + minute * 60
        assert limiter.check(7) is None

    clock.now = 1000 + 5 * 60
    assert limiter.check(7) == Refusal(retry_after=300.0, already_told=False)
    clock.now = 1000 + 9 * 60
    assert limiter.check(7) == Refusal(retry_after=60.0, already_told=True), "told once per wait"

    clock.now = 1000 + 10 * 60
    assert limiter.check(7) is None, "the first question has left the window"
    refusal = limiter.check(7)
    assert refusal == Refusal(retry_after=60.0, already_told=False), "a new wait is told again"


def test_people_are_limited_separately() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(1, 60), clock)

    assert limiter.check(1) is None
    assert limiter.check(2) is None
    assert limiter.check(1) is not None
    assert limiter.check(2) is not None


def test_refused_questions_do_not_count() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(2, 60), clock)
    limiter.check(1)
    limiter.check(1)
    for second in range(1, 60):
        clock.now = 1000 + second
        assert limiter.check(1) is not None

    clock.now = 1060
    assert limiter.check(1) is None
    assert limiter.check(1) is None


def test_quiet_people_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(1, 60), clock)
    for person in range(1000):
        limiter.check(person)
    clock.now += 61

    for _ in range(256):
        limiter.check(5000)

    assert len(limiter._asked) == 1
