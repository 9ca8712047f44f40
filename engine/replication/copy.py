"""Ship extents from a source NBD export to a target NBD export, many requests in flight.

Notes on the design (nbdcopy's model, copy/multi-thread-copying.c, in one Python thread):
- Endpoints are libnbd connections: the source is the primary's snapshot export (`@NAME`), the
  target any NBD server. A *lane* is one source connection, one target connection and, with
  rewrite suppression, one connection to the base snapshot. Every lane keeps up to `in_flight`
  chunks in progress with libnbd's asynchronous API (aio_pread / aio_pwrite / aio_zero /
  aio_flush); one event loop polls every lane's sockets and moves each chunk along
  read -> (compare with the base) -> write(s) -> done. The GIL is released while libnbd
  sends, receives and polls; the Python per request is a few calls.
- `connections` lanes are opened before any data moves (over a slow link, a handshake made
  later waits behind the data queued on the link, and the loop with it); each chunk goes to the
  least busy lane. A target that does not advertise multi-conn (qemu-nbd's default; `nbdkit
  --filter=multi-conn multi-conn-mode=disable`) gets exactly one lane: a flush on one connection
  would not cover writes made on another, and such servers may serve one connection at a time.
  All `in_flight` requests go on that one.
- Data in flight is also capped in bytes (QUEUE_BYTES across all lanes, like nbdcopy's
  --queue-size): 4 x 64 x 1 MiB of buffers would be 256 MiB of memory touched for nothing (the
  request count, not the bytes, is what hides latency; measured, a 64 MiB cap was slower on
  loopback than 16 MiB). Full-size buffers are reused.
- The plan is made lazily, on a connection of its own, as lanes have room: block status of the
  source (nbdio.block_status, bounded requests) cuts each extent into data chunks of at most
  CHUNK bytes and holes of at most ZERO_CHUNK, sent as write-zeroes (the target may trim) or, if
  the target cannot zero, as writes of a shared zero buffer. Ascending extents close together
  (PLAN_SPAN, PLAN_GROUP) share one block status walk: thousands of scattered 4 KiB extents
  cost a few requests, not one round trip each. Each chunk has a plan offset (bytes
  of the extents before it): resuming skips the first `resume_from` plan bytes without asking
  the source about them. plan_chunks() returns the same plan as a list.
- Rewrite suppression: with a base export, a data chunk is read from the snapshot and from the
  base; 4 KiB blocks equal in both are not sent (numpy compares them).
- Progress is confirmed in plan order: a chunk counts as done only once every chunk before it
  is written and a flush on every target connection, issued after those writes completed,
  returned (a target that cannot flush writes through). `done_upto` goes to on_progress at most
  every PROGRESS_SECONDS while it grows and once at the end; the caller persists it so an
  interrupted run resumes without re-sending confirmed chunks.
- A rate cap holds each write until the link time of its own bytes has passed (no initial
  burst); the loop keeps polling meanwhile. The rate may be a function (the scheduler's rates by
  time of day): when it changes, the writes still held are booked again from now.
- A pause (`cancel`, a threading.Event: the window closed, the scheduler stops) starts nothing
  new, drops the writes the rate still holds, waits at most CANCEL_GRACE for the requests on the
  wire, flushes, reports the confirmed prefix through on_progress and raises Paused: the next run
  resumes after it (docs/SCHEDULE.md §3).
- Errors: the first failed request, broken connection or stall (no reply for STALL_SECONDS)
  raises TransferError, transient when a retry may help (nbdio.is_transient / errno_transient);
  every connection is then closed at once, dropping what was still in flight.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import nbd
import numpy as np

from ..errors import Paused
from . import nbdio
from .nbdio import TransferError, connect

__all__ = ["CHUNK", "ZERO_CHUNK", "RateLimiter", "Stats", "TransferError", "connect", "copy_extents",
           "plan_chunks"]

CHUNK = 1 << 20  # bytes of data per read/write request
ZERO_CHUNK = nbdio.ZERO_STEP  # bytes per write-zeroes request (1 GiB)
BLOCK = 4096  # granularity of rewrite suppression
QUEUE_BYTES = 16 << 20  # chunk data in flight across all lanes (base reads add as much again)
PROGRESS_SECONDS = 2.0  # at most this often: flush every target connection, call on_progress
CANCEL_GRACE = 3.0  # a pause waits at most this long for the requests on the wire
STALL_SECONDS = 300.0  # requests in flight and no reply for this long: the link is gone
PLAN_SPAN = 64 << 20  # nearby extents share one block status walk over at most this span...
PLAN_GROUP = 256  # ...and at most this many of them

_ZEROES = memoryview(bytes(CHUNK))  # the payload of zero chunks for targets that cannot zero
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_EVENTS = {nbd.AIO_DIRECTION_READ: select.POLLIN, nbd.AIO_DIRECTION_WRITE: select.POLLOUT,
           nbd.AIO_DIRECTION_BOTH: select.POLLIN | select.POLLOUT}
# command kinds, for completions and error messages
_READ, _BASE_READ, _WRITE, _ZERO, _FLUSH = range(5)
_WHAT = ("read from the source", "read from the base snapshot", "write to the target",
         "write-zeroes to the target", "flush of the target")


RateSpec = float | Callable[[], float | None] | None  # bytes/s, or asked at every write


class RateLimiter:
    """Paces writes so that the bytes released by time T never exceed rate x T: each write waits
    until the link time of its own bytes has passed (no initial burst of a whole chunk, which on
    a slow link would saturate it for seconds)."""

    def __init__(self, rate: RateSpec):
        # a callable is asked at every write: the scheduler's rates by time of day
        self._rate_fn = rate if callable(rate) else None
        self._rate = None if callable(rate) else rate
        self.lock = threading.Lock()
        self.next = time.monotonic()
        self.booked_rate: float | None = None  # the rate the last booking used

    @property
    def rate(self) -> float | None:
        return self._rate_fn() if self._rate_fn is not None else self._rate

    @property
    def dynamic(self) -> bool:
        return self._rate_fn is not None

    def reserve(self, n: int) -> float:
        """Book n bytes on the link; returns the monotonic time at which they may be sent."""
        rate = self.rate
        self.booked_rate = rate
        if not rate:
            return 0.0
        with self.lock:
            self.next = max(time.monotonic(), self.next) + n / rate
            return self.next

    def rebook(self, sizes: list[int]) -> list[float] | None:
        """When the rate changed since the last booking (a time-of-day rate), book again from
        now the writes still held back; None when it did not change."""
        rate = self.rate
        if rate == self.booked_rate:
            return None
        self.booked_rate = rate
        with self.lock:
            self.next = time.monotonic()
            out = []
            for n in sizes:
                self.next += n / rate if rate else 0.0
                out.append(self.next if rate else 0.0)
            return out

    def take(self, n: int) -> None:
        """reserve(n), then sleep until then."""
        delay = self.reserve(n) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@dataclass
class Stats:
    bytes_sent: int = 0      # data written to the target
    bytes_zeroed: int = 0    # ranges sent as write-zeroes (or as written zero buffers)
    bytes_skipped: int = 0   # equal to the base: not sent
    bytes_done: int = 0      # plan bytes handled
    extents: int = 0         # chunks handled
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_zeroed": self.bytes_zeroed,
                "bytes_skipped": self.bytes_skipped, "extents": self.extents,
                "seconds": round(time.monotonic() - self.started, 3)}


def _plan(src: nbd.NBD, extents: Iterable[tuple[int, int]], start: int) -> Iterator[tuple[int, int, int, bool]]:
    pos = 0
    group: list[tuple[int, int, int]] = []  # (plan offset, offset, length), ascending, one block status
    for off, length in extents:
        if pos + length <= start:
            pos += length  # before the resume point: not even block status is needed
            continue
        skip = max(0, start - pos)
        item = (pos + skip, off + skip, length - skip)
        pos += length
        if group and (item[1] < group[-1][1] + group[-1][2] or len(group) >= PLAN_GROUP
                      or item[1] + item[2] - group[0][1] > PLAN_SPAN):
            yield from _cut(src, group)
            group = []
        group.append(item)
    if group:
        yield from _cut(src, group)


def _cut(src: nbd.NBD, group: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, bool]]:
    """Chunks of a group of ascending extents, from one block status walk over their span
    (requests of at most STATUS_STEP, made as the walk goes)."""
    first = group[0][1]
    runs = nbdio.block_status(src, first, group[-1][1] + group[-1][2] - first)
    r_off, r_len, zero = next(runs)
    for pos, o, length in group:
        end = o + length
        while o < end:
            while r_off + r_len <= o:
                r_off, r_len, zero = next(runs)
            stop = min(end, r_off + r_len)
            step = ZERO_CHUNK if zero else CHUNK
            while o < stop:
                n = min(step, stop - o)
                yield pos, o, n, zero
                pos += n
                o += n


def plan_chunks(src: nbd.NBD, extents: list[tuple[int, int]], start: int = 0) -> list[tuple[int, int, int, bool]]:
    """Cut extents into (plan_offset, offset, length, is_zero) chunks: data in pieces of at most
    CHUNK bytes, holes (block status of the source) in pieces of at most ZERO_CHUNK. plan_offset
    counts bytes of the extents; the first `start` plan bytes are left out (a chunk across
    `start` begins there)."""
    return list(_plan(src, extents, start))


def _split_zeroes(chunks: Iterator[tuple[int, int, int, bool]]) -> Iterator[tuple[int, int, int, bool]]:
    """Holes in CHUNK pieces, for a target that cannot zero: one written zero buffer each."""
    for p, o, n, zero in chunks:
        if not zero or n <= CHUNK:
            yield p, o, n, zero
            continue
        for i in range(0, n, CHUNK):
            yield p + i, o + i, min(CHUNK, n - i), True


def _differing_runs(data: memoryview, base: memoryview) -> list[tuple[int, int]]:
    """(offset, length) runs of BLOCK-sized blocks (the last may be short) where data != base."""
    n = len(data)
    full = n // BLOCK
    d = np.frombuffer(data, np.uint64, full * BLOCK // 8)
    b = np.frombuffer(base, np.uint64, full * BLOCK // 8)
    differs = (d != b).reshape(full, BLOCK // 8).any(axis=1)
    if n % BLOCK:
        differs = np.append(differs, data[full * BLOCK:] != base[full * BLOCK:])
    if not differs.any():
        return []
    if differs.all():
        return [(0, n)]
    edges = np.flatnonzero(np.diff(differs.astype(np.int8), prepend=0, append=0)) * BLOCK
    starts, ends = edges[0::2], np.minimum(edges[1::2], n)
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


def _completed(out: deque, chunk, kind: int, err) -> int:
    out.append((chunk, kind, err.value))
    return 1  # retire the command


class _Lane:
    __slots__ = ("src", "dst", "base", "busy", "can_flush")

    def __init__(self, src, dst, base):
        self.src, self.dst, self.base = src, dst, base
        self.busy = 0  # chunks in progress
        self.can_flush = dst.can_flush()


def _busy(lane: _Lane) -> int:
    return lane.busy


class _Chunk:
    __slots__ = ("plan_off", "off", "n", "zero", "lane", "buf", "base", "waiting", "writing", "sent")

    def __init__(self, plan_off, off, n, zero, lane):
        self.plan_off, self.off, self.n, self.zero, self.lane = plan_off, off, n, zero, lane
        self.buf = self.base = None
        self.waiting = 0  # commands of the current phase still in flight
        self.writing = zero
        self.sent = 0


class _Copy:
    """One copy_extents call: the lanes, the plan being consumed, the chunks in flight."""

    def __init__(self, source_uri: str, source_export: str | None, target_uri: str, target_export: str | None,
                 base_export: str | None, connections: int, in_flight: int, rate: RateSpec,
                 on_progress: Callable[[Stats, int], None] | None) -> None:
        self.source = (source_uri, source_export)
        self.target = (target_uri, target_export)
        self.base_export = base_export
        self.max_lanes = max(1, connections)
        self.in_flight = max(1, in_flight)
        self.limiter = RateLimiter(rate)
        self.on_progress = on_progress
        self.stats = Stats()
        self.lanes: list[_Lane] = []
        self.can_zero = False  # the target's, learnt on the first connection
        self.conns: list[nbd.NBD] = []  # every connection opened, to close at the end
        self.poller = select.poll()
        self.by_fd: dict[int, list] = {}  # fd -> [handle, events registered, server's name]
        self.completions: deque = deque()
        self.held: deque = deque()  # (release time, chunk, view, offset): writes the rate holds back
        self.pool: list[memoryview] = []  # CHUNK-sized buffers to reuse
        self.queued = 0  # data bytes of chunks in progress
        self.active = 0  # chunks in progress
        self.finished: dict[int, int] = {}  # plan offset -> end, chunks done beyond the frontier
        self.flushes = 0  # flushes in flight
        self.flush_mark = -1  # the frontier when the flush round in flight began
        self.wire = 0  # commands sent and not yet answered
        self.last_reply = time.monotonic()
        self.stopping = False  # a pause began: no new writes

    # -- connections

    def _open(self, uri, export, meta=False) -> nbd.NBD:
        h = connect(uri, export, meta=meta)
        self.conns.append(h)
        return h

    def add_lane(self) -> _Lane:
        dst = self._open(*self.target)
        if not self.lanes:
            self.can_zero = dst.can_zero()
            if not dst.can_multi_conn():
                self.max_lanes = 1
        src = self._open(*self.source)
        base = self._open(self.source[0], self.base_export) if self.base_export else None
        lane = _Lane(src, dst, base)
        for h, (uri, export) in ((src, self.source), (dst, self.target), (base, (self.source[0], self.base_export))):
            if h is not None:
                self.by_fd[h.aio_get_fd()] = [h, 0, uri + (f" (export {export!r})" if export else "")]
        self.lanes.append(lane)
        return lane

    def close(self, ok: bool) -> None:
        for h in self.conns:
            (nbdio.close if ok else nbdio.abandon)(h)
        self.conns.clear()

    # -- requests

    def start(self, lane: _Lane, plan_off: int, off: int, n: int, zero: bool) -> None:
        c = _Chunk(plan_off, off, n, zero, lane)
        lane.busy += 1
        self.active += 1
        if zero:
            c.waiting = 1
            if self.can_zero:
                lane.dst.aio_zero(n, off, partial(_completed, self.completions, c, _ZERO))
                self.wire += 1
            else:
                self.send(c, _ZEROES[:n], off)
            return
        self.queued += n
        c.buf = self.buffer(n)
        c.waiting = 1
        lane.src.aio_pread(c.buf, off, partial(_completed, self.completions, c, _READ))
        self.wire += 1
        if lane.base is not None:
            c.base = self.buffer(n)
            c.waiting = 2
            lane.base.aio_pread(c.base, off, partial(_completed, self.completions, c, _BASE_READ))
            self.wire += 1

    def buffer(self, n: int) -> memoryview:
        if n == CHUNK and self.pool:
            return self.pool.pop()
        return memoryview(bytearray(n))

    def release(self, view: memoryview) -> None:
        if len(view) == CHUNK:
            self.pool.append(view)

    def send(self, c: _Chunk, view: memoryview, off: int) -> None:
        if self.stopping:  # pausing: this chunk is never finished, the next run sends it
            return
        at = self.limiter.reserve(len(view))
        if at:
            if at > time.monotonic() or self.held:
                self.held.append((at, c, view, off))
                return
        c.lane.dst.aio_pwrite(view, off, partial(_completed, self.completions, c, _WRITE))
        self.wire += 1

    def release_held(self, now: float) -> None:
        """Send the writes the rate held back whose time has come."""
        if self.held and self.limiter.dynamic:
            times = self.limiter.rebook([len(h[2]) for h in self.held])
            if times is not None:
                self.held = deque((t, c, v, o) for t, (_, c, v, o) in zip(times, self.held, strict=True))
        held = self.held
        while held and held[0][0] <= now:
            _, c, view, off = held.popleft()
            c.lane.dst.aio_pwrite(view, off, partial(_completed, self.completions, c, _WRITE))
            self.wire += 1

    def process(self) -> None:
        comp = self.completions
        while comp:
            c, kind, err = comp.popleft()
            self.wire -= 1
            if err:
                where = f" at offset {c.off} ({c.n} bytes)" if c is not None else ""
                raise nbdio.errno_error(_WHAT[kind] + where, err)
            if c is None:
                self.flushes -= 1
                continue
            c.waiting -= 1
            if c.waiting:
                continue
            if not c.writing:
                c.writing = True
                if c.base is not None:
                    runs = _differing_runs(c.buf, c.base)
                    self.release(c.base)
                    c.base = None
                else:
                    runs = [(0, c.n)]
                c.waiting = len(runs)
                for r_off, r_len in runs:
                    c.sent += r_len
                    self.send(c, c.buf[r_off:r_off + r_len], c.off + r_off)
                if runs:
                    continue
            self.finish(c)

    def finish(self, c: _Chunk) -> None:
        st = self.stats
        c.lane.busy -= 1
        self.active -= 1
        if c.zero:
            st.bytes_zeroed += c.n
        else:
            self.release(c.buf)
            self.queued -= c.n
            st.bytes_sent += c.sent
            st.bytes_skipped += c.n - c.sent
        st.bytes_done += c.n
        st.extents += 1
        self.finished[c.plan_off] = c.plan_off + c.n

    def flush_all(self) -> None:
        """Begin a flush round covering every chunk done so far (self.frontier)."""
        self.flush_mark = self.frontier
        for lane in self.lanes:
            if lane.can_flush:
                lane.dst.aio_flush(partial(_completed, self.completions, None, _FLUSH))
                self.flushes += 1
                self.wire += 1

    # -- the event loop

    def wait(self, timeout: float) -> None:
        """Poll every connection until one is ready or timeout seconds pass, let libnbd move the
        ready ones along, then act on the commands that completed."""
        poller, by_fd = self.poller, self.by_fd
        for fd, entry in by_fd.items():
            events = _EVENTS.get(entry[0].aio_get_direction() & nbd.AIO_DIRECTION_BOTH, select.POLLIN)
            if events != entry[1]:
                poller.register(fd, events)
                entry[1] = events
        ready = poller.poll(max(0, timeout) * 1000)
        for fd, ev in ready:
            h = by_fd[fd][0]
            if ev & _POLLIN:
                h.aio_notify_read()
            elif ev & select.POLLOUT:
                h.aio_notify_write()
            if h.aio_is_dead() or h.aio_is_closed():  # the server hung up with nothing in flight
                raise TransferError(f"{by_fd[fd][2]} closed the connection", transient=True)
        if self.completions:
            self.last_reply = time.monotonic()
            self.process()

    def _paused(self, msg: str) -> Paused:
        e = Paused(msg)
        e.bytes_sent = self.stats.bytes_sent  # type: ignore[attr-defined]
        return e

    def pause(self, confirmed: int, deadline: float) -> int:
        """One step of a pause; returns the confirmed prefix, raises Paused when it is over."""
        if not self.stopping:
            self.stopping = True
            self.held.clear()  # their chunks never finish: the next run sends them
        now = time.monotonic()
        if self.flushes == 0 and self.flush_mark >= 0:  # a flush round returned
            if self.flush_mark > confirmed:
                confirmed = self.flush_mark
                if self.on_progress:
                    self.on_progress(self.stats, confirmed)
            self.flush_mark = -1
            if self.frontier <= confirmed or self.wire:
                raise self._paused(f"paused after {confirmed} bytes of the plan")
        if self.flushes == 0 and self.wire == 0:
            if self.frontier <= confirmed:
                raise self._paused(f"paused after {confirmed} bytes of the plan")
            self.flush_all()
            return confirmed
        if now >= deadline:
            raise self._paused(f"paused after {confirmed} bytes of the plan (requests still on the wire dropped)")
        self.wait(min(0.1, deadline - now))
        return confirmed

    def run(self, chunks: Iterator[tuple[int, int, int, bool]], resume_from: int,
            cancel: threading.Event | None = None) -> Stats:
        self.add_lane()
        while len(self.lanes) < self.max_lanes:  # all before any data moves: a handshake queued
            self.add_lane()                      # behind a slow link's data would stall the loop
        lanes = self.lanes
        if not self.can_zero:
            chunks = _split_zeroes(chunks)
        pending = next(chunks, None)
        self.frontier = resume_from if pending is None else pending[0]
        confirmed = resume_from
        next_progress = time.monotonic() + PROGRESS_SECONDS
        final = False  # the last flush round has begun
        on_progress, in_flight = self.on_progress, self.in_flight
        deadline = 0.0
        while True:
            if cancel is not None and cancel.is_set():
                if not self.stopping:
                    deadline = time.monotonic() + CANCEL_GRACE
                while self.frontier in self.finished:
                    self.frontier = self.finished.pop(self.frontier)
                confirmed = self.pause(confirmed, deadline)
                continue
            # start chunks while a lane has room, on the least busy lane
            while pending is not None:
                lane = min(lanes, key=_busy)
                if lane.busy >= in_flight:
                    break
                if not pending[3] and self.queued and self.queued + pending[2] > QUEUE_BYTES:
                    break
                self.start(lane, *pending)
                pending = next(chunks, None)
            while self.frontier in self.finished:
                self.frontier = self.finished.pop(self.frontier)
            now = time.monotonic()
            if self.flushes == 0 and self.flush_mark >= 0:  # a flush round returned
                if self.flush_mark > confirmed or final:
                    confirmed = self.flush_mark
                    if on_progress:
                        on_progress(self.stats, confirmed)
                self.flush_mark = -1
                if final:
                    return self.stats
            if self.flushes == 0 and pending is None and self.active == 0:
                final = True
                self.flush_all()
                continue
            if on_progress and self.flushes == 0 and now >= next_progress and self.frontier > confirmed:
                next_progress = now + PROGRESS_SECONDS
                self.flush_all()
                continue
            if self.held:
                self.release_held(now)
            if self.wire == 0:
                self.last_reply = now
            timeout = self.last_reply + STALL_SECONDS - now
            if timeout <= 0:
                raise TransferError(f"no reply from the servers for {STALL_SECONDS:.0f} s", transient=True)
            if self.held:
                timeout = min(timeout, self.held[0][0] - now)
            if on_progress and self.flushes == 0 and self.frontier > confirmed:
                timeout = min(timeout, next_progress - now)
            if cancel is not None:
                timeout = min(timeout, 0.2)
            self.wait(timeout)


def copy_extents(source_uri: str, source_export: str, target_uri: str, target_export: str | None,
                 extents: list[tuple[int, int]], *, base_export: str | None = None, connections: int = 4,
                 in_flight: int = 64, rate: RateSpec = None, resume_from: int = 0,
                 on_progress: Callable[[Stats, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Stats:
    """Copy `extents` of the source export to the same offsets of the target; returns Stats.
    Up to `connections` lanes (one if the target lacks multi-conn), `in_flight` chunks in
    progress on each. With base_export, 4 KiB blocks equal to the base's are not sent.
    on_progress(stats, done_upto) is called whenever the confirmed prefix of the plan grows
    (at most every PROGRESS_SECONDS) and once at the end. Setting `cancel` pauses: Paused is
    raised once the confirmed prefix is saved (at most CANCEL_GRACE later)."""
    copy = _Copy(source_uri, source_export, target_uri, target_export, base_export, connections, in_flight,
                 rate, on_progress)
    planner = None
    ok = False
    try:
        planner = copy._open(source_uri, source_export, meta=True)
        stats = copy.run(_plan(planner, extents, resume_from), resume_from, cancel)
        ok = True
        return stats
    except nbd.Error as e:
        raise nbdio.error(f"copy from {source_uri} ({source_export!r}) to {target_uri}", e) from None
    finally:
        copy.close(ok)
