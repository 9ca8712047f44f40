"""volume.json (docs/FORMAT.md §1, docs/IMAGE.md §1): what a volume is, checked field by field;
creating a volume of either backend; snapshot names. Written once at create, atomically."""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import json
import os
import re
import stat
import uuid as _uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import (
    AlreadyExists,
    BlockrepError,
    CorruptionError,
    InvalidArgument,
    NotFound,
    UnsupportedFormat,
    from_errno,
)
from ..limits import BLOCK, MAX_SIZE, SEGMENT_MAX, SEGMENT_MIN  # defined once, checked against C

FORMAT_NAME = "blockrep-volume"
FORMAT_VERSION = 1

DEFAULT_SEGMENT = 32 << 20
BACKENDS = ("lsfs", "image")
JOURNAL_SIZE_MIN, JOURNAL_SIZE_MAX = 4 << 20, 1 << 40  # --journal-size bounds
DEFAULT_JOURNAL_SIZE = 1 << 30  # image backend: head data the change log holds before writes wait
IMAGE_FILE = "image.raw"
JOURNAL_OWNER = "owner"
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


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


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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


def _check_new_dir(d: Path, what: str, not_empty: str, parent: str) -> None:
    """A directory create may fill: absent (under an existing parent) or empty."""
    if d.exists():
        if not d.is_dir():
            raise AlreadyExists(f"{what}{d} exists and is not a directory")
        if any(d.iterdir()):
            raise AlreadyExists(not_empty)
    elif not d.parent.is_dir():
        raise NotFound(parent)


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
        if journal_size and not JOURNAL_SIZE_MIN <= journal_size <= JOURNAL_SIZE_MAX:
            raise InvalidArgument("journal size must be between 4M and 1T")
    elif journal or journal_size:
        raise InvalidArgument("--journal and --journal-size apply to the image backend (--backend image)")
    if compress not in ("none", "zstd"):
        raise InvalidArgument(f"unknown compression {compress!r} (choose none or zstd)")
    if not SEGMENT_MIN <= segment_size <= SEGMENT_MAX:
        raise InvalidArgument("segment size must be between 1M and 256M")
    _check_new_dir(p, "", f"{p} already exists and is not empty", f"parent directory {p.parent} does not exist")
    jdir = Path(os.path.abspath(journal)) if backend == "image" and journal else None
    if jdir is not None:
        if jdir == p.resolve() or p.resolve() in jdir.parents:
            raise InvalidArgument(f"the change log {jdir} must not be inside the volume directory {p}")
        _check_new_dir(jdir, "change-log path ", f"change-log directory {jdir} is not empty (a change log serves "
                       "one volume)", f"parent directory {jdir.parent} of the change log does not exist")
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
            _fsync_dir(jdir.parent)  # the change log's name is durable before volume.json names it
            with open(p / IMAGE_FILE, "xb") as f:  # sparse: costs nothing until the mover writes
                f.truncate(size)
                os.fsync(f.fileno())
        _atomic_write(p / "volume.json", (json.dumps(asdict(params), indent=2) + "\n").encode())
        _fsync_dir(p.resolve().parent)  # the volume directory itself survives a power cut after create
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
            _int_field("journal_size", params.journal_size, JOURNAL_SIZE_MIN, JOURNAL_SIZE_MAX)
    if params.block_size != BLOCK or isinstance(params.block_size, bool):
        raise InvalidArgument(f"block_size is {params.block_size!r}, expected {BLOCK}")
    validate_granularity(_int_field("granularity", params.granularity, BLOCK, 1 << 30))
    if params.compress not in ("none", "zstd"):
        raise InvalidArgument(f"compress is {params.compress!r}, expected none or zstd")
    _int_field("segment_size", params.segment_size, SEGMENT_MIN, SEGMENT_MAX)
    if not isinstance(params.created, str):
        raise InvalidArgument(f"created is {params.created!r}, expected an ISO 8601 time")


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
    try:
        st = os.lstat(p / IMAGE_FILE)
    except FileNotFoundError:
        raise NotFound(f"the image {p / IMAGE_FILE} of volume {p} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptionError(f"the image {p / IMAGE_FILE} is not a regular file (a symbolic link?): refused, "
                              "writes must not be redirected")
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
