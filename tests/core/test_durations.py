"""The one duration syntax: what parses, what is refused, and how durations are printed."""

from __future__ import annotations

import datetime as dt

import pytest

from core.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2", 2.0),
        ("2.5", 2.5),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("30m", 1800.0),
        ("1h30m", 5400.0),
        ("48h", 172800.0),
        ("1.5h", 5400.0),
        ("30d", 2592000.0),
        (" 5s ", 5.0),
    ],
)
def test_a_duration_parses_with_or_without_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5s", "5x", "h", "1h 30m", "5s5", "1e3", "fast"])
def test_a_duration_that_is_not_one_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(DurationError) as caught:
        parse_duration(text)
    assert "\n" not in str(caught.value)


def test_an_absurdly_long_duration_is_refused_in_hours() -> None:
    with pytest.raises(DurationError, match=r"longer than 878400h"):
        parse_duration("36601d")


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (dt.timedelta(days=2), "48h"),
        (dt.timedelta(hours=1, minutes=30), "1h30m"),
        (dt.timedelta(seconds=90), "1m30s"),
        (dt.timedelta(milliseconds=500), "500ms"),
        (dt.timedelta(seconds=1.5), "1.5s"),
        (dt.timedelta(hours=24, seconds=1), "24h1s"),
        (dt.timedelta(0), "0s"),
        (dt.timedelta(minutes=-5), "-5m"),
    ],
)
def test_a_duration_is_printed_in_hours_minutes_and_seconds_never_in_days(
    delta: dt.timedelta, text: str
) -> None:
    assert format_duration(delta) == text


@pytest.mark.parametrize("text", ["48h", "1h30m", "500ms", "1m30s", "1.5s", "24h1s"])
def test_a_printed_duration_parses_back_to_itself(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
