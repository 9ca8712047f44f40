"""The DR side of replication, over NBD alone (no extra listener, so no extra attack surface).

A replicating primary drives a blockrep DR server through export names that start with "!"; they
reach the plugin's open() only after the NBD handshake, so when the DR server requires TLS-PSK
(`blockrep serve --tls-psk`) they are as authenticated as the data itself:

- `!commit@NAME`: create snapshot NAME of the DR head (which the primary has written and
  flushed); opening it again after a lost reply is harmless. Then serves NAME read-only.
- `!delete@NAME`: delete DR snapshot NAME (the primary's --keep-remote); an empty export.
- `!sums@NAME`: a read-only export of SUM_BYTES-byte BLAKE2b digests, one per SUM_CHUNK of
  snapshot NAME (`!sums@` alone: of the head), computed on read: `blockrep verify` compares them
  with the primary's, and `replicate` checks the head's digests of every chunk it shipped before
  it commits, so only checksums cross the network.
- `!changes@BASE`: the extents the DR head changed since its snapshot BASE, as little-endian
  (offset u64, length u64) pairs: writes made at the DR site, which the next delta must undo.

A DR snapshot therefore exists only after the primary has shipped and flushed its whole delta:
an interrupted transfer never commits, and earlier DR snapshots are never written to.
"""

from __future__ import annotations

import hashlib
import itertools
import struct

from .errors import InvalidArgument, ReadOnly
from .volume import Volume, validate_snapshot_name

SUM_CHUNK = 1 << 20
SUM_BYTES = 16
# Plugin handles below 0: EMPTY; -(N + 2) the digests of map N (0 = head); <= BLOB_BASE a blob.
EMPTY = -1
BLOB_BASE = -1_000_000
_blobs: dict[int, bytes] = {}
_next_blob = itertools.count(0)


def sums_size(vol: Volume) -> int:
    return (vol.size + SUM_CHUNK - 1) // SUM_CHUNK * SUM_BYTES


def chunk_sum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=SUM_BYTES).digest()


def open_command(vol: Volume, name: str, readonly: bool) -> int:
    verb, _, snap = name[1:].partition("@")
    if verb == "sums" and snap == "":
        return -2  # the head
    validate_snapshot_name(snap)
    if verb == "sums":
        return -(vol.snapshot(snap)["id"] + 2)
    if verb == "changes":
        ext = vol.diff_ids(vol.snapshot(snap)["id"], 0)
        h = BLOB_BASE - next(_next_blob)
        _blobs[h] = b"".join(struct.pack("<QQ", o, n) for o, n in ext)
        return h
    if readonly:
        raise ReadOnly(f"export {name!r} changes the volume: open it read-write")
    if verb == "commit":
        existing = [s for s in vol.snapshots() if s["name"] == snap]
        return (existing[0] if existing else vol.snapshot_create(snap))["id"]
    if verb == "delete":
        if any(s["name"] == snap for s in vol.snapshots()):
            vol.snapshot_delete(snap)
        return EMPTY
    raise InvalidArgument(f"unknown DR command {verb!r}")


def handle_size(vol: Volume, h: int) -> int:
    if h == EMPTY:
        return 0
    if h <= BLOB_BASE:
        return len(_blobs.get(h, b""))
    return sums_size(vol)


def handle_pread(vol: Volume, h: int, buf, offset: int) -> None:
    if h <= BLOB_BASE:
        buf[:] = _blobs[h][offset:offset + len(buf)]
    else:
        read_sums(vol, -h - 2, buf, offset)


def handle_close(h: int) -> None:
    _blobs.pop(h, None)


def read_sums(vol: Volume, sid: int, buf, offset: int) -> None:
    """Fill buf with the digests in [offset, offset + len(buf)) of the checksum export."""
    first = offset // SUM_BYTES
    last = (offset + len(buf) - 1) // SUM_BYTES
    out = bytearray()
    for i in range(first, last + 1):
        o = i * SUM_CHUNK
        out += chunk_sum(vol.snapshot_read(sid, min(SUM_CHUNK, vol.size - o), o))
    skip = offset - first * SUM_BYTES
    buf[:] = out[skip:skip + len(buf)]
