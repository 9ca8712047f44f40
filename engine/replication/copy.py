"""Ship extents from a source NBD export to a target NBD export, many requests in flight.

Notes on the design (the nbdcopy model: endpoints plus a planner):
- Endpoints are libnbd connections: the source is the primary's snapshot export (`@NAME`, served
  by the primary's own server), the target any NBD server. `workers` threads each own one source
  and one target connection and copy chunks (<= CHUNK bytes) from a shared queue; libnbd releases
  the GIL while it waits, so the threads overlap network round trips (a 100 Mbit/s link with 20 ms
  per request needs ~16 requests in flight to fill, perf-baseline.md).
- Per chunk: block status on the source; holes go as write-zeroes (the target may trim), data is
  read and, when a base export is given, compared block by block with the base snapshot's bytes:
  blocks equal to the base are not sent (rewrite suppression), the rest go as writes.
- Progress is confirmed in order: a chunk counts as done only once every chunk before it is
  written and a flush on every target connection returned. `done_upto` (bytes of the plan) is
  persisted by the caller so an interrupted run resumes without re-sending confirmed chunks.
- A token bucket caps bytes per second across all workers (`rate`).
- Errors: TransferError, with `transient` telling the caller whether retrying may help.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nbd

from .errors import BlockrepError

CHUNK = 1 << 20
BLOCK = 4096


class TransferError(BlockrepError):
    """The copy failed; `transient` (link loss, server gone) means a retry may succeed."""

    def __init__(self, msg: str, transient: bool = True):
        super().__init__(msg)
        self.transient = transient


def connect(uri: str, export: str | None = None) -> nbd.NBD:
    """A libnbd connection to uri, or to another export of the same server."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-psk-file= in nbds:// URIs
    h.set_full_info(True)  # ask for the export description (how a blockrep DR is recognised)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        if export is None:
            h.connect_uri(uri)
        else:
            h.set_opt_mode(True)
            h.connect_uri(uri)
            h.set_export_name(export)
            h.opt_go()
    except nbd.Error as e:
        where = f"{uri}" + (f" (export {export!r})" if export is not None else "")
        raise TransferError(f"cannot connect to {where}: {e.string}") from None
    return h


