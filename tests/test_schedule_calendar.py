"""The scheduler's time rules (engine/schedule/calendar.py), with fixed clocks and fixed time zones:
slots, the one catch-up after downtime, and windows (spanning midnight, DST days)."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.schedule import calendar as cal
from engine.schedule.calendar import Window

UTC = dt.UTC


@pytest.fixture
def tz():
    """Run in a given local time zone (TZ + tzset), restored afterwards."""
    old = os.environ.get("TZ")

    def use(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()
    yield use
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_slots_are_start_plus_multiples_of_every(tz):
    tz("UTC")
    start = dt.datetime(2026, 3, 15, 21, 53)
    assert cal.next_slot(start, 3600, t("2026-03-15T20:00:00")) == t("2026-03-15T21:53:00")
    assert cal.next_slot(start, 3600, t("2026-03-15T21:53:00")) == t("2026-03-15T22:53:00")
    assert cal.slot_at_or_before(start, 3600, t("2026-03-16T01:00:00")) == t("2026-03-16T00:53:00")
    assert cal.slot_at_or_before(start, 3600, t("2026-03-15T21:52:59")) is None
    assert cal.next_slots(start, 86400, t("2026-03-20T12:00:00"), 3) == [
        t("2026-03-20T21:53:00"), t("2026-03-21T21:53:00"), t("2026-03-22T21:53:00")]


def test_start_is_local_time(tz):
    tz("Europe/Berlin")  # UTC+1 in March before the change
    start = dt.datetime(2026, 3, 15, 21, 53)
    assert cal.next_slot(start, 86400, t("2026-03-15T00:00:00")) == t("2026-03-15T20:53:00")


def test_a_dst_change_neither_doubles_nor_skips_a_slot(tz):
    tz("Europe/Berlin")  # 2026-03-29 02:00 -> 03:00; 2026-10-25 03:00 -> 02:00
    start = dt.datetime(2026, 3, 28, 0, 30)
    for day_start in (t("2026-03-28T00:00:00"), t("2026-10-24T00:00:00")):
        slots = [s for s in cal.next_slots(start, 1800, day_start, 200) if s < day_start + dt.timedelta(days=3)]
        gaps = {(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)}
        assert gaps == {1800.0}


def test_due_catches_up_once_however_many_slots_were_missed(tz):
    tz("UTC")
    start = dt.datetime(2026, 1, 1)
    last = t("2026-01-01T10:00:00")
    now = t("2026-01-01T17:30:00")  # 7 slots of 1h missed
    assert cal.due(start, 3600, last, now) == t("2026-01-01T17:00:00")
    assert cal.due(start, 3600, t("2026-01-01T17:00:00"), now) is None  # that one ran: nothing more
    assert cal.due(start, 3600, None, now) == t("2026-01-01T17:00:00")
    assert cal.due(start, 3600, None, t("2025-12-31T23:00:00")) is None  # before the first slot


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10 * 86400), st.integers(0, 400 * 86400), st.integers(-86400, 86400))
def test_next_slot_is_the_first_after_now(every, offset, shift):
    start = dt.datetime(2026, 1, 1, tzinfo=UTC)
    now = start + dt.timedelta(seconds=offset + shift)
    n = cal.next_slot(start, every, now)
    assert n > now
    assert n - dt.timedelta(seconds=every) <= now or n == start
    assert ((n - start).total_seconds()) % every == 0
    s = cal.slot_at_or_before(start, every, now)
    assert (s is None) == (now < start)
    if s is not None:
        assert s <= now < s + dt.timedelta(seconds=every)


def test_window_parse_and_refusals():
    assert str(Window.parse("20:00-06:00")) == "20:00-06:00"
    assert Window.parse("8:00-24:00") == Window(8 * 3600, 0)
    assert str(Window.parse("20:00:30-20:01")) == "20:00:30-20:01"
    for bad in ("20-06", "25:00-06:00", "20:60-06:00", "10:00-10:00", "24:30-01:00", "", "20:00"):
        with pytest.raises(ValueError, match="invalid window"):
            Window.parse(bad)


def test_window_spanning_midnight(tz):
    tz("UTC")
    w = Window.parse("20:00-06:00")
    assert w.is_open(t("2026-05-01T23:00:00")) and w.is_open(t("2026-05-02T05:59:59"))
    assert w.is_open(t("2026-05-01T20:00:00"))
    assert not w.is_open(t("2026-05-01T06:00:00")) and not w.is_open(t("2026-05-01T12:00:00"))
    assert w.next_open(t("2026-05-01T12:00:00")) == t("2026-05-01T20:00:00")
    assert w.next_open(t("2026-05-01T21:00:00")) == t("2026-05-01T21:00:00")  # open: now
    assert w.closes_at(t("2026-05-01T21:00:00")) == t("2026-05-02T06:00:00")
    assert w.closes_at(t("2026-05-02T01:00:00")) == t("2026-05-02T06:00:00")


def test_window_is_local_wall_clock(tz):
    tz("America/New_York")  # UTC-4 in May
    w = Window.parse("20:00-06:00")
    assert w.is_open(t("2026-05-02T01:00:00"))       # 21:00 local
    assert not w.is_open(t("2026-05-01T23:00:00"))   # 19:00 local
    assert w.next_open(t("2026-05-01T23:00:00")) == t("2026-05-02T00:00:00")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 86399), st.integers(0, 86399), st.integers(0, 3 * 86400))
def test_window_next_open_and_close_agree_with_is_open(o, c, offset):
    if o == c:
        return
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        w = Window(o, c)
        now = t("2026-06-01T00:00:00") + dt.timedelta(seconds=offset)
        nxt = w.next_open(now)
        assert w.is_open(nxt)
        if nxt > now:  # closed until then: no opening in between (checked every minute)
            probe = now
            while probe < nxt - dt.timedelta(seconds=1):
                assert not w.is_open(probe)
                probe += dt.timedelta(seconds=max(1, (nxt - now).total_seconds() // 50))
        else:
            end = w.closes_at(now)
            assert end > now and not w.is_open(end)
            assert w.is_open(end - dt.timedelta(seconds=1))
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
