"""The replication copy loop (engine/replication/copy.py) against real NBD servers.

Every server here is a real `nbdkit` (file, memory) run as `nbdkit -U SOCK -f -P PIDFILE …` in the
background; what reached a server is counted by its filters: `--filter=stats statsfile=` (bytes and
ops per command, written at exit), `--filter=log logfile=` (every request with its connection, in
order: connections, requests in flight, offsets), `--filter=delay` (slow requests),
`--filter=multi-conn multi-conn-mode=disable` (a target like qemu-nbd's default),
`--filter=nozero` (a target that cannot zero), `--filter=error` (permanent faults). Transient
faults are SIGKILLs of a server. Structure is asserted (connections, requests in flight, bytes),
never speed; bench/replication_bench.py measures speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.replication import copy as C
from engine.replication import nbdio

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class Nbdkit:
    """`nbdkit -U SOCK -f -P PIDFILE [--filter=log --filter=stats] ARGS`, in the background."""

    def __init__(self, tmp: Path, name: str, args: list, log: bool = False, stats: bool = False,
                 threads: int | None = None):
        self.sock, self.pidfile = tmp / f"{name}.sock", tmp / f"{name}.pid"
        self.logfile, self.statsfile = tmp / f"{name}.log", tmp / f"{name}.stats"
        filters, params = [], []
        if log:
            filters.append("--filter=log")
            params.append(f"logfile={self.logfile}")
        if stats:
            filters.append("--filter=stats")
            params.append(f"statsfile={self.statsfile}")
        self.cmd = ["nbdkit", "-U", str(self.sock), "-f", "-P", str(self.pidfile),
                    *([f"--threads={threads}"] if threads else []), *filters, *map(str, args), *params]
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> Nbdkit:
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.cmd} exited: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.cmd} did not accept connections")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def export_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self, sig=signal.SIGTERM) -> None:
        """Stop by its own pid (SIGTERM: it writes its statsfile first) and wait for it."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stats(self) -> dict[str, dict]:
        """stats filter output -> {"write": {"ops": N, "bytes": B}, …}; stop() first. Sizes are
        printed with two decimals ("800.00 KiB"), so bytes are exact to within 0.5%."""
        self.stop()
        units = {"bytes": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
        out = {}
        for line in self.statsfile.read_text().splitlines():
            m = re.match(r"(\w+): (\d+) ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB|TiB)\b", line)
            if m:
                out[m.group(1)] = {"ops": int(m.group(2)), "bytes": round(float(m.group(3)) * units[m.group(4)])}
        return out

    def requests(self, op: str | None = None) -> list[dict]:
        """The log filter's lines, parsed: {"line", "conn", "op", "id", "end", "offset", "count"}."""
        out = []
        text = self.logfile.read_text() if self.logfile.exists() else ""
        for i, line in enumerate(text.splitlines()):
            m = re.search(r"connection=(\d+) (\.\.\.)?(\w+) id=(\d+)(.*)", line)
            if not m or (op and m.group(3) != op):
                continue
            r = {"line": i, "conn": int(m.group(1)), "end": bool(m.group(2)), "op": m.group(3),
                 "id": int(m.group(4)), "rest": m.group(5)}
            for k in ("offset", "count"):
                v = re.search(rf"\b{k}=(0x[0-9a-f]+)", m.group(5))
                if v:
                    r[k] = int(v.group(1), 16)
            out.append(r)
        return out

    def connections(self) -> set[int]:
        return {int(c) for c in re.findall(r"connection=(\d+) Connect ", self.logfile.read_text())}


def max_in_flight(reqs: list[dict]) -> dict[int, int]:
    """Per connection, the most requests the server was working on at the same time."""
    cur: dict[int, int] = {}
    best: dict[int, int] = {}
    for r in reqs:
        cur[r["conn"]] = cur.get(r["conn"], 0) + (-1 if r["end"] else 1)
        best[r["conn"]] = max(best.get(r["conn"], 0), cur[r["conn"]])
    return best


@pytest.fixture
def servers(tmp_path):
    """Factory for Nbdkit servers; every one still running is killed at teardown."""
    made: list[Nbdkit] = []

    def make(name: str, *args, **kw) -> Nbdkit:
        s = Nbdkit(tmp_path, name, list(args), **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        with contextlib.suppress(Exception):
            s.kill()


def sparse_image(path: Path, size: int, data: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in data.items():
            f.seek(off)
            f.write(b)
    return path


def approx(a: int, b: int) -> bool:
    """Equal within the stats filter's rounding (two decimals of the unit it prints)."""
    return abs(a - b) <= max(a, b) * 0.005


def sha256_of_export(u: str, tmp: Path, name: str) -> str:
    out = tmp / f"{name}.out"
    subprocess.run(["nbdcopy", u, str(out)], check=True, timeout=120)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_reexports_and_stats_shape():
    assert C.TransferError is nbdio.TransferError and C.connect is nbdio.connect
    st = C.Stats(bytes_sent=1, bytes_zeroed=2, bytes_skipped=3, bytes_done=6, extents=2)
    assert set(st.as_dict()) == {"bytes_sent", "bytes_zeroed", "bytes_skipped", "extents", "seconds"}


# ------------------------------------------------------------------------ data, holes, zeroes

LAYOUT = {0: 3 * MiB, 8 * MiB + 4 * KiB: 16 * KiB, 20 * MiB: 6 * MiB + 512 * KiB, 47 * MiB: MiB}  # offset: length
SIZE = 48 * MiB


@pytest.mark.parametrize("target_zeroes", [True, False], ids=["write-zeroes", "target-cannot-zero"])
def test_copy_equals_source_and_holes_become_zero_requests(servers, tmp_path, target_zeroes):
    rnd = random.Random(1)
    src_img = sparse_image(tmp_path / "src.img", SIZE, {o: rnd.randbytes(n) for o, n in LAYOUT.items()})
    data = sum(LAYOUT.values())
    # the target starts full of 0xff, so holes must really be written as zeroes
    tgt_img = tmp_path / "tgt.img"
    tgt_img.write_bytes(b"\xff" * SIZE)
    src = servers("src", "file", src_img)
    filters = [] if target_zeroes else ["--filter=nozero"]
    tgt = servers("tgt", *filters, "file", tgt_img, stats=True)
    progress = []
    st = C.copy_extents(src.uri, "", tgt.uri, None, [(0, SIZE)], on_progress=lambda s, d: progress.append(d))
    assert progress[-1] == SIZE and st.bytes_done == SIZE
    assert st.bytes_sent == data and st.bytes_zeroed == SIZE - data and st.bytes_skipped == 0
    counted = tgt.stats()
    holes = 3  # the gaps between the four data regions (the last one ends the export)
    if target_zeroes:
        assert approx(counted["write"]["bytes"], data)
        assert counted["zero"]["ops"] == holes  # one request per hole (each < 1 GiB)
        assert approx(counted["zero"]["bytes"], SIZE - data)
    else:
        assert "zero" not in counted
        assert approx(counted["write"]["bytes"], SIZE)  # zero buffers written, at most 1 MiB each
        assert counted["write"]["ops"] >= (SIZE - data) // MiB
    # the target reads back as the source, through NBD (nbdcopy) and in its file
    again = servers("again", "file", tgt_img)
    assert sha256_of_export(again.uri, tmp_path, "tgt") == hashlib.sha256(src_img.read_bytes()).hexdigest()
    assert tgt_img.read_bytes() == src_img.read_bytes()


def test_plan_and_copy_of_a_16_tib_export_use_bounded_requests(servers, tmp_path):
    size = 16 * TiB
    src = servers("src", "memory", size, log=True)
    marks = {0: os.urandom(MiB + 4 * KiB), 8 * TiB: os.urandom(4 * KiB), size - 4 * KiB: os.urandom(4 * KiB)}
    h = nbdio.connect(src.uri)
    for o, b in marks.items():
        h.pwrite(b, o)
    plan = C.plan_chunks(h, [(0, size)])
    nbdio.close(h)
    pos = 0
    for plan_off, off, n, zero in plan:
        assert plan_off == pos == off and 0 < n <= (C.ZERO_CHUNK if zero else C.CHUNK)
        pos += n
    assert pos == size
    data = [(off, n) for _, off, n, zero in plan if not zero]
    for o, b in marks.items():  # every byte written is in a data chunk
        assert sum(max(0, min(o + len(b), d + n) - max(o, d)) for d, n in data) == len(b), o
    assert sum(n for _, n in data) < 4 * MiB  # holes are holes, not data
    ext = src.requests("Extents")
    assert ext and all(r["count"] <= nbdio.STATUS_STEP for r in ext if not r["end"])
    # the copy of the whole 16 TiB: the marks as writes, the rest as write-zeroes of <= 1 GiB
    tgt = servers("tgt", "memory", size, stats=True)
    st = C.copy_extents(src.uri, "", tgt.uri, None, [(0, size)])
    counted = tgt.stats()
    assert st.bytes_sent == sum(n for _, n in data) and approx(counted["write"]["bytes"], st.bytes_sent)
    assert counted["zero"]["ops"] == sum(1 for *_, z in plan if z) >= size // C.ZERO_CHUNK
    assert st.bytes_zeroed == size - st.bytes_sent and approx(counted["zero"]["bytes"], st.bytes_zeroed)


def reference_plan(h, extents, start=0):
    """The plan made the plain way: one block status walk per extent."""
    out, pos = [], 0
    for off, length in extents:
        for o, n, zero in nbdio.block_status(h, off, length):
            step = C.ZERO_CHUNK if zero else C.CHUNK
            for i in range(0, n, step):
                m = min(step, n - i)
                if pos + m > start:
                    cut = max(0, start - pos)
                    out.append((pos + cut, o + i + cut, m - cut, zero))
                pos += m
    return out


def test_nearby_extents_share_block_status_and_plan_the_same(servers, tmp_path):
    """2,000 scattered extents (some across data/hole borders, some out of order) are planned
    with a handful of block status requests, chunk for chunk as one walk per extent would."""
    size = 256 * MiB
    rnd = random.Random(4)
    data = {rnd.randrange(size // (64 * KiB)) * 64 * KiB: os.urandom(rnd.choice([4, 16, 64]) * KiB)
            for _ in range(600)}
    data[100 * MiB] = os.urandom(5 * MiB)  # data longer than a chunk
    src = servers("src", "file", sparse_image(tmp_path / "src.img", size, data), log=True)
    offs = sorted(rnd.sample(range(size // (8 * KiB)), 2000))
    extents = [(o * 8 * KiB, rnd.choice([4, 8, 12]) * KiB) for o in offs]
    extents += [(99 * MiB, 8 * MiB), (0, 64 * KiB)]  # across the big data run; one out of order
    h = nbdio.connect(src.uri)
    for start in (0, 3 * MiB + 512):
        assert C.plan_chunks(h, extents, start) == reference_plan(h, extents, start)
    before = len([r for r in src.requests("Extents") if not r["end"]])
    C.plan_chunks(h, extents)
    nbdio.close(h)
    asked = len([r for r in src.requests("Extents") if not r["end"]]) - before
    # a walk per group of PLAN_GROUP extents, plus the continuations the server asks for by
    # answering a request only in part: a few dozen, not one per extent
    assert asked <= len(extents) // 20, asked


# --------------------------------------------------------------- many requests on each connection

def scattered_source(servers, tmp_path, n_blocks: int, step: int = 64 * KiB):
    """A source with n_blocks 4 KiB blocks of data, one every `step` bytes (each its own extent)."""
    size = n_blocks * step
    img = sparse_image(tmp_path / "src.img", size, {i * step: os.urandom(4 * KiB) for i in range(n_blocks)})
    return servers("src", "file", img), [(i * step, 4 * KiB) for i in range(n_blocks)], size, img


@pytest.mark.parametrize("multi_conn", [False, True], ids=["no-multi-conn", "multi-conn"])
def test_each_connection_keeps_many_requests_in_flight(servers, tmp_path, multi_conn):
    """256 writes with 50 ms each. Without multi-conn the target gets ONE connection carrying
    (nearly) all 64 requests at once; with it, 4 connections with many each. Counted by the log
    filter in front of the delay (nbdkit --threads=64 lets the server work on 64 at once)."""
    src, extents, size, _ = scattered_source(servers, tmp_path, 256)
    mc = ([], []) if multi_conn else (["--filter=multi-conn"], ["multi-conn-mode=disable"])
    tgt = servers("tgt", *mc[0], "--filter=delay", "memory", size, "delay-write=50ms", *mc[1], log=True, threads=64)
    st = C.copy_extents(src.uri, "", tgt.uri, None, extents)
    assert st.bytes_sent == 256 * 4 * KiB and st.extents == 256
    writes = tgt.requests("Write")
    assert len([w for w in writes if not w["end"]]) == 256
    peak = max_in_flight(writes)
    if multi_conn:
        assert len(tgt.connections()) == 4 == len(peak)
        assert min(peak.values()) >= 16, peak
    else:
        assert len(tgt.connections()) == 1 == len(peak), tgt.connections()
        assert max(peak.values()) >= 48, peak  # of 64


def test_connections_and_in_flight_are_configurable(servers, tmp_path):
    src, extents, size, _ = scattered_source(servers, tmp_path, 96)
    tgt = servers("tgt", "--filter=delay", "memory", size, "delay-write=20ms", log=True, threads=64)
    C.copy_extents(src.uri, "", tgt.uri, None, extents, connections=2, in_flight=8)
    peak = max_in_flight(tgt.requests("Write"))
    assert len(tgt.connections()) == 2 == len(peak)
    assert max(peak.values()) <= 8 and min(peak.values()) >= 4, peak


# -------------------------------------------------------------------------- resume, suppression

def test_resume_from_sends_nothing_before_it(servers, tmp_path):
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(16 * MiB))
    src = servers("src", "file", img, log=True)
    tgt = servers("tgt", "memory", 16 * MiB, log=True)
    extents = [(0, 4 * MiB), (8 * MiB, 4 * MiB)]
    resume = 5 * MiB + 4 * KiB  # plan byte 5 MiB + 4 KiB = offset 9 MiB + 4 KiB
    h = nbdio.connect(src.uri)
    plan = C.plan_chunks(h, extents, resume)
    nbdio.close(h)
    assert plan[0][:2] == (resume, 9 * MiB + 4 * KiB) and sum(c[2] for c in plan) == 8 * MiB - resume
    progress = []
    st = C.copy_extents(src.uri, "", tgt.uri, None, extents, resume_from=resume,
                        on_progress=lambda s, d: progress.append(d))
    assert progress == [8 * MiB] and st.bytes_done == st.bytes_sent == 8 * MiB - resume
    writes = [w for w in tgt.requests("Write") if not w["end"]]
    assert min(w["offset"] for w in writes) == 9 * MiB + 4 * KiB
    assert sum(w["count"] for w in writes) == 8 * MiB - resume
    # the source was not even asked about the extent before the resume point
    asked = [r for r in src.requests("Extents") if not r["end"]]
    assert asked and min(r["offset"] for r in asked) == 9 * MiB + 4 * KiB
    h = nbdio.connect(tgt.uri)
    assert h.pread(12 * MiB - (9 * MiB + 4 * KiB), 9 * MiB + 4 * KiB) == img.read_bytes()[9 * MiB + 4 * KiB:12 * MiB]
    assert h.pread(9 * MiB + 4 * KiB, 0) == bytes(9 * MiB + 4 * KiB)
    nbdio.close(h)


def test_rewrite_suppression_skips_blocks_equal_to_the_base(servers, tmp_path):
    """Source and base are two exports of one server (nbdkit file dir=); the target already
    holds the base. Every block is dirty, few differ: only those are written."""
    size = 8 * MiB + 100  # an unaligned tail: the last, short block is compared too
    d = tmp_path / "exports"
    d.mkdir()
    base = bytearray(os.urandom(size))
    snap = bytearray(base)
    rnd = random.Random(3)
    changed = sorted(rnd.sample(range(size // (4 * KiB)), 40))
    for b in changed:
        snap[b * 4 * KiB + 17] ^= 0xFF
    snap[-1] ^= 0xFF  # in the short tail block
    snap[3 * MiB:4 * MiB + 8 * KiB] = os.urandom(MiB + 8 * KiB)  # a run of changed blocks
    (d / "base").write_bytes(base)
    (d / "snap").write_bytes(snap)
    tgt_img = tmp_path / "tgt.img"
    tgt_img.write_bytes(base)
    src = servers("src", "file", f"dir={d}")
    tgt = servers("tgt", "file", tgt_img, stats=True)
    st = C.copy_extents(src.uri, "snap", tgt.uri, None, [(0, size)], base_export="base")
    differ = {i for i in range(0, size, 4 * KiB) if snap[i:i + 4 * KiB] != base[i:i + 4 * KiB]}
    sent = sum(min(4 * KiB, size - i) for i in differ)
    assert st.bytes_sent == sent and st.bytes_skipped == size - sent and st.bytes_done == size
    assert approx(tgt.stats()["write"]["bytes"], sent)
    assert tgt_img.read_bytes() == bytes(snap)


# -------------------------------------------------------------------------------- progress

def test_progress_is_confirmed_in_plan_order_after_a_flush_on_every_connection(servers, tmp_path, monkeypatch):
    """With PROGRESS_SECONDS made short, on_progress is called several times while 4 slow
    connections write. Each time, every write of the confirmed prefix had completed on its
    connection before a flush there that had returned (the target log, read in the callback)."""
    monkeypatch.setattr(C, "PROGRESS_SECONDS", 0.05)
    n = 600
    src, extents, size, _ = scattered_source(servers, tmp_path, n, step=16 * KiB)
    tgt = servers("tgt", "--filter=delay", "memory", size, "delay-write=20ms", log=True, threads=16)
    seen = []

    def on_progress(stats, done):
        seen.append((done, tgt.requests()))
    C.copy_extents(src.uri, "", tgt.uri, None, extents, connections=4, in_flight=8, on_progress=on_progress)
    dones = [d for d, _ in seen]
    assert len(seen) >= 3 and dones == sorted(set(dones)) and dones[-1] == n * 4 * KiB
    for done, reqs in seen:
        flushes = {}  # connection -> line numbers of flushes that had returned
        starts = {(r["conn"], r["id"]): r["line"] for r in reqs if r["op"] == "Flush" and not r["end"]}
        for r in reqs:
            if r["op"] == "Flush" and r["end"]:
                flushes.setdefault(r["conn"], []).append(starts[(r["conn"], r["id"])])
        for w in reqs:
            if w["op"] == "Write" and w["end"]:
                continue
            if w["op"] == "Write" and w["offset"] // (16 * KiB) * 4 * KiB < done:  # in the confirmed prefix
                end = next(r["line"] for r in reqs if r["end"] and (r["conn"], r["id"]) == (w["conn"], w["id"]))
                assert any(f > end for f in flushes.get(w["conn"], [])), (done, w)


# ------------------------------------------------------------------------------ rate

def test_rate_caps_bytes_per_second_without_an_initial_burst(servers, tmp_path):
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(2 * MiB))
    src = servers("src", "file", img)
    tgt = servers("tgt", "memory", 2 * MiB, log=True)
    t0 = time.monotonic()
    C.copy_extents(src.uri, "", tgt.uri, None, [(0, 2 * MiB)], rate=4 * MiB)
    elapsed = time.monotonic() - t0
    # 2 MiB in two 1 MiB chunks at 4 MiB/s: the first may go only after 0.25 s, the second at 0.5 s
    # (with an initial burst of a chunk it would be done in 0.25 s)
    assert elapsed >= 0.5 - 0.01, elapsed
    assert len([w for w in tgt.requests("Write") if not w["end"]]) == 2


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("err", ["EPERM", "ENOSPC"])
def test_permanent_target_error_fails_at_once(servers, tmp_path, err):
    src, extents, size, _ = scattered_source(servers, tmp_path, 2000, step=8 * KiB)
    tgt = servers("tgt", "--filter=error", "memory", size, f"error-pwrite={err}", "error-pwrite-rate=100%",
                  log=True)
    with pytest.raises(C.TransferError) as ei:
        C.copy_extents(src.uri, "", tgt.uri, None, extents)
    assert ei.value.transient is False, ei.value
    assert os.strerror(getattr(__import__("errno"), err)) in str(ei.value)
    attempted = [w for w in tgt.requests("Write") if not w["end"]]
    assert 1 <= len(attempted) <= 4 * 64, len(attempted)  # stopped at the first failure, not 2000


@pytest.mark.parametrize("victim", ["target", "source"])
def test_server_killed_mid_copy_raises_transient(servers, tmp_path, victim):
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(32 * MiB))
    ms = {"source": 0, "target": 0, victim: 50}  # the victim is slow, so it dies mid-copy
    src = servers("src", "--filter=delay", "file", img, f"delay-read={ms['source']}ms")
    tgt = servers("tgt", "--filter=delay", "memory", 32 * MiB, f"delay-write={ms['target']}ms")
    killer = threading.Timer(0.3, (tgt if victim == "target" else src).kill)
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(C.TransferError) as ei:
            C.copy_extents(src.uri, "", tgt.uri, None, [(0, 32 * MiB)], connections=1, in_flight=2)
    finally:
        killer.cancel()
    assert ei.value.transient is True, ei.value
    assert time.monotonic() - t0 < 10  # 32 chunks x 50 ms / 2 would take 0.8 s: it stopped, not hung


def test_unreachable_target_is_a_transfer_error(servers, tmp_path):
    img = tmp_path / "src.img"
    img.write_bytes(bytes(MiB))
    src = servers("src", "file", img)
    with pytest.raises(C.TransferError):
        C.copy_extents(src.uri, "", f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}", None, [(0, MiB)])
