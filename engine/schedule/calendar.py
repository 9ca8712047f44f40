"""When things happen (docs/SCHEDULE.md §2): run slots and replication windows. Pure functions of
their arguments and an explicit `now`, so the rules are unit-tested with fixed clocks."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

ANCHOR = _dt.datetime(2000, 1, 1)  # local midnight: slots of "1h" or "1d" land on the clock


def local(dt: _dt.datetime) -> _dt.datetime:
    """A naive datetime read as local time, made aware (so that arithmetic is in real seconds)."""
    return dt.astimezone() if dt.tzinfo is None else dt


def slot_at_or_before(start: _dt.datetime, every: int, now: _dt.datetime) -> _dt.datetime | None:
    """The latest slot start + k*every (k >= 0) not after now; None before the first."""
    t0, t = local(start).timestamp(), now.timestamp()
    if t < t0:
        return None
    k = int((t - t0) // every)
    return _dt.datetime.fromtimestamp(t0 + k * every, _dt.UTC)


def next_slot(start: _dt.datetime, every: int, now: _dt.datetime) -> _dt.datetime:
    """The first slot strictly after now."""
    t0, t = local(start).timestamp(), now.timestamp()
    k = 0 if t < t0 else int((t - t0) // every) + 1
    return _dt.datetime.fromtimestamp(t0 + k * every, _dt.UTC)


def next_slots(start: _dt.datetime, every: int, now: _dt.datetime, n: int) -> list[_dt.datetime]:
    first = next_slot(start, every, now)
    return [first + _dt.timedelta(seconds=every * i) for i in range(n)]


def due(start: _dt.datetime, every: int, last_done: _dt.datetime | None, now: _dt.datetime) -> _dt.datetime | None:
    """The slot to run now, if any: the latest one not after now, when it is newer than the last
    one run. However many slots were missed, that is one run (a catch-up, not a burst)."""
    s = slot_at_or_before(start, every, now)
    if s is None or (last_done is not None and s <= last_done):
        return None
    return s


_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")
DAY = 86400


def _clock(h: str, m: str, s: str | None) -> int:
    return int(h) * 3600 + int(m) * 60 + int(s or 0)


@dataclass(frozen=True)
class Window:
    """A daily wall-clock window [open, close) in local time, in seconds after midnight; it spans
    midnight when close < open ("20:00-06:00"). Seconds are allowed ("20:00:30-20:01:00")."""

    open_s: int
    close_s: int

    @classmethod
    def parse(cls, text: str) -> Window:
        m = _WINDOW_RE.match(text)
        if not m:
            raise ValueError(f"invalid window {text!r}: use HH:MM-HH:MM, e.g. 20:00-06:00")
        g = m.groups()
        for h, mi, se, is_end in ((g[0], g[1], g[2], False), (g[3], g[4], g[5], True)):
            if int(h) > (24 if is_end else 23) or int(mi) > 59 or int(se or 0) > 59 \
                    or (int(h) == 24 and (int(mi) or int(se or 0))):
                raise ValueError(f"invalid window {text!r}: hours 00-23 (24:00 for midnight), minutes 00-59")
        o, c = _clock(*g[0:3]), _clock(*g[3:6]) % DAY
        if o == c:
            raise ValueError(f"invalid window {text!r}: it opens and closes at the same time "
                             "(leave `window` out for always)")
        return cls(o, c)

    def __str__(self) -> str:
        def hm(x: int) -> str:
            return f"{x // 3600:02d}:{x // 60 % 60:02d}" + (f":{x % 60:02d}" if x % 60 else "")
        return f"{hm(self.open_s)}-{hm(self.close_s)}"

    @staticmethod
    def _second(now: _dt.datetime) -> float:
        t = now.astimezone()
        return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6

    def is_open(self, now: _dt.datetime) -> bool:
        x = self._second(now)
        if self.open_s < self.close_s:
            return self.open_s <= x < self.close_s
        return x >= self.open_s or x < self.close_s

    @staticmethod
    def _next_at(now: _dt.datetime, second: int) -> _dt.datetime:
        """The next local wall-clock time `second` after midnight, strictly after now."""
        day = now.astimezone().date()
        for add in range(0, 3):
            d = day + _dt.timedelta(days=add)
            cand = _dt.datetime(d.year, d.month, d.day, second // 3600, second // 60 % 60, second % 60).astimezone()
            if cand > now:
                return cand
        raise AssertionError("unreachable")

    def next_open(self, now: _dt.datetime) -> _dt.datetime:
        """now if open, else the next opening."""
        return now if self.is_open(now) else self._next_at(now, self.open_s)

    def closes_at(self, now: _dt.datetime) -> _dt.datetime:
        """The end of the opening now is in (call only when open)."""
        return self._next_at(now, self.close_s)


def parse_start(text: str) -> _dt.datetime:
    """`start` of the config: ISO 8601, local time unless it has an offset."""
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid start {text!r}: use an ISO 8601 date-time, e.g. 2026-03-15T21:53:00") from None


def iso(dt: _dt.datetime | None) -> str | None:
    """UTC, seconds, 'Z': the form every blockrep record uses."""
    if dt is None:
        return None
    return dt.astimezone(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
