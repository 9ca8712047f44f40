"""The DR protocol's shared words (docs/REPLICATION.md §2-3): export names, chunk sizes, digests,
the manifest encoding. Both sides import this module; it imports nothing of either side.

Parsing is strict: `parse` returns a Command or raises InvalidArgument, and accepts nothing the
table in REPLICATION.md §2 does not name.
"""

from __future__ import annotations

import hashlib
import re
import uuid as _uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import InvalidArgument
from .gfs import MAX_COUNT, PERIODS

PROTOCOL = 1
# What this DR takes beyond protocol 1, announced in the begin reply: "keep_gfs" = the commit's
# optional gfs= argument. A primary sends an optional argument only to a DR that announces it
# (an older DR refuses any argument it does not know).
FEATURES = ("keep_gfs",)
SUM_BYTES = 16
DELTA_SHIFT = 16  # incremental manifests and delta checks: 64 KiB chunks (scattered deltas stay cheap)
FULL_SHIFT = 20  # seed, rebase and verify: 1 MiB chunks
MIN_SHIFT, MAX_SHIFT = DELTA_SHIFT, FULL_SHIFT  # a digest covers at most 1 MiB: bounded memory per read
ENTRY = 24  # manifest entry: chunk index u64 LE + digest
MANIFEST_MAX = 1 << 30
MAX_NAME = 4096  # NBD's limit on export names

SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN_RE = re.compile(r"[0-9a-f]{32}")


def chunk_sum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=SUM_BYTES).digest()


@lru_cache(maxsize=64)
def zero_sum(length: int) -> bytes:
    """The digest of `length` zero bytes (a hole)."""
    return chunk_sum(bytes(length))


def nchunks(size: int, shift: int) -> int:
    return (size + (1 << shift) - 1) >> shift


# ---------------------------------------------------------------- export names

@dataclass(frozen=True)
class Command:
    verb: str  # hello sums changes begin data manifest commit abort
    snapshot: str | None = None  # sums (None: the head), changes
    shift: int = FULL_SHIFT  # sums
    args: dict = field(default_factory=dict)


# verb -> {argument: validator}; every argument is required unless OPTIONAL names it
def _uuid_arg(v: str | None) -> str:
    if v is None or not UUID_RE.fullmatch(v):
        raise InvalidArgument(f"not a uuid: {v!r}")
    return v


def _base_arg(v: str | None) -> str | None:
    return None if v == "none" else _uuid_arg(v)


def _token_arg(v: str | None) -> str:
    if v is None or not TOKEN_RE.fullmatch(v):
        raise InvalidArgument("token must be 32 lowercase hex digits")
    return v


def _name_arg(v: str | None) -> str:
    if v is None or not SNAPSHOT_NAME.fullmatch(v):
        raise InvalidArgument(f"invalid snapshot name {v!r}")
    return v


def _flag_arg(v: str | None) -> bool:
    if v not in ("0", "1"):
        raise InvalidArgument("flag must be 0 or 1")
    return v == "1"


def _int_arg(lo: int, hi: int):
    def conv(v: str | None) -> int:
        if v is None or not (v.isascii() and v.isdigit()) or len(v) > 20 or not lo <= int(v) <= hi:
            raise InvalidArgument(f"number out of range {lo}..{hi}: {v!r}")
        return int(v)
    return conv


def _keep_arg(v: str | None) -> int | None:
    return None if v == "none" else _int_arg(1, 1 << 20)(v)


def _gfs_arg(v: str | None) -> dict[str, int]:
    """`hourly:24,daily:7,weekly:4,monthly:12`: each period at most once, in any order, counts
    1..MAX_COUNT, at least one; the periods not named are 0."""
    out = dict.fromkeys(PERIODS, 0)
    seen = set()
    for part in (v or "").split(","):
        period, colon, n = part.partition(":")
        if not colon or period not in out or period in seen:
            raise InvalidArgument(f"bad GFS count {part[:40]!r} (expected PERIOD:N, PERIOD one of "
                                  f"{', '.join(PERIODS)}, each at most once)")
        seen.add(period)
        out[period] = _int_arg(1, MAX_COUNT)(n)
    return out


def gfs_text(counts: dict | None) -> str | None:
    """The gfs= value of GFS counts (zero counts left out), None when every count is zero."""
    text = ",".join(f"{p}:{counts[p]}" for p in PERIODS if counts and counts.get(p))
    return text or None