class RateLimiter:
    """Paces writes so that the bytes released by time T never exceed rate x T: each caller waits
    until the link time of its own bytes has passed (no initial burst of a whole chunk, which on
    a slow link would saturate it for seconds)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.lock = threading.Lock()
        self.next = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.next = max(now, self.next) + n / self.rate
            until = self.next
        if until > now:
            time.sleep(until - now)


@dataclass
class Stats:
    bytes_sent: int = 0      # payload written to the target
    bytes_zeroed: int = 0    # ranges sent as write-zeroes
    bytes_skipped: int = 0   # equal to the base: not sent
    bytes_done: int = 0      # plan bytes handled
    extents: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_zeroed": self.bytes_zeroed,
                "bytes_skipped": self.bytes_skipped, "extents": self.extents,
                "seconds": round(time.monotonic() - self.started, 3)}


ZERO_CHUNK = 1 << 30  # a hole is sent as write-zeroes commands of up to 1 GiB


def plan_chunks(src, extents: list[tuple[int, int]], start: int = 0) -> list[tuple[int, int, int, bool]]:
    """Cut extents into (plan_offset, offset, length, is_zero) chunks: data in pieces of at most
    CHUNK bytes, holes (block status of the source) in pieces of at most ZERO_CHUNK. plan_offset
    counts bytes of the plan, for resuming; the first `start` plan bytes are skipped."""
    out, pos = [], 0
    for off, length in extents:
        o = off
        for ext_len, flags in _block_status(src, off, length):
            zero = bool(flags & nbd.STATE_ZERO)
            step = ZERO_CHUNK if zero else CHUNK
            end = o + ext_len
            while o < end:
                n = min(step, end - o)
                if pos + n > start:
                    out.append((pos, o, n, zero))
                pos += n
                o += n
    return out


def copy_extents(source_uri: str, source_export: str, target_uri: str, target_export: str | None,
                 extents: list[tuple[int, int]], *, base_export: str | None = None, workers: int = 8,
                 rate: float | None = None, resume_from: int = 0,
                 on_progress: Callable[[Stats, int], None] | None = None) -> Stats:
    """Copy `extents` of the source export to the same offsets of the target. Returns Stats.
    on_progress(stats, done_upto) is called whenever the confirmed prefix of the plan grows."""
    planner = connect(source_uri, source_export)
    try:
        chunks = plan_chunks(planner, extents, resume_from)
    except nbd.Error as e:
        raise TransferError(f"cannot read the block status of {source_export!r}: {e.string}") from None
    finally:
        _close(planner)
    # A target that does not advertise multi-conn may serve one connection at a time (qemu-nbd's
    # default --shared=1 does): the other workers' connections would wait forever. Use one there.
    probe = connect(target_uri, target_export)
    try:
        if not probe.can_multi_conn():
            workers = 1
    finally:
        _close(probe)
    stats = Stats()
    limiter = RateLimiter(rate)
    work: queue.Queue = queue.Queue()
    for c in chunks:
        work.put(c)
    done: dict[int, int] = {}  # plan_offset -> length, finished but not yet confirmed
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    conns = []

    def worker() -> None:
        try:
            src = connect(source_uri, source_export)
            dst = connect(target_uri, target_export)
            base = connect(source_uri, base_export) if base_export else None
        except BaseException as e:
            errors.append(e)
            stop.set()
            return
        conns.append(dst)
        can_zero = dst.can_zero()
        off = 0
        try:
            while not stop.is_set():
                try:
                    plan_off, off, n, zero = work.get_nowait()
                except queue.Empty:
                    break
                sent = zeroed = skipped = 0
                if zero:
                    if can_zero:
                        dst.zero(n, off)
                    else:
                        for o in range(off, off + n, CHUNK):
                            dst.pwrite(bytes(min(CHUNK, off + n - o)), o)
                    zeroed = n
                else:
                    data = src.pread(n, off)
                    runs = [(0, n)]
                    if base is not None:
                        runs = _differing_runs(data, base.pread(n, off))
                        skipped = n - sum(r[1] for r in runs)
                    for r_off, r_len in runs:
                        limiter.take(r_len)
                        dst.pwrite(data[r_off:r_off + r_len], off + r_off)
                        sent += r_len
                with lock:
                    stats.bytes_sent += sent
                    stats.bytes_zeroed += zeroed
                    stats.bytes_skipped += skipped
                    stats.extents += 1
                    stats.bytes_done += n
                    done[plan_off] = n
        except nbd.Error as e:
            errors.append(TransferError(f"transfer failed at offset {off}: {e.string}"))
            stop.set()
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(chunks) or 1)))]
    for t in threads:
        t.start()
    confirmed = resume_from
    last_confirm = time.monotonic()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
            if on_progress and time.monotonic() - last_confirm > 5 and not errors:
                try:
                    confirmed = _confirm(conns, done, confirmed, lock)
                except TransferError as e:  # the target went away: stop the workers, report it
                    errors.append(e)
                    stop.set()
                    continue
                on_progress(stats, confirmed)
                last_confirm = time.monotonic()
        if errors:
            first = errors[0]
            raise first if isinstance(first, BlockrepError) else TransferError(str(first))
        confirmed = _confirm(conns, done, confirmed, lock)
        if on_progress:
            on_progress(stats, confirmed)
    finally:
        for c in conns:
            _close(c)
    return stats


def _confirm(conns, done: dict[int, int], confirmed: int, lock) -> int:
    """Flush every target connection, then advance the confirmed prefix over finished chunks.
    A target that cannot flush (e.g. nbd-server without `flush = true`) writes through: its
    completed writes are as durable as they will get."""
    with lock:
        snapshot = dict(done)
    try:
        for c in list(conns):
            if c.can_flush():
                c.flush()
    except nbd.Error as e:
        raise TransferError(f"flush failed: {e.string}") from None
    while confirmed in snapshot:
        n = snapshot[confirmed]
        with lock:
            done.pop(confirmed, None)
        confirmed += n
    return confirmed


def _close(h) -> None:
    try:
        h.shutdown()
    except nbd.Error:
        pass


def _block_status(h, off: int, n: int) -> list[tuple[int, int]]:
    """(length, flags) covering [off, off+n) on the source, coalesced."""
    out: list[tuple[int, int]] = []
    pos = off
    while pos < off + n:
        got: list[tuple[int, int]] = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend((entries[i], entries[i + 1]) for i in range(0, len(entries), 2))
            return 0
        h.block_status(off + n - pos, pos, cb)
        if not got:
            got = [(off + n - pos, 0)]
        for length, flags in got:
            length = min(length, off + n - pos)
            if length <= 0:
                break
            f = flags & nbd.STATE_ZERO
            if out and out[-1][1] == f:
                out[-1] = (out[-1][0] + length, f)
            else:
                out.append((length, f))
            pos += length
            if pos >= off + n:
                break
    return out


def _differing_runs(data: bytes, base: bytes) -> list[tuple[int, int]]:
    """(offset, length) runs of 4 KiB blocks where data differs from base."""
    runs: list[tuple[int, int]] = []
    mv, bv = memoryview(data), memoryview(base)
    for o in range(0, len(data), BLOCK):
        if mv[o:o + BLOCK] != bv[o:o + BLOCK]:
            if runs and runs[-1][0] + runs[-1][1] == o:
                runs[-1] = (runs[-1][0], runs[-1][1] + min(BLOCK, len(data) - o))
            else:
                runs.append((o, min(BLOCK, len(data) - o)))
    return runs
