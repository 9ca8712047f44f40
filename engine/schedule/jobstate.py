"""VOL/schedule.json (docs/SCHEDULE.md §4): what the daemon is doing with a volume, for
`schedule status` and the metrics, and the last slot it ran (so a restart catches up once)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import threading
from pathlib import Path

from ..errors import BlockrepError
from ..replication.uris import redact_uri
from .calendar import iso, parse_iso

log = logging.getLogger("blockrep.schedule")

FILE = "schedule.json"
LOCK = "schedule.lock"
VERSION = 1


class ScheduleLock:
    """One daemon per volume: an flock of VOL/schedule.lock for the daemon's life (released by the
    kernel when it dies). Two daemons on one volume would take two snapshots per slot and race
    each other's pruning."""

    def __init__(self, vol: Path):
        self.fd = os.open(vol / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise BlockrepError(f"{vol} is already scheduled by another `blockrep schedule run` "
                                f"(pid {holder})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    @staticmethod
    def held(vol: Path) -> bool:
        """True while some daemon holds vol's lock (a pid in a file can be reused; a lock cannot)."""
        try:
            fd = os.open(vol / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load(vol: Path) -> dict:
    """The record, {} when the daemon never ran this volume; a damaged file is refused."""
    try:
        raw = json.loads((vol / FILE).read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise BlockrepError(f"{vol / FILE} is damaged ({e}); move it away (the schedule then starts afresh)") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("targets", {}), dict):
        raise BlockrepError(f"{vol / FILE} is not a schedule record of version {VERSION}; move it away")
    return raw


class JobState:
    """The daemon's in-memory copy of one volume's record, shared by its workers; every change is
    written through (temporary file, fsync, rename)."""

    def __init__(self, vol: Path):
        self.vol = vol
        self.lock = threading.Lock()
        self.save_failed = False
        try:
            old = load(vol)
        except BlockrepError:
            old = {}  # the daemon's own file: start afresh rather than refuse to run
        self.data: dict = {"version": VERSION, "pid": os.getpid(), "last_slot": old.get("last_slot"),
                           "last_snapshot": old.get("last_snapshot"), "next_run": None, "last_error": None,
                           "targets": {}}
        for uri, t in (old.get("targets") or {}).items():
            if isinstance(t, dict):  # counters carry over; states are re-learnt
                self.data["targets"][uri] = {"state": "idle", "bytes_sent_total": int(t.get("bytes_sent_total") or 0),
                                             "failures_total": int(t.get("failures_total") or 0), "failures": 0}

    @property
    def last_slot(self):
        return parse_iso(self.data.get("last_slot"))

    def target(self, uri: str) -> dict:
        """The record of a target, keyed by its URI without a password (this file is for status)."""
        fresh = {"state": "idle", "bytes_sent_total": 0, "failures_total": 0, "failures": 0}
        return self.data["targets"].setdefault(redact_uri(uri), fresh)

    def set(self, **fields) -> None:
        with self.lock:
            self.data.update({k: iso(v) if hasattr(v, "astimezone") else v for k, v in fields.items()})
            self._save()

    def set_target(self, uri: str, **fields) -> None:
        with self.lock:
            t = self.target(uri)
            for k, v in fields.items():
                t[k] = iso(v) if hasattr(v, "astimezone") else v
            self._save()

    def add(self, uri: str, key: str, n: int) -> None:
        with self.lock:
            t = self.target(uri)
            t[key] = int(t.get(key) or 0) + n
            self._save()

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.data))

    def _save(self) -> None:
        self.data["heartbeat"] = iso(_dt.datetime.now(_dt.UTC))
        tmp = self.vol / (FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with open(fd, "w") as f:
                json.dump(self.data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.vol / FILE)
        except OSError as e:
            # a full disk must not stop the schedule; status is stale meanwhile (its heartbeat says so)
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self.save_failed:
                log.warning("%s: cannot write %s (%s); status shows old figures until it can",
                            self.vol, FILE, e.strerror or e)
            self.save_failed = True
            return
        if self.save_failed:
            log.info("%s: %s written again", self.vol, FILE)
        self.save_failed = False
