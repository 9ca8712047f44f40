"""The scheduler's TOML file (docs/SCHEDULE.md §1), read with tomllib and checked whole: every
problem is reported with its key path, all of them at once, and unknown keys are errors (a
misspelt `keep_remote` must not silently keep the DR's history forever)."""

from __future__ import annotations

import datetime as _dt
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BlockrepError, InvalidArgument
from ..units import parse_duration, parse_size
from .calendar import ANCHOR, Window, parse_start

GFS = ("hourly", "daily", "weekly", "monthly")
MAX_DURATION = 366 * 86400  # every, retry_max: a year at most (and no calendar overflow)
START_YEARS = (1970, 9000)
URI_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")


class ConfigError(BlockrepError):
    """The file is not a valid schedule; .errors lists 'key.path: problem' lines."""

    def __init__(self, path: str, errors: list[str]):
        super().__init__(f"{path}: {len(errors)} error(s): " + "; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Target:
    uri: str
    keep_remote: int | None = None
    keep_remote_gfs: tuple[tuple[str, int], ...] = ()
    window: Window | None = None
    rate: int | None = None
    ship: str = "newest"
    connections: int | None = None
    rates: tuple[tuple[Window, int], ...] = ()  # by time of day: the first window that is open wins

    @property
    def gfs(self) -> dict[str, int] | None:
        return dict(self.keep_remote_gfs) or None

    def rate_at(self, now: _dt.datetime) -> int | None:
        """The cap in force at `now`: the first of `rates` whose window is open, else `rate`."""
        for w, r in self.rates:
            if w.is_open(now):
                return r
        return self.rate


@dataclass(frozen=True)
class VolumeJob:
    path: Path
    every: int
    start: _dt.datetime = ANCHOR
    keep_local: int = 3
    keep_gfs: tuple[tuple[str, int], ...] = ()
    freeze: tuple[str, ...] = ()
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def gfs(self) -> dict[str, int] | None:
        return dict(self.keep_gfs) or None


@dataclass(frozen=True)
class Config:
    path: Path
    volumes: tuple[VolumeJob, ...] = ()
    metrics: tuple[str, int] | None = None
    max_transfers: int = 2
    retry_min: int = 30
    retry_max: int = 3600
    notes: tuple[str, ...] = field(default=(), compare=False)


class _Checker:
    """Collects errors while reading values by key path."""

    def __init__(self):
        self.errors: list[str] = []

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def unknown(self, table: dict, allowed: set[str], where: str) -> None:
        for k in table:
            if k not in allowed:
                self.err(f"{where}{k}" if not where else f"{where}.{k}", "unknown key")

    def int_(self, t: dict, key: str, where: str, default, minimum: int):
        v = t.get(key, default)
        if v is default:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            self.err(f"{where}.{key}" if where else key, f"must be an integer >= {minimum}, not {v!r}")
            return default
        return v

    def str_(self, t: dict, key: str, where: str, required: bool = False) -> str | None:
        v = t.get(key)
        name = f"{where}.{key}" if where else key
        if v is None:
            if required:
                self.err(name, "required")
            return None
        if not isinstance(v, str) or not v.strip():
            self.err(name, f"must be a non-empty string, not {v!r}")
            return None
        return v

    def duration(self, t: dict, key: str, where: str, default: int | None, required: bool = False):
        """A duration: "90m", "1h", or a bare integer of seconds; 1 s to MAX_DURATION."""
        name = f"{where}.{key}" if where else key
        v = t.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        else:
            text = self.str_(t, key, where, required)
            if text is None:
                return default
            try:
                n = parse_duration(text, key)
            except InvalidArgument:
                self.err(name, f"invalid duration {text!r}: a number with s, m, h, d or w, e.g. 1h")
                return default
        if not 1 <= n <= MAX_DURATION:
            self.err(name, f"must be from 1s to {MAX_DURATION // 86400}d, not {v!r}")
            return default
        return n

    def commands(self, t: dict, key: str, where: str) -> tuple[str, ...]:
        v = t.get(key)
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            self.err(f"{where}.{key}", "must be a string or a list of strings")
            return ()
        return tuple(items)

    def gfs(self, t: dict, prefix: str, where: str) -> tuple[tuple[str, int], ...]:
        out = []
        for g in GFS:
            n = self.int_(t, f"{prefix}{g}", where, None, 0)
            if n:
                out.append((g, n))
        return tuple(out)


_TOP = {"metrics", "max_transfers", "retry_min", "retry_max", "volume"}
_VOLUME = {"path", "every", "start", "keep_local", "freeze", "pre", "post", "target"} | {f"keep_{g}" for g in GFS}
_TARGET = {"uri", "keep_remote", "window", "rate", "rates", "ship", "connections"} | {f"keep_remote_{g}" for g in GFS}


def _listen(c: _Checker, text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        c.err("metrics", f"invalid address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9813")
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


def _rate(c: _Checker, value, where: str) -> int | None:
    if value is None:
        return None
    try:
        rate = parse_size(str(value), "rate")
        if rate < 1:
            raise InvalidArgument("zero")
    except InvalidArgument:
        c.err(where, f"invalid rate {value!r}: bytes per second with K, M, G suffixes, e.g. 10M "
                     "(no transfer at all: use window)")
        return None
    return rate


def _target(c: _Checker, t, where: str) -> Target | None:
    if not isinstance(t, dict):
        c.err(where, "must be a table ([[volume.target]])")
        return None
    c.unknown(t, _TARGET, where)
    uri = c.str_(t, "uri", where, required=True)
    if uri is not None and not uri.startswith(URI_SCHEMES):
        c.err(f"{where}.uri", f"invalid target {uri!r}: use nbd://host[:port]/, nbds://… or nbd+unix:///?socket=PATH")
    window = None
    wtext = c.str_(t, "window", where)
    if wtext is not None:
        try:
            window = Window.parse(wtext)
        except ValueError as e:
            c.err(f"{where}.window", str(e))
    rate = _rate(c, t.get("rate"), f"{where}.rate")
    rates = []
    raw_rates = t.get("rates", [])
    if not isinstance(raw_rates, list):
        c.err(f"{where}.rates", "must be an array of tables ([[volume.target.rates]] window = …, rate = …)")
        raw_rates = []
    for k, rt in enumerate(raw_rates):
        rw = f"{where}.rates[{k}]"
        if not isinstance(rt, dict):
            c.err(rw, "must be a table with window and rate")
            continue
        c.unknown(rt, {"window", "rate"}, rw)
        text = c.str_(rt, "window", rw, required=True)
        r = _rate(c, rt.get("rate"), f"{rw}.rate")
        if rt.get("rate") is None:
            c.err(f"{rw}.rate", "required")
        if text is None:
            continue
        try:
            rw_window = Window.parse(text)
        except ValueError as e:
            c.err(f"{rw}.window", str(e))
            continue
        if r is not None:
            rates.append((rw_window, r))
    ship = t.get("ship", "newest")
    if ship not in ("all", "newest"):
        c.err(f"{where}.ship", f"must be \"all\" or \"newest\", not {ship!r}")
    fields = dict(keep_remote=c.int_(t, "keep_remote", where, None, 1), keep_remote_gfs=c.gfs(t, "keep_remote_", where),
                  connections=c.int_(t, "connections", where, None, 1))
    if uri is None:
        return None
    return Target(uri=uri, window=window, rate=rate, rates=tuple(rates),
                  ship=ship if ship in ("all", "newest") else "newest", **fields)


def _volume(c: _Checker, v, where: str, check_volumes: bool) -> VolumeJob | None:
    if not isinstance(v, dict):
        c.err(where, "must be a table ([[volume]])")
        return None
    c.unknown(v, _VOLUME, where)
    ptext = c.str_(v, "path", where, required=True)
    path = None
    if ptext is not None:
        path = Path(ptext).expanduser().resolve()
        if check_volumes:
            from ..volume import read_params
            try:
                read_params(path)
            except BlockrepError as e:
                c.err(f"{where}.path", str(e))
    every = c.duration(v, "every", where, None, required=True)
    start = ANCHOR
    raw_start = v.get("start")
    if isinstance(raw_start, _dt.datetime):  # a TOML date-time, unquoted
        start = raw_start
    elif raw_start is not None:
        stext = c.str_(v, "start", where)
        if stext is not None:
            try:
                start = parse_start(stext)
            except ValueError as e:
                c.err(f"{where}.start", str(e))
    if not START_YEARS[0] <= start.year <= START_YEARS[1]:
        c.err(f"{where}.start", f"must be a date-time from {START_YEARS[0]} to {START_YEARS[1]}, not {start}")
        start = ANCHOR
    raw_targets = v.get("target", [])
    if not isinstance(raw_targets, list):
        c.err(f"{where}.target", "must be an array of tables ([[volume.target]])")
        raw_targets = []
    targets = []
    seen: set[str] = set()
    for j, t in enumerate(raw_targets):
        tw = f"{where}.target[{j}]"
        tgt = _target(c, t, tw)
        if tgt is None:
            continue
        if tgt.uri in seen:
            c.err(f"{tw}.uri", f"{tgt.uri} is listed twice for this volume")
        seen.add(tgt.uri)
        targets.append(tgt)
    fields = dict(keep_local=c.int_(v, "keep_local", where, 3, 1), keep_gfs=c.gfs(v, "keep_", where),
                  freeze=c.commands(v, "freeze", where), pre=c.commands(v, "pre", where),
                  post=c.commands(v, "post", where))
    if path is None or every is None:
        return None
    return VolumeJob(path=path, every=every, start=start, targets=tuple(targets), **fields)


def parse(text: str, path: str = "<config>", *, check_volumes: bool = True) -> Config:
    """The Config of a TOML text, or ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    c = _Checker()
    c.unknown(raw, _TOP, "")
    metrics = _listen(c, c.str_(raw, "metrics", ""))
    vols_raw = raw.get("volume", [])
    if not isinstance(vols_raw, list):
        c.err("volume", "must be an array of tables ([[volume]])")
        vols_raw = []
    if not vols_raw:
        c.err("volume", "no [[volume]] in the file: nothing to schedule")
    vols = []
    seen: set[Path] = set()
    for i, v in enumerate(vols_raw):
        job = _volume(c, v, f"volume[{i}]", check_volumes)
        if job is None:
            continue
        if job.path in seen:
            c.err(f"volume[{i}].path", f"{job.path} is listed twice")
        seen.add(job.path)
        vols.append(job)
    retry_min = c.duration(raw, "retry_min", "", 30)
    retry_max = c.duration(raw, "retry_max", "", 3600)
    if retry_min > retry_max:
        c.err("retry_min", f"is above retry_max ({retry_min} s > {retry_max} s)")
    cfg = Config(path=Path(path), volumes=tuple(vols), metrics=metrics,
                 max_transfers=c.int_(raw, "max_transfers", "", 2, 1), retry_min=retry_min, retry_max=retry_max)
    if c.errors:
        raise ConfigError(path, c.errors)
    return cfg


def load(path: str, *, check_volumes: bool = True) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(path, [f"cannot read it: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, ["not UTF-8 text"]) from None
    return parse(text, str(p), check_volumes=check_volumes)
