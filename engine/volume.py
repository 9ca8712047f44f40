"""A blockrep volume: its parameters file, its ownership lock, and the lsfs engine behind it.

Notes on the design:
- ``volume.json`` (docs/FORMAT.md §1) is written once at create, atomically.
- One process owns an open volume: ``Volume.open`` takes an exclusive flock on ``VOL/lock`` and
  holds it until ``close`` (FORMAT.md §6). A second opener gets VolumeBusy at once.
- Every data call is one call into the C engine (csrc/lsfs/, csrc/log/, csrc/image/), which releases the GIL. The
  ``maintain`` method (checkpoint when the log grew, collect garbage) is meant for a background
  thread; it also only calls C.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import fcntl
import json
import os
import re
import time as _time
import uuid as _uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import (
    AlreadyExists,
    BlockrepError,
    CorruptionError,
    InvalidArgument,
    NotFound,
    UnsupportedFormat,
    VolumeBusy,
    from_errno,
)
from .limits import BLOCK, MAX_SIZE, NO_SNAPSHOT, SEGMENT_MAX, SEGMENT_MIN, SNAP_NAME_MAX, ZSTD_LEVEL

FORMAT_NAME = "blockrep-volume"
FORMAT_VERSION = 1
DEFAULT_SEGMENT = 32 << 20
REPLAY_CHECKPOINT = 64 << 20  # checkpoint right after a recovery that replayed more than this
CHECKPOINT_EVERY = 2 << 30  # bytes of log since the last checkpoint (recovery replays ~0.2 s/GiB)
GC_RATIO = 1.2  # when idle, collect while disk use > GC_RATIO x live data
GC_BUSY_RATIO = 2.0  # while clients write, collect only above this
POOL_IDLE = 4  # recycled segment files kept when idle (up to 64 while busy)
BACKENDS = ("lsfs", "image")
DEFAULT_JOURNAL_SIZE = 1 << 30  # image backend: head data the change log holds before writes wait
MOVE_BATCH = 4 << 20  # the mover's batch (docs/IMAGE.md §3)
IMAGE_FILE = "image.raw"
JOURNAL_OWNER = "owner"
SNAPSHOT_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{SNAP_NAME_MAX}}}")


def validate_snapshot_name(name: str) -> str:
    if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name):
        raise InvalidArgument(f"invalid snapshot name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
    return name


def parse_snapshot_uuid(value) -> _uuid.UUID:
    """A snapshot uuid given as a string (any form uuid.UUID reads) or a uuid.UUID; never nil."""
    u: _uuid.UUID | None = None
    if isinstance(value, _uuid.UUID):
        u = value
    else:
        try:
            u = _uuid.UUID(value) if isinstance(value, str) else None
        except ValueError:
            u = None
        if u is None:
            raise InvalidArgument(f"invalid snapshot uuid {value!r} "
                                  "(expected e.g. 3f2b8c1e-9d4a-4e6b-8f1a-2c3d4e5f6a7b)")
    if u.int == 0:
        raise InvalidArgument("the nil uuid cannot identify a snapshot")
    return u


def default_snapshot_name() -> str:
    """A UTC timestamp with milliseconds, e.g. 20261125T081500123Z (a valid name; sorts by time)."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class Params:
    """The contents of volume.json."""

    uuid: str
    size: int
    backend: str = "lsfs"
    block_size: int = BLOCK
    granularity: int = BLOCK
    compress: str = "none"
    segment_size: int = DEFAULT_SEGMENT
    journal: str = ""  # image backend: the change-log directory (absolute)
    journal_size: int = 0  # image backend: bytes of unmoved head data before writes wait (0: 1 GiB)
    created: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def validate_size(size: int) -> int:
    if size <= 0:
        raise InvalidArgument("volume size must be greater than zero")
    if size % BLOCK:
        raise InvalidArgument(f"volume size {size} is not a multiple of 4 KiB")
    if size > MAX_SIZE:
        raise InvalidArgument("volume size must be at most 16 TiB")
    return size


def validate_granularity(g: int) -> int:
    if g < BLOCK or g & (g - 1) or g > (1 << 30):
        raise InvalidArgument(f"granularity {g} must be a power of two between 4K and 1G")
    return g


def journal_shares_filesystem(params: Params, path: str | os.PathLike) -> bool:
    """Is an image volume's change log on the image's own filesystem (then it shares the
    image's disk and its write latency: the point of a separate log is lost)?"""
    try:
        return os.stat(params.journal).st_dev == os.stat(Path(path) / IMAGE_FILE).st_dev
    except OSError:
        return False


