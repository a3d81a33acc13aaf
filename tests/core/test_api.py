from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnpu import api


@given(
    device=st.from_regex(r"[a-z0-9][a-z0-9-]{0,40}", fullmatch=True),
    index=st.integers(min_value=0, max_value=10**6),
)
def test_slice_id_round_trips(device: str, index: int) -> None:
    assert api.parse_slice_id(api.slice_id(device, index)) == (device, index)


def test_slice_id_length_is_bounded() -> None:
    with pytest.raises(ValueError, match="longer than 63"):
        api.slice_id("d" * 60, 1234)


@pytest.mark.parametrize("bad", ["npu0", "npu0-s", "npu0-sx", "-s1x"])
def test_parse_slice_id_rejects_foreign_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a vnpu slice id"):
        api.parse_slice_id(bad)


@given(mib=st.integers(min_value=0, max_value=10**7), slice_mib=st.integers(min_value=1, max_value=65536))
def test_slices_cover_demand_tightly(mib: int, slice_mib: int) -> None:
    n = api.slices_for_mib(mib, slice_mib)
    assert n * slice_mib >= mib
    assert (n - 1) * slice_mib < mib or n == 0


def test_slices_for_mib_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        api.slices_for_mib(-1)
    with pytest.raises(ValueError):
        api.slices_for_mib(1, 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("9" * api.MAX_COUNT_DIGITS, 10**api.MAX_COUNT_DIGITS - 1),
        ("9" * (api.MAX_COUNT_DIGITS + 1), None),  # a rate from 400 digits overflows a float
        ("9" * 5000, None),  # int() refuses more than 4,300 digits
        ("²", None),  # str.isdigit() says yes, int() says no
        ("١٢", None),  # Arabic-Indic digits: int() takes them, a counter is ASCII
        ("-1", None),
        (" 1", None),
        ("1_000", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_parse_count_reads_only_plain_counters(value: object, expected: int | None) -> None:
    assert api.parse_count(value) == expected


@given(st.text(max_size=40) | st.integers().map(str))
def test_parse_count_never_raises_and_stays_in_range(value: str) -> None:
    n = api.parse_count(value)
    assert n is None or 0 <= n < 10**api.MAX_COUNT_DIGITS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-01T10:00:00Z", "2026-12-01T10:00:00Z"),
        ("2026-12-01T11:00:00+01:00", "2026-12-01T10:00:00Z"),
        ("2026-12-01T10:00:00", "2026-12-01T10:00:00Z"),  # no zone: UTC
        ("9999-12-31T23:59:59-23:59", None),  # the year 10000 in UTC: could never be formatted again
        ("0001-01-01T00:00:00+23:59", None),  # the year 0 in UTC
        ("yesterday", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_time_gives_utc_or_none(value: object, expected: str | None) -> None:
    parsed = api.parse_time(value)
    assert (None if parsed is None else api.format_time(parsed)) == expected


@given(st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()) | st.text(max_size=40))
def test_a_parsed_time_can_always_be_formatted_and_compared(value: str) -> None:
    import datetime as dt

    parsed = api.parse_time(value)
    if parsed is not None:
        assert parsed.tzinfo == dt.UTC
        api.format_time(max(parsed, dt.datetime.now(dt.UTC)))
