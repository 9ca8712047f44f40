"""The Volume interface: one open volume of either backend (lsfs, image), the API the CLI, the
plugin, replication and the scheduler use.

Notes on the design:
- One process owns an open volume: ``Volume.open`` takes the owner's lock (lock.py) and holds it
  until ``close``.
- Every data call is one call into the C engine (csrc/volume.c), which releases the GIL. The
  background work (``maintain``: checkpoints and the collector, lsfs.py; ``run_mover``: the image
  backend's mover, image.py) is meant for threads; it also only calls C.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import os
import time as _time
import uuid as _uuid
from pathlib import Path

from ..errors import (
    CorruptionError,
    InvalidArgument,
    NotFound,
    from_errno,
)
from ..limits import NO_SNAPSHOT, ZSTD_LEVEL
from .image import ImageMover
from .lock import Lock
from .lsfs import REPLAY_CHECKPOINT, LogUpkeep
from .native import RequestCalls, _native
from .params import (
    BLOCK,
    DEFAULT_JOURNAL_SIZE,
    IMAGE_FILE,
    Params,
    _check_journal,
    parse_snapshot_uuid,
    read_params,
    validate_snapshot_name,
)


class Volume(LogUpkeep, ImageMover):
    """An open volume of either backend. Use as a context manager or call close()."""

    def __init__(self, path: Path, params: Params, handle, native, lock: Lock, report: dict):
        self.path = path
        self.params = params
        self.size = params.size
        self._v = handle
        self._n = native
        self._lock = lock
        self.recovery = report
        self._mover_rate = 0.0  # bytes/s, an average over the last seconds of moving (run_mover)

    # ---- lifecycle ----
    @classmethod
    def open(cls, path: str | os.PathLike, *, wbuf_size: int = 0, readonly: bool = False) -> Volume:
        """Open (and recover) a volume, owning it until close(). readonly: recovery happens in
        memory only and no file is written (for commands that only look: list, diff, info,
        check); every change fails with ReadOnly."""
        p = Path(path).resolve()
        params = read_params(p)
        if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
            raise InvalidArgument(f"volume directory {p} is not readable and writable by this user")
        logdir = _check_journal(p, params) if params.backend == "image" else p
        lock = Lock(p)
        lock.acquire(write_pid=not readonly)
        native = _native()
        ffi, lib = native.ffi, native.lib
        vp = ffi.new("vol_params *")
        vp.size = params.size
        ffi.memmove(vp.uuid, _uuid.UUID(params.uuid).bytes, 16)
        vp.compress = 1 if params.compress == "zstd" else 0
        vp.zstd_level = ZSTD_LEVEL  # fastest standard level: the request path pays for it
        vp.segment_size = params.segment_size
        vp.wbuf_size = wbuf_size
        vp.readonly = 1 if readonly else 0
        image = ffi.new("char[]", str(p / IMAGE_FILE).encode()) if params.backend == "image" else ffi.NULL
        vp.image_path = image
        vp.journal_max = params.journal_size or DEFAULT_JOURNAL_SIZE
        rep = ffi.new("vol_report *")
        h = lib.vol_open(str(logdir).encode(), vp, rep)
        if h == ffi.NULL:
            err = ffi.errno
            msg = ffi.string(lib.vol_errmsg()).decode(errors="replace")
            lock.release()
            raise from_errno(err, f"cannot open volume {p}: {msg}")
        report = {k: getattr(rep, k) for k in dir(rep)}
        vol = cls(p, params, h, native, lock, report)
        if not readonly and report["bytes_replayed"] > REPLAY_CHECKPOINT:
            # a server killed again and again would otherwise replay the same log every time
            vol.checkpoint()
        return vol

    def request_calls(self) -> RequestCalls:
        """The request path's C calls bound to this volume, for a caller that pays per request
        (the nbdkit plugin: one C call per NBD request, no Python wrapper in between). Each call
        returns 0, or non-zero with the reason in last_error(); buffers go through from_buffer
        (require_writable=True for reads). Valid until close()."""
        from functools import partial
        lib, ffi = self._n.lib, self._n.ffi
        return RequestCalls(
            read=partial(lib.vol_read, self._v), snapshot_read=partial(lib.vol_snap_read, self._v),
            write=partial(lib.vol_write, self._v), zero=partial(lib.vol_zero, self._v),
            flush=partial(lib.vol_flush, self._v), from_buffer=ffi.from_buffer, last_error=self.last_error)

    def last_error(self) -> tuple[int, str]:
        """(errno, message) of this thread's last failed engine call; EBADMSG means damage."""
        ffi, lib = self._n.ffi, self._n.lib
        return ffi.errno or _errno.EIO, ffi.string(lib.vol_errmsg()).decode(errors="replace")

    def close(self) -> None:
        if self._v is None:
            return
        r = self._n.lib.vol_close(self._v)
        self._v = None
        self._lock.release()
        if r < 0:
            self._raise("closing volume")

    def abandon(self) -> None:
        """Drop the volume as a crash would (for tests): nothing buffered is written."""
        if self._v is not None:
            self._n.lib.vol_abandon(self._v)
            self._v = None
            self._lock.release()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._v is None

    def _raise(self, what: str):
        ffi, lib = self._n.ffi, self._n.lib
        err = ffi.errno or _errno.EIO
        raise from_errno(err, f"{what}: {ffi.string(lib.vol_errmsg()).decode(errors='replace')}")

    # ---- data path (each one C call) ----
    def read(self, count: int, offset: int) -> bytes:
        buf = bytearray(count)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf, offset: int) -> None:
        ffi = self._n.ffi
        if self._n.lib.vol_read(self._v, ffi.from_buffer(buf, require_writable=True), len(buf), offset):
            self._raise(f"read at {offset}")

    def write(self, buf, offset: int, fua: bool = False) -> None:
        if self._n.lib.vol_write(self._v, self._n.ffi.from_buffer(buf), len(buf), offset, fua):
            self._raise(f"write at {offset}")

    def zero(self, count: int, offset: int, fua: bool = False) -> None:
        if self._n.lib.vol_zero(self._v, count, offset, fua, 0):
            self._raise(f"zero at {offset}")

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        if self._n.lib.vol_zero(self._v, count, offset, fua, 1):
            self._raise(f"trim at {offset}")

    def flush(self) -> None:
        if self._n.lib.vol_flush(self._v):
            self._raise("flush")

    def extents(self, count: int, offset: int, max_extents: int = 1024,
                snapshot: int = 0) -> list[tuple[int, int, int]]:
        """(offset, length, type) runs from `offset` of the head (or snapshot id); type 0 = data,
        3 = hole (reads as zeroes)."""
        ffi = self._n.ffi
        out = ffi.new("uint64_t[]", 3 * max_extents)
        n = self._n.lib.vol_snap_extents(self._v, snapshot, count, offset, out, max_extents)
        if n < 0:
            self._raise(f"extents at {offset}")
        return [(out[3 * i], out[3 * i + 1], out[3 * i + 2]) for i in range(n)]

    def scrub(self, chunk: int = 1 << 20) -> list[tuple[int, int]]:
        """Read every block that holds data; return the (offset, length) extents that fail
        their checksum, coalesced. Reads only data extents, so holes cost nothing."""
        bad: list[tuple[int, int]] = []
        buf = bytearray(chunk)
        pos = 0
        while pos < self.size:
            ext = self.extents(self.size - pos, pos)
            for off, length, typ in ext:
                if typ != 0:
                    continue
                for o in range(off, off + length, chunk):
                    n = min(chunk, off + length - o)
                    try:
                        self.readinto(memoryview(buf)[:n], o)
                    except CorruptionError:
                        for b in range(o, o + n, BLOCK):
                            try:
                                self.readinto(memoryview(buf)[:BLOCK], b)
                            except CorruptionError:
                                if bad and bad[-1][0] + bad[-1][1] == b:
                                    bad[-1] = (bad[-1][0], bad[-1][1] + BLOCK)
                                else:
                                    bad.append((b, BLOCK))
            last = ext[-1]
            pos = last[0] + last[1]
        return bad

    # ---- snapshots (docs/FORMAT.md §8) ----
    def snapshots(self) -> list[dict]:
        """Snapshots oldest first: id, name, generation, created (ISO 8601 UTC), uuid (the
        snapshot's identity: canonical lowercase string, unique in the volume; a DR snapshot
        carries the primary's) and flags (int, stored for the caller)."""
        ffi, lib = self._n.ffi, self._n.lib
        cap = 64
        while True:
            out = ffi.new("vol_snap_info[]", cap)
            n = lib.vol_snap_list(self._v, out, cap)
            if n <= cap:
                break
            cap = n
        res = []
        for i in range(n):
            s = out[i]
            created = _dt.datetime.fromtimestamp(s.created / 1e9, _dt.UTC)
            res.append({"id": s.id, "name": ffi.string(s.name).decode(), "generation": s.gen,
                        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
                        "uuid": str(_uuid.UUID(bytes=bytes(ffi.buffer(s.uuid, 16)))),
                        "flags": s.flags})
        return res

    def snapshot(self, name: str) -> dict:
        for s in self.snapshots():
            if s["name"] == name:
                return s
        raise NotFound(f"no snapshot named {name!r} in {self.path}")

    def snapshot_by_uuid(self, uuid: str) -> dict:
        u = str(parse_snapshot_uuid(uuid))
        for s in self.snapshots():
            if s["uuid"] == u:
                return s
        raise NotFound(f"no snapshot with uuid {u} in {self.path}")

    def snapshot_create(self, name: str, created_ns: int | None = None, *, uuid: str | None = None,
                        flags: int = 0) -> dict:
        """Take a snapshot of the head. uuid: its identity (a DR snapshot passes the primary
        snapshot's), default a new random one; AlreadyExists if the name or the uuid is taken.
        flags: a 32-bit word stored with it (no meaning to the engine)."""
        validate_snapshot_name(name)
        u = None if uuid is None else parse_snapshot_uuid(uuid)
        if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= 0xFFFFFFFF:
            raise InvalidArgument(f"snapshot flags must be an integer from 0 to 2**32-1, not {flags!r}")
        ns = created_ns if created_ns is not None else _time.time_ns()
        if isinstance(ns, bool) or not isinstance(ns, int) or not 0 <= ns < 1 << 64:
            raise InvalidArgument(f"snapshot creation time must be Unix time in ns, not {created_ns!r}")
        ffi = self._n.ffi
        out = ffi.new("uint32_t *")
        if self._n.lib.vol_snap_create(self._v, name.encode(), ns, ffi.NULL if u is None else u.bytes, flags, out):
            self._raise(f"creating snapshot {name}")
        return self.snapshot(name)

    def snapshot_delete(self, name: str) -> None:
        sid = self.snapshot(name)["id"]
        if self._n.lib.vol_snap_delete(self._v, sid):
            self._raise(f"deleting snapshot {name}")

    def snapshot_pinned(self, sid: int) -> int:
        n = self._n.lib.vol_snap_pinned(self._v, sid)
        if n < 0:
            self._raise("pinned bytes")
        return n

    def snapshot_readinto(self, sid: int, buf, offset: int) -> None:
        ffi = self._n.ffi
        if self._n.lib.vol_snap_read(self._v, sid, ffi.from_buffer(buf, require_writable=True), len(buf), offset):
            self._raise(f"read of snapshot {sid} at {offset}")

    def snapshot_read(self, sid: int, count: int, offset: int) -> bytes:
        buf = bytearray(count)
        self.snapshot_readinto(sid, buf, offset)
        return bytes(buf)

    def diff_ids(self, from_id: int | None, to_id: int, granularity: int | None = None) -> list[tuple[int, int]]:
        """Changed extents from snapshot from_id (None: since creation) to to_id (0: the head),
        sorted, coalesced at the granularity. One C scan, paged 4096 extents at a time."""
        ffi, lib = self._n.ffi, self._n.lib
        gran = granularity or self.params.granularity
        pos = ffi.new("uint64_t *", 0)
        out = ffi.new("uint64_t[]", 2 * 4096)
        res: list[tuple[int, int]] = []
        while pos[0] < self.size:
            n = lib.vol_diff(self._v, NO_SNAPSHOT if from_id is None else from_id, to_id, gran, pos, out, 4096)
            if n < 0:
                self._raise("diff")
            for i in range(n):
                o, ln = out[2 * i], out[2 * i + 1]
                if res and res[-1][0] + res[-1][1] == o:
                    res[-1] = (res[-1][0], res[-1][1] + ln)
                else:
                    res.append((o, ln))
        return res

    def diff(self, from_name: str, to_name: str) -> list[tuple[int, int]]:
        a, b = self.snapshot(from_name), self.snapshot(to_name)
        if a["generation"] > b["generation"]:
            raise InvalidArgument(f"snapshot {from_name} is newer than {to_name}: give the older one first")
        return self.diff_ids(a["id"], b["id"])

    def stats(self) -> dict:
        ffi = self._n.ffi
        s = ffi.new("vol_stats *")
        self._n.lib.vol_get_stats(self._v, s)
        return {k: getattr(s, k) for k in dir(s)}

    def info(self) -> dict:
        """What `blockrep info` shows for an open volume."""
        st = self.stats()
        return {
            "path": str(self.path),
            "uuid": self.params.uuid,
            "size": self.size,
            "backend": self.params.backend,
            "granularity": self.params.granularity,
            "compress": self.params.compress,
            "created": self.params.created,
            "format_version": self.params.format_version,
            "used_bytes": st["used_bytes"],
            "live_bytes": st["live_blocks"] * BLOCK,
            "stored_data_bytes": st["stored_data_bytes"],
            "segments": st["segments"],
            "generation": st["gen"],
            "log_since_checkpoint": st["log_since_checkpoint"],
            "map_memory_bytes": st["map_bytes"],
            "corrupt_reads": st["corrupt_reads"],
            "recovery": self.recovery,
            **(self._image_info(st) if self.has_mover else {}),
        }