def _check_journal_dir(j: Path) -> None:
    if j.exists():
        if not j.is_dir():
            raise AlreadyExists(f"change-log path {j} exists and is not a directory")
        if any(j.iterdir()):
            raise AlreadyExists(f"change-log directory {j} is not empty (a change log serves one volume)")
    elif not j.parent.is_dir():
        raise NotFound(f"parent directory {j.parent} of the change log does not exist")


def create(path: str | os.PathLike, size: int, *, backend: str = "lsfs", granularity: int = BLOCK,
           compress: str = "none", segment_size: int = DEFAULT_SEGMENT, journal: str | os.PathLike | None = None,
           journal_size: int = 0) -> Params:
    """Create an empty volume directory. Refuses to touch an existing non-empty directory.
    backend "image": VOL holds image.raw (sparse, raw) and the change log goes to `journal`
    (docs/IMAGE.md §1)."""
    p = Path(path)
    validate_size(size)
    validate_granularity(granularity)
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend {backend!r} is not available (choose from: {', '.join(BACKENDS)})")
    if backend == "image":
        if not journal:
            raise InvalidArgument("the image backend needs --journal DIR (the change log, ideally on another disk)")
        if journal_size and not (16 << 20) <= journal_size <= (1 << 40):
            raise InvalidArgument("journal size must be between 16M and 1T")
    elif journal or journal_size:
        raise InvalidArgument("--journal and --journal-size apply to the image backend (--backend image)")
    if compress not in ("none", "zstd"):
        raise InvalidArgument(f"unknown compression {compress!r} (choose none or zstd)")
    if not SEGMENT_MIN <= segment_size <= SEGMENT_MAX:
        raise InvalidArgument("segment size must be between 1M and 256M")
    if p.exists():
        if not p.is_dir():
            raise AlreadyExists(f"{p} exists and is not a directory")
        if any(p.iterdir()):
            raise AlreadyExists(f"{p} already exists and is not empty")
    elif not p.parent.is_dir():
        raise NotFound(f"parent directory {p.parent} does not exist")
    jdir = Path(os.path.abspath(journal)) if backend == "image" and journal else None
    if jdir is not None:
        if jdir == p.resolve() or p.resolve() in jdir.parents:
            raise InvalidArgument(f"the change log {jdir} must not be inside the volume directory {p}")
        _check_journal_dir(jdir)
    params = Params(
        uuid=str(_uuid.uuid4()), size=size, backend=backend, granularity=granularity,
        compress=compress, segment_size=segment_size,
        journal=str(jdir) if jdir else "", journal_size=journal_size if jdir else 0,
        created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    )
    try:
        p.mkdir(mode=0o700, exist_ok=True)
        if jdir is None:
            (p / "segments").mkdir(mode=0o700)
        else:
            jdir.mkdir(mode=0o700, exist_ok=True)
            (jdir / "segments").mkdir(mode=0o700)
            _atomic_write(jdir / JOURNAL_OWNER, (params.uuid + "\n").encode())
            with open(p / IMAGE_FILE, "xb") as f:  # sparse: costs nothing until the mover writes
                f.truncate(size)
                os.fsync(f.fileno())
        _atomic_write(p / "volume.json", (json.dumps(asdict(params), indent=2) + "\n").encode())
    except PermissionError as e:
        raise InvalidArgument(f"cannot create volume in {p}: {e.strerror}") from None
    except OSError as e:
        raise from_errno(e.errno or _errno.EIO, f"cannot create volume in {p}: {e.strerror}") from None
    return params


def read_params(path: str | os.PathLike) -> Params:
    """Read and check volume.json; NotFound / UnsupportedFormat / CorruptionError with clear text."""
    p = Path(path)
    meta = p / "volume.json"
    try:
        if not p.exists():
            raise NotFound(f"no volume at {p}")
        if not p.is_dir() or not meta.exists():
            raise NotFound(f"{p} is not a blockrep volume (no volume.json)")
    except PermissionError:
        raise InvalidArgument(f"cannot read volume {p}: permission denied "
                              "(run blockrep as the volume's owner)") from None
    try:
        raw = json.loads(meta.read_text())
    except PermissionError:
        raise InvalidArgument(f"cannot read {meta}: permission denied "
                              "(run blockrep as the volume's owner)") from None
    except (OSError, ValueError) as e:
        raise BlockrepError(f"{meta} is unreadable or damaged: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise BlockrepError(f"{meta} is not a blockrep volume description")
    if raw.get("format_version") != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"volume {p} has unsupported format version {raw.get('format_version')!r} "
            f"(this blockrep reads version {FORMAT_VERSION})")
    try:
        params = Params(**{k: raw[k] for k in Params.__dataclass_fields__ if k in raw})
        _check_params(params)
    except (TypeError, InvalidArgument) as e:
        raise BlockrepError(f"{meta} is damaged: {e}") from None
    return params


