"""The DR side of replication, over NBD alone (no extra listener, so no extra attack surface).

A replicating primary drives a blockrep DR server through export names that start with "!"; they
reach the plugin's open() only after the NBD handshake, so when the DR server requires TLS-PSK
(`blockrep serve --tls-psk`) they are as authenticated as the data itself:

- `!commit@NAME`: create snapshot NAME of the DR head (which the primary has written and
  flushed); opening it again after a lost reply is harmless. Then serves NAME read-only.
- `!delete@NAME`: delete DR snapshot NAME (the primary's --keep-remote); an empty export.
- `!sums@NAME`: a read-only export of SUM_BYTES-byte BLAKE2b digests, one per SUM_CHUNK of
  snapshot NAME, computed on read: `blockrep verify` compares them with the primary's, so only
  checksums cross the network.

A DR snapshot therefore exists only after the primary has shipped and flushed its whole delta:
an interrupted transfer never commits, and earlier DR snapshots are never written to.
"""

from __future__ import annotations

import hashlib

from .errors import InvalidArgument, ReadOnly
from .volume import Volume, validate_snapshot_name

SUM_CHUNK = 1 << 20
SUM_BYTES = 16
EMPTY = -1


def sums_size(vol: Volume) -> int:
    return (vol.size + SUM_CHUNK - 1) // SUM_CHUNK * SUM_BYTES


def chunk_sum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=SUM_BYTES).digest()


def open_command(vol: Volume, name: str, readonly: bool) -> int:
    verb, _, snap = name[1:].partition("@")
    validate_snapshot_name(snap)
    if verb == "sums":
        return -(vol.snapshot(snap)["id"] + 2)
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