ARGS: dict[str, dict[str, Any]] = {
    "begin": {"primary": _uuid_arg, "snap": _uuid_arg, "name": _name_arg, "base": _base_arg,
              "token": _token_arg, "force": _flag_arg},
    "data": {"token": _token_arg},
    "manifest": {"token": _token_arg},
    "commit": {"token": _token_arg, "entries": _int_arg(0, MANIFEST_MAX // ENTRY),
               "shift": _int_arg(MIN_SHIFT, MAX_SHIFT), "keep": _keep_arg, "gfs": _gfs_arg},
    "abort": {"token": _token_arg},
    "restore": {"token": _token_arg},  # the live head, for the holder of head_exclusive (backseed.py)
}
OPTIONAL: dict[str, frozenset[str]] = {"commit": frozenset({"gfs"})}  # newer than protocol 1: FEATURES


def parse(name: str) -> Command:
    """The command an export name starting with "!" asks for (InvalidArgument otherwise)."""
    if len(name) > MAX_NAME or not name.startswith("!"):
        raise InvalidArgument("not a DR command")
    body = name[1:]
    if body == "hello":
        return Command("hello")
    m = re.fullmatch(r"sums:([0-9]{1,2})@([A-Za-z0-9._-]{0,64})", body, re.ASCII)
    if m:
        shift = int(m.group(1))
        if not MIN_SHIFT <= shift <= MAX_SHIFT:
            raise InvalidArgument(f"checksum chunk 2^{shift} out of range")
        return Command("sums", m.group(2) or None, shift)
    m = re.fullmatch(r"changes@([A-Za-z0-9._-]{1,64})", body, re.ASCII)
    if m:
        return Command("changes", m.group(1))
    verb, sep, query = body.partition("?")
    spec = ARGS.get(verb)
    if spec is None or not sep:
        raise InvalidArgument(f"unknown DR command {body[:40]!r}")
    got: dict[str, str] = {}
    for part in query.split("&"):
        k, eq, v = part.partition("=")
        if not eq or k not in spec or k in got:
            raise InvalidArgument(f"bad argument {part[:40]!r} for {verb}")
        got[k] = v
    missing = set(spec) - set(got) - OPTIONAL.get(verb, frozenset())
    if missing:
        raise InvalidArgument(f"{verb} needs {', '.join(sorted(missing))}")
    return Command(verb, args={k: conv(got[k]) for k, conv in spec.items() if k in got})


def build(verb: str, **args) -> str:
    """The export name of a command with arguments (the inverse of parse for those verbs). An
    OPTIONAL argument that is None (or missing) is left out, so the name is what protocol 1 sent."""
    def text(v):
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "1" if v else "0"
        return str(v)
    values = {k: gfs_text(v) if isinstance(v, dict) else v for k, v in args.items()}
    opt = OPTIONAL.get(verb, frozenset())
    name = "!" + verb + "?" + "&".join(f"{k}={text(values[k])}" for k in ARGS[verb]
                                       if k not in opt or values.get(k) is not None)
    parse(name)  # never send what the other side would refuse
    return name


def sums_export(snapshot: str | None, shift: int) -> str:
    return f"!sums:{shift}@{snapshot or ''}"


def new_token() -> str:
    import secrets
    return secrets.token_hex(16)


def canonical_uuid(u: str) -> str:
    return str(_uuid.UUID(u))


# ---------------------------------------------------------------- manifest

def encode_manifest(entries: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for idx, digest in entries:
        out += idx.to_bytes(8, "little") + digest
    return bytes(out)


def decode_manifest(data: bytes, nchunk: int) -> dict[int, bytes]:
    """index -> digest; InvalidArgument unless sorted, unique and inside the volume."""
    if len(data) % ENTRY:
        raise InvalidArgument("manifest length is not a multiple of 24")
    out: dict[int, bytes] = {}
    prev = -1
    for i in range(0, len(data), ENTRY):
        idx = int.from_bytes(data[i:i + 8], "little")
        if idx <= prev or idx >= nchunk:
            raise InvalidArgument(f"manifest entry {i // ENTRY} out of order or beyond the volume")
        out[idx] = bytes(data[i + 8:i + ENTRY])
        prev = idx
    return out