def _int_field(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} is {value!r}, expected an integer from {lo} to {hi}")
    return value


def _check_params(params: Params) -> None:
    """Every field of volume.json within what this release writes: a hand-edited or damaged
    file is one clear error, never a value the engine would misuse (docs/FORMAT.md §1)."""
    try:
        _uuid.UUID(params.uuid) if isinstance(params.uuid, str) else None
    except ValueError:
        raise InvalidArgument(f"uuid {params.uuid!r} is not a uuid") from None
    if not isinstance(params.uuid, str):
        raise InvalidArgument(f"uuid {params.uuid!r} is not a uuid")
    validate_size(_int_field("size", params.size, 1, MAX_SIZE))
    if params.backend not in BACKENDS:
        raise InvalidArgument(f"backend {params.backend!r} is unknown (expected lsfs or image)")
    if params.backend == "image":
        if not isinstance(params.journal, str) or not os.path.isabs(params.journal):
            raise InvalidArgument(f"journal is {params.journal!r}, expected the change log's absolute path")
        if params.journal_size:
            _int_field("journal_size", params.journal_size, 16 << 20, 1 << 40)
    if params.block_size != BLOCK or isinstance(params.block_size, bool):
        raise InvalidArgument(f"block_size is {params.block_size!r}, expected {BLOCK}")
    validate_granularity(_int_field("granularity", params.granularity, BLOCK, 1 << 30))
    if params.compress not in ("none", "zstd"):
        raise InvalidArgument(f"compress is {params.compress!r}, expected none or zstd")
    _int_field("segment_size", params.segment_size, SEGMENT_MIN, SEGMENT_MAX)
    if not isinstance(params.created, str):
        raise InvalidArgument(f"created is {params.created!r}, expected an ISO 8601 time")


