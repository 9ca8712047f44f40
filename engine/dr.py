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
# Plugin handles below 0: EMPTY; blobs in (-2^40, BLOB_BASE]; checksum exports below (_sums_handle).
EMPTY = -1
BLOB_BASE = -1_000_000
_blobs: dict[int, bytes] = {}
_next_blob = itertools.count(0)


DELTA_SHIFT = 16  # `replicate` checks deltas in 64 KiB chunks: scattered changes stay cheap to hash
_ID_BITS = 40  # a checksum handle is -(2 + map id + (chunk shift << _ID_BITS))


def sums_size(vol: Volume, shift: int = 20) -> int:
    chunk = 1 << shift
    return (vol.size + chunk - 1) // chunk * SUM_BYTES


def _sums_handle(map_id: int, shift: int) -> int:
    return -(2 + map_id + (shift << _ID_BITS))


def _sums_of(h: int) -> tuple[int, int]:
    x = -h - 2
    return x & ((1 << _ID_BITS) - 1), (x >> _ID_BITS) or 20


def chunk_sum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=SUM_BYTES).digest()


def open_command(vol: Volume, name: str, readonly: bool) -> int:
    verb, _, snap = name[1:].partition("@")
    verb, _, shift_s = verb.partition(":")  # "sums:16" = digests of 64 KiB chunks
    if verb == "sums":
        shift = int(shift_s) if shift_s.isdigit() else 20
        if not 12 <= shift <= 30:
            raise InvalidArgument(f"checksum chunk 2^{shift} out of range")
        if snap == "":
            return _sums_handle(0, shift)  # the head
        return _sums_handle(vol.snapshot(validate_snapshot_name(snap))["id"], shift)
    validate_snapshot_name(snap)
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
    if h <= BLOB_BASE and h > -(1 << _ID_BITS):
        return len(_blobs.get(h, b""))
    return sums_size(vol, _sums_of(h)[1])


def handle_pread(vol: Volume, h: int, buf, offset: int) -> None:
    if BLOB_BASE >= h > -(1 << _ID_BITS):
        buf[:] = _blobs[h][offset:offset + len(buf)]
    else:
        map_id, shift = _sums_of(h)
        read_sums(vol, map_id, buf, offset, 1 << shift)


def handle_close(h: int) -> None:
    _blobs.pop(h, None)


def read_sums(vol: Volume, sid: int, buf, offset: int, chunk: int = SUM_CHUNK) -> None:
    """Fill buf with the digests in [offset, offset + len(buf)) of the checksum export."""
    first = offset // SUM_BYTES
    last = (offset + len(buf) - 1) // SUM_BYTES
    out = bytearray()
    for i in range(first, last + 1):
        o = i * chunk
        out += chunk_sum(vol.snapshot_read(sid, min(chunk, vol.size - o), o))
    skip = offset - first * SUM_BYTES
    buf[:] = out[skip:skip + len(buf)]
