"""Digests of snapshots and DR heads, compared without moving data (DESIGN M9, issue 7 §6).

A blockrep server serves `!sums:S@NAME` (protocol.py): 16 bytes per 2^S-byte chunk, holes
hashed without reading. Other servers are read here in bounded requests, holes skipped by block
status. Arrays of digests are compared with numpy.
"""

from __future__ import annotations

import numpy as np

from . import protocol as P
from .nbdio import block_status, connection, pread

READ_STEP = 2 << 20  # digests per request: 32 MiB of digests, at most


def runs_of(chunks: list[int]) -> list[tuple[int, int]]:
    """Consecutive chunk indices as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for i in chunks:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def chunk_array(extents: list[tuple[int, int]], shift: int) -> np.ndarray:
    """Sorted unique indices (uint64) of the 2^shift-byte chunks the extents touch."""
    parts = [np.arange(o >> shift, ((o + n - 1) >> shift) + 1, dtype=np.uint64) for o, n in extents if n]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def chunks_of(extents: list[tuple[int, int]], shift: int) -> list[int]:
    """The same as a list of ints."""
    return chunk_array(extents, shift).tolist()


def blockrep_sums(uri: str, snapshot: str | None, shift: int, runs: list[tuple[int, int]] | None,
                  size: int) -> bytes:
    """Digests from a blockrep server's checksum export, of the given chunk runs (None: all)."""
    if runs is None:
        runs = [(0, P.nchunks(size, shift))]
    out = bytearray()
    with connection(uri, P.sums_export(snapshot, shift), meta=False) as h:
        for first, count in runs:
            for f in range(first, first + count, READ_STEP):
                n = min(READ_STEP, first + count - f)
                out += pread(h, n * P.SUM_BYTES, f * P.SUM_BYTES)
    return out  # type: ignore[return-value]  # a bytearray: no second copy of 256 MiB of digests


def nbd_sums(uri: str, shift: int, size: int, runs: list[tuple[int, int]] | None = None) -> bytes:
    """Digests of any NBD export, read here (holes by block status are not read)."""
    if runs is None:
        runs = [(0, P.nchunks(size, shift))]
    out = bytearray()
    with connection(uri) as h:
        have = h.get_size()
        for first, count in runs:
            lo, hi = first << shift, min((first + count) << shift, size)
            data = np.zeros(count, dtype=bool)
            for o, n, zero in block_status(h, lo, max(0, min(hi, have) - lo)):
                if not zero:
                    data[(o >> shift) - first:((o + n - 1) >> shift) - first + 1] = True
            for k in range(count):
                off = (first + k) << shift
                n = min(1 << shift, size - off)
                if off + n > have:  # the export is shorter: it cannot equal
                    out += b"\xff" * P.SUM_BYTES
                elif data[k]:
                    out += P.chunk_sum(pread(h, n, off))
                else:
                    out += P.zero_sum(n)
    return bytes(out)


def differing(a: bytes, b: bytes) -> np.ndarray:
    """Positions (in digests) where two digest strings differ."""
    va = np.frombuffer(a, dtype="V16")
    vb = np.frombuffer(b, dtype="V16")
    if len(va) != len(vb):
        raise ValueError("digest lists of different lengths")
    return np.flatnonzero(va != vb)


def positions_to_chunks(runs: list[tuple[int, int]], positions: np.ndarray) -> list[int]:
    """Chunk indices of positions in the concatenation of runs."""
    starts = np.cumsum([0] + [c for _, c in runs])
    firsts = np.array([f for f, _ in runs] or [0], dtype=np.int64)
    k = np.searchsorted(starts, positions, side="right") - 1
    return (firsts[k] + (positions - starts[k])).astype(np.int64).tolist()


def indices_of_runs(runs: list[tuple[int, int]]) -> np.ndarray:
    """Every chunk index of the runs, in order (uint64)."""
    if not runs:
        return np.zeros(0, dtype="<u8")
    return np.concatenate([np.arange(f, f + c, dtype="<u8") for f, c in runs])


def coalesce(chunks: list[int], shift: int, size: int) -> list[tuple[int, int]]:
    """Byte extents of chunk indices, coalesced."""
    return [(f << shift, min(c << shift, size - (f << shift))) for f, c in runs_of(chunks)]