class Lock:
    """Exclusive ownership of a volume (flock on VOL/lock); released when the process dies."""

    def __init__(self, path: Path):
        self.path = path / "lock"
        self.fd = -1

    def acquire(self, write_pid: bool = True) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise from_errno(e.errno or _errno.EIO, f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise VolumeBusy(f"volume {self.path.parent} is in use by another process "
                             "(is it being served? run 'blockrep stop' first)") from None
        if write_pid:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def held(path: Path) -> bool:
        """True when some process owns the volume."""
        try:
            fd = os.open(path / "lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def _native():
    try:
        from . import _native
    except ImportError as e:  # pragma: no cover - only without a build
        raise BlockrepError(
            f"the C extension is not built ({e}); run scripts/bootstrap.sh or make build") from None
    return _native


class Volume:
    """An open lsfs volume. Use as a context manager or call close()."""

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

    # ---- maintenance ----
    def checkpoint(self) -> None:
        if self._n.lib.vol_checkpoint(self._v):
            self._raise("checkpoint")

    def collect(self, ratio: float = GC_RATIO, max_segments: int = 1 << 30, batch: int = 8,
                drop_dead: bool = True, trim_pool: bool = True) -> int:
        """Reclaim segments while disk use exceeds ratio x live data; returns segments moved.
        trim_pool gives recycled segment files beyond POOL_IDLE back to the filesystem.
        Relocates up to `batch` victims, then one checkpoint makes the moves durable and deletes
        the dead segments (docs/FORMAT.md §7)."""
        lib = self._n.lib
        done = 0
        while done < max_segments:
            seg = lib.vol_gc_pick(self._v, ratio)
            if seg <= 0:
                break
            if lib.vol_gc_segment(self._v, seg):
                self._raise(f"collecting segment {seg}")
            done += 1
            if done % batch == 0:
                self.checkpoint()
        if done % batch or (drop_dead and self.stats()["dead_segments"]):
            self.checkpoint()
        if trim_pool:  # keep a few files for reuse, never more than a tenth of live data
            st = self.stats()
            keep = min(POOL_IDLE, int(0.1 * st["live_blocks"] * BLOCK) // self.params.segment_size)
            lib.vol_pool_trim(self._v, keep)
        return done

    # ---- the image backend's mover (docs/IMAGE.md §3) ----
    @property
    def has_mover(self) -> bool:
        return self.params.backend == "image"

    def move(self, max_bytes: int = MOVE_BATCH, seal: bool = True) -> int:
        """Move up to max_bytes of head blocks from the change log into the image; returns the
        bytes moved (0: nothing left). seal: also the active segment, and punch the image where
        the head reads as trimmed once nothing is left (what a clean stop does)."""
        r = self._n.lib.vol_move(self._v, max_bytes, 1 if seal else 0)
        if r < 0:
            self._raise("moving blocks into the image")
        return r

    def run_mover(self, stop, idle_seconds: float = 1.0) -> None:
        """The background mover (a thread the server starts after it forks): moves while the
        change log holds head data, seals the active segment once clients have been quiet for
        idle_seconds, and keeps the rate `info` shows. Errors are logged by the caller's
        logger and retried every few seconds (the log keeps every block meanwhile)."""
        import logging
        log = logging.getLogger("blockrep.mover")
        last_req, quiet_since = None, _time.monotonic()
        window_start, window_bytes = _time.monotonic(), 0
        while not stop.is_set():
            req = self.stats()["requests"]
            now = _time.monotonic()
            if req != last_req:
                last_req, quiet_since = req, now
            try:
                moved = self.move(MOVE_BATCH, seal=now - quiet_since >= idle_seconds)
            except BlockrepError as e:
                log.error("mover: %s", e)
                stop.wait(5)
                continue
            window_bytes += moved
            if now - window_start >= 2:
                self._mover_rate = window_bytes / (now - window_start)
                window_start, window_bytes = now, 0
            if moved == 0:
                stop.wait(0.05)

    def maintain(self, busy: bool) -> None:
        """One round of background work. While clients are writing (`busy`) the collector only
        runs when disk use passes GC_BUSY_RATIO x live data and checkpoints only bound recovery
        (every CHECKPOINT_EVERY bytes of log): both cost foreground bandwidth (copies, fdatasync).
        When idle it collects down to GC_RATIO and checkpoints away dead segments."""
        st = self.stats()
        dead_bytes = st["dead_segments"] * self.params.segment_size
        if st["log_since_checkpoint"] > CHECKPOINT_EVERY or (
                self.has_mover and dead_bytes > max(64 << 20, st["journal_max_bytes"] // 4)):
            self.checkpoint()  # (image) moved segments are deleted by the next checkpoint
        if busy:
            over = st["used_bytes"] > GC_BUSY_RATIO * st["live_blocks"] * BLOCK
            self.collect(ratio=GC_BUSY_RATIO, max_segments=8, drop_dead=over, trim_pool=False)
        else:
            self.collect(ratio=GC_RATIO, max_segments=8)

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

    def _image_info(self, st: dict) -> dict:
        image = self.path / IMAGE_FILE
        try:
            image_used = os.stat(image).st_blocks * 512
        except OSError:
            image_used = 0
        return {
            "image": str(image),
            "journal": self.params.journal,
            "journal_pending_bytes": st["journal_pending_bytes"],
            "journal_max_bytes": st["journal_max_bytes"],
            "journal_used_bytes": st["used_bytes"],
            "image_used_bytes": image_used,
            "used_bytes": st["used_bytes"] + image_used,
            "mover_bytes_per_second": round(self._mover_rate),
            "image_moved_bytes": st["image_moved_bytes"],
            "image_preserved_blocks": st["image_cbw_blocks"],
            "image_current": bool(st["image_current"]),
            "image_error": os.strerror(st["image_error"]) if st["image_error"] else None,
        }


def _check_journal(p: Path, params: Params) -> Path:
    """The change-log directory of an image volume, checked before anything is opened: it
    exists, and it is this volume's (DIR/owner names the uuid)."""
    j = Path(params.journal)
    try:
        owner = (j / JOURNAL_OWNER).read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"the change log {j} of volume {p} is missing (or not a blockrep change log): "
                       "mount its disk, or restore the volume from a snapshot") from None
    except PermissionError:
        raise InvalidArgument(f"cannot read the change log {j}: permission denied") from None
    except OSError as e:
        raise from_errno(e.errno or _errno.EIO, f"cannot read the change log {j}: {e.strerror}") from None
    if owner != params.uuid:
        raise CorruptionError(f"the change log {j} belongs to volume {owner[:36]!r}, not to {p} ({params.uuid}): "
                              "refusing to mix them")
    if not (p / IMAGE_FILE).is_file():
        raise NotFound(f"the image {p / IMAGE_FILE} of volume {p} is missing")
    return j


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes a volume directory takes on disk (for `info` while another process owns it)."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
