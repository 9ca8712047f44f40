"""The primary's replication records (VOL/replication.json, docs/REPLICATION.md §5) and the
one-run-per-target lock.

Notes on the design:
- Several runs (to different targets) and the server (which reads the file to protect bases from
  pruning) share the file: every change is a read-modify-write under an flock of
  VOL/replication.lock, written to a temporary file, fsynced and renamed.
- The run lock is an flock of VOL/replication.d/<digest of the URI>.lock, released by the kernel
  when the run dies, so a killed run never blocks the next; the file names the holder.
- Version 1 files (one flat object per URI, before identities) are read as targets without a known
  snapshot uuid: their next run is a seed (or a rebase for a blockrep DR), never a guess.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import BlockrepError, VolumeBusy

FILE = "replication.json"
LOCK = "replication.lock"
RUNS_DIR = "replication.d"
VERSION = 2
KEEP_RUNS = 20


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _empty() -> dict:
    return {"version": VERSION, "targets": {}}


def load(vol: Path) -> dict:
    try:
        raw = json.loads((vol / FILE).read_text())
    except FileNotFoundError:
        return _empty()
    except ValueError as e:
        raise BlockrepError(f"{vol / FILE} is damaged ({e}); move it away to start replication records anew") from None
    if not isinstance(raw, dict):
        raise BlockrepError(f"{vol / FILE} is not a replication record; move it away to start anew")
    if raw.get("version") == VERSION and isinstance(raw.get("targets"), dict):
        _check_targets(vol, raw["targets"])
        return raw
    if "version" in raw:  # a newer (or broken) format: never read it as "no targets"
        raise BlockrepError(f"{vol / FILE} has replication record version {raw.get('version')!r}; this "
                            f"blockrep reads version {VERSION} (use the blockrep that wrote it)")
    # version 1: {uri: {"snapshot": name, ...}}: keep what is useful for status, no identity
    out = _empty()
    for uri, t in raw.items():
        if isinstance(t, dict):
            out["targets"][uri] = {"kind": "blockrep" if t.get("blockrep") else "nbd",
                                   "snapshot": t.get("snapshot"), "snapshot_uuid": None,
                                   "replicated_at": t.get("replicated_at"), "runs": []}
    _check_targets(vol, out["targets"])
    return out


# The shape every reader of a target record relies on (replicate, plan, retention, status): a
# record that does not have it is refused here with one clear error, never met later as a
# TypeError or AttributeError deep in a run (issue 8: fuzzed replication.json).
_STR_FIELDS = ("kind", "snapshot", "snapshot_uuid", "head_uuid", "replicated_at", "last_error", "dr_volume")
_PROGRESS_STR = ("snapshot", "snapshot_uuid", "base_uuid", "mode", "token", "extents_sha256")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pairs(v, second) -> bool:
    return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and second(p[1])
                                       for p in v)


def _is_hex(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        bytes.fromhex(v)
    except ValueError:
        return False
    return True


def _target_problem(t) -> str | None:
    if not isinstance(t, dict):
        return "not an object"
    for k in _STR_FIELDS:
        if t.get(k) is not None and not isinstance(t[k], str):
            return f"{k} is not a string"
    p = t.get("in_progress")
    if p is not None:
        if not isinstance(p, dict):
            return "in_progress is not an object"
        for k in _PROGRESS_STR:
            if p.get(k) is not None and not isinstance(p[k], str):
                return f"in_progress.{k} is not a string"
        if p.get("done_upto") is not None and not (_is_int(p["done_upto"]) and p["done_upto"] >= 0):
            return "in_progress.done_upto is not a byte count"
        if p.get("dr_dirty") is not None and not _pairs(p["dr_dirty"], _is_int):
            return "in_progress.dr_dirty is not a list of [offset, length]"
    for k in ("last_success", "last_failure"):
        r = t.get(k)
        if r is not None and (not isinstance(r, dict) or (r.get("at") is not None and not isinstance(r["at"], str))):
            return f"{k} is not a run record"
    runs = t.get("runs")
    if runs is not None and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
        return "runs is not a list of run records"
    fp = t.get("fingerprint")
    if fp is not None:
        if not isinstance(fp, dict):
            return "fingerprint is not an object"
        for k in ("size", "target_size"):
            if fp.get(k) is not None and not _is_int(fp[k]):
                return f"fingerprint.{k} is not an integer"
        if fp.get("chunks") is not None and not _pairs(fp["chunks"], _is_hex):
            return "fingerprint.chunks is not a list of [index, hex digest]"
    return None


def _check_targets(vol: Path, targets: dict) -> None:
    for uri, t in targets.items():
        why = _target_problem(t)
        if why:
            raise BlockrepError(f"{vol / FILE} is damaged (target {uri!r}: {why}); "
                                "move it away to start replication records anew")


@contextlib.contextmanager
def _locked(vol: Path) -> Iterator[None]:
    fd = os.open(vol / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update(vol: Path, fn: Callable[[dict], object]) -> object:
    """Apply fn to the records under the lock and write them back; returns fn's result."""
    with _locked(vol):
        st = load(vol)
        res = fn(st)
        tmp = vol / (FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(st, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vol / FILE)
        return res


def target(vol: Path, uri: str) -> dict:
    return dict(load(vol)["targets"].get(uri) or {})


def _apply(t: dict, fields: dict) -> None:
    """Set fields on a target record; None removes the key."""
    for k, v in fields.items():
        if v is None:
            t.pop(k, None)
        else:
            t[k] = v


def set_target(vol: Path, uri: str, **fields) -> None:
    update(vol, lambda st: _apply(st["targets"].setdefault(uri, {}), fields))


def record_run(vol: Path, uri: str, run: dict, **fields) -> None:
    """Append a run (success or failure) to the target's history and set last_success/failure."""
    def fn(st):
        t = st["targets"].setdefault(uri, {})
        _apply(t, fields)
        t.setdefault("runs", []).append(run)
        del t["runs"][:-KEEP_RUNS]
        t["last_success" if run.get("result") == "ok" else "last_failure"] = run
    update(vol, fn)


def forget(vol: Path, uri: str) -> bool:
    def fn(st):
        return st["targets"].pop(uri, None) is not None
    return bool(update(vol, fn))


# ---------------------------------------------------------------- one run per target

class RunLock:
    """Held for a whole replicate run of (vol, uri)."""

    def __init__(self, vol: Path, uri: str):
        d = vol / RUNS_DIR
        d.mkdir(mode=0o700, exist_ok=True)
        self.path = d / (hashlib.sha256(uri.encode()).hexdigest()[:16] + ".lock")
        self.vol, self.uri, self.fd = vol, uri, -1

    def acquire(self, wait: bool = False, timeout: float | None = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    holder = self.holder(fd)
                    os.close(fd)
                    raise VolumeBusy(f"already replicating {self.vol} to {self.uri} "
                                     f"(pid {holder.get('pid', '?')}, since {holder.get('since', '?')})") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": now(), "uri": self.uri}).encode(), 0)
        self.fd = fd

    @staticmethod
    def holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


