#!/usr/bin/env python3
"""The replication scheduler (`blockrep schedule run`, docs/SCHEDULE.md), each figure beside an
anchor measured in the same run:

(a) scheduler overhead on a transfer: the scheduled seed of a 512 MiB volume holding 256 MiB of
    random data, timed by replicate's own timer (the daemon logs "finished (…): X sent in S s"),
    vs `blockrep replicate VOL --to DR --snapshot S --json` of the same data into a fresh DR
    (its "seconds"; and its wall time, process start included), vs `nbdcopy` of the snapshot
    export `@S` into a fresh `nbdkit memory 512M` (the copy anchor), and `nbdcopy` into a fresh
    plain blockrep volume (a DR's write path alone). Beside it, slot instant -> "finished" line
    seen, minus S: what the scheduler adds around the transfer (snapshot, wake-up). The anchors
    start SETTLE (3) s after the previous step, as the daemon's transfer starts at its slot.
(b) pause latency and re-sends: a seed of 128 MiB random data at rate = "20M" with a window that
    closes 3 s after the slot and opens again 4 s later ("T+7-T+3": it spans "midnight", so it is
    open now). The DR's live_bytes (`blockrep info DR --json`'s figure, the same control call made
    in-process so that it can be polled every 50 ms) gives the time from the window's close until
    bytes stop arriving, and any byte that arrives while it is closed. After the resume finished,
    re-sent = bytes_sent_total (`schedule status --json`) - data; the bound is PROGRESS_SECONDS x
    rate (what can be unconfirmed when a pause comes, engine/replication/copy.py). Beside it, what
    reached the DR beyond the confirmed prefix (live_bytes at the pause - done_upto), the mode the
    resumed run ran in and its time beyond its bytes' link time.
(c) SIGTERM -> exit during a rate-limited transfer (docs: within 10 s); anchor: SIGTERM -> exit of
    an idle daemon (interpreter shutdown and the final state write alone). Then SIGKILL 3.8 s into
    such a transfer (a crash): what the DR holds beyond the saved prefix, and what the next daemon
    sends again (its bytes_sent - (data - DR live_bytes at the kill)), against the bound of (b).
(d) per-cycle cost with nothing changed: every = "2s" for --cycle-seconds (20): cycles counted,
    the mean "finished … in S s" of the 0-byte incrementals, the daemon's CPU seconds per cycle
    (/proc/PID/stat utime+stime, children included) and the two nbdkit servers' CPU per cycle; the
    anchor is what a cron job pays: `blockrep replicate VOL --to DR --keep-local 3 --json` (takes
    a snapshot, ships the empty delta, prunes) run as a process (start-up included).

Run: .venv/bin/python bench/schedule_bench.py [--quick] [--repeat N] [--no-save] [--only abcd]
Real servers (`blockrep serve`, `nbdkit memory`) on Unix sockets in a temporary directory; every
process started is stopped at the end. Each cell is the median of --repeat runs (default 3;
--quick: 1 and shorter (d)). Results are printed as Markdown and saved to
bench/results/schedule-<timestamp>.md unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKREP = str(ROOT / ".venv" / "bin" / "blockrep")
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
DR_ARGS = ("--keep", "1", "--allow-remote-prune", "--keep-min-age", "0")
RATE = "20M"
RATE_BPS = 20 * MiB  # sizes are powers of 1024 (docs/SCHEDULE.md §1)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# (a): seconds of idleness before each timed transfer. Writes into a fresh DR volume vary up to 2x on
# this VM with what the guest's memory did just before (bench/README.md, "This VM's memory"); the
# daemon always starts its transfer ~3 s after it was started, so the anchors wait as long
SETTLE = 3.0
FINISHED_RE = re.compile(r"transfer of (\S+) finished \(([^)]*)\): (.+?) sent in ([\d.]+) s")
STARTED = set()  # every process this run started and has not yet stopped (Popen objects / volume paths)


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime (and the waited-for children's) of a process, from /proc/PID/stat."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def clock(t: float) -> str:
    """Local wall clock HH:MM:SS of the epoch time t."""
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def whole_second(ahead: float) -> int:
    return int(time.time() + ahead) + 1


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], unit: str = "s", fmt: str = ".3f") -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}} {unit}"
    return f"{med(xs):{fmt}} {unit} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


class Vol:
    """A blockrep volume served by `blockrep serve` (stopped with `blockrep stop`)."""

    def __init__(self, path: Path, size: str, serve_args=()):
        self.path = path
        sh(BLOCKREP, "create", path, "--size", size)
        sh(BLOCKREP, "serve", path, *serve_args)
        STARTED.add(self)
        self.sock = path / "nbd.sock"
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def export(self, snap: str) -> str:
        return f"nbd+unix:///@{snap}?socket={self.sock}"

    @property
    def pid(self) -> int:
        return int((self.path / "nbdkit.pid").read_text().split()[0])

    def live_bytes(self) -> int:
        from engine.access import run_op  # what `blockrep info VOL --json` calls, without a process start
        return int(run_op(self.path, "info")["live_bytes"])

    def in_progress(self, uri: str) -> dict:
        with contextlib.suppress(OSError, ValueError, KeyError):
            rec = json.loads((self.path / "replication.json").read_text())
            return rec["targets"][uri].get("in_progress") or {}
        return {}

    def fill(self, data: Path) -> None:
        sh("nbdcopy", "--", data, self.uri)

    def stop(self) -> None:
        if self in STARTED:
            STARTED.discard(self)
            subprocess.run([BLOCKREP, "stop", str(self.path)], capture_output=True, timeout=60)


class MemTarget:
    """`nbdkit -f memory SIZE` on a Unix socket."""

    def __init__(self, d: Path, size: str):
        d.mkdir(parents=True, exist_ok=True)
        self.sock = d / "m.sock"
        self.p = subprocess.Popen(["nbdkit", "-f", "-U", str(self.sock), "memory", size],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        STARTED.add(self)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        from engine.server import socket_accepts
        t = time.monotonic()
        while not (self.sock.exists() and socket_accepts(self.sock)):
            if self.p.poll() is not None or time.monotonic() - t > 20:
                raise RuntimeError("nbdkit memory did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self in STARTED:
            STARTED.discard(self)
            self.p.terminate()
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Sched:
    """One `blockrep schedule run CONFIG` with its stderr in a file; log lines are timestamped
    (time.time()) when first seen, by poll()."""

    def __init__(self, d: Path, text: str):
        self.cfg = d / f"schedule-{time.monotonic_ns()}.toml"
        self.cfg.write_text(text)
        self.logfile = self.cfg.with_suffix(".log")
        self.logf = open(self.logfile, "w")
        self.p = subprocess.Popen([BLOCKREP, "schedule", "run", str(self.cfg)], stdout=self.logf,
                                  stderr=subprocess.STDOUT)
        STARTED.add(self)
        self.lines: list[tuple[float, str]] = []
        self._pos = 0
        self.wait_for(r"started: ", timeout=30)

    def poll(self) -> None:
        now = time.time()
        with open(self.logfile) as f:
            f.seek(self._pos)
            chunk = f.read()
        done, _, _rest = chunk.rpartition("\n")
        if done:
            self._pos += len(done.encode()) + 1
            self.lines += [(now, ln) for ln in done.split("\n")]

    def seen(self, pattern: str) -> list[tuple[float, re.Match]]:
        rx = re.compile(pattern)
        return [(t, m) for t, ln in self.lines if (m := rx.search(ln))]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120, step: float = 0.02):
        """The count-th (time seen, match) of pattern."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            hits = self.seen(pattern)
            if len(hits) >= count:
                return hits[count - 1]
            if self.p.poll() is not None:
                self.poll()
                raise RuntimeError(f"the daemon exited {self.p.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {count}x {pattern!r} in {timeout} s:\n{self.text()}")
            time.sleep(step)

    def text(self) -> str:
        return "\n".join(ln for _, ln in self.lines)

    def status(self) -> list[dict]:
        return json.loads(sh(BLOCKREP, "schedule", "status", self.cfg, "--json").stdout)

    def cpu(self) -> float:
        return cpu_seconds(self.p.pid)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """(exit status, seconds from the signal to the exit)."""
        t = time.monotonic()
        self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        took = time.monotonic() - t
        STARTED.discard(self)
        self.logf.close()
        self.poll()
        return rc, took


def cleanup() -> None:
    for x in list(STARTED):
        with contextlib.suppress(Exception):
            if isinstance(x, Sched):
                x.p.kill()
                x.p.wait(timeout=10)
                STARTED.discard(x)
            else:
                x.stop()


def volume_toml(vol: Vol, every: str, start: float, keep_local: int = 3) -> str:
    when = dt.datetime.fromtimestamp(start).replace(microsecond=0).isoformat()
    return f'[[volume]]\npath = "{vol.path}"\nevery = "{every}"\nstart = "{when}"\nkeep_local = {keep_local}\n'


def target_toml(dr: Vol, **kw) -> str:
    return f'[[volume.target]]\nuri = "{dr.uri}"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kw.items())


def random_file(d: Path, mb: int) -> Path:
    f = d / f"random-{mb}M.bin"
    if not f.exists():
        with open(f, "wb") as out:
            for _ in range(mb):
                out.write(os.urandom(MiB))
    return f


# ---------------------------------------------------------------------------------------- (a)

def _a_daemon(rd: Path, p: Vol, i: int, r: dict, notes: list[str]) -> None:
    dr = Vol(rd / "d2", "512M", DR_ARGS)
    try:
        t0 = whole_second(2.5)
        s = Sched(rd, volume_toml(p, "1h", t0) + target_toml(dr))
        try:
            if time.time() > t0:
                notes.append(f"(a) repeat {i}: the daemon was ready only after its slot")
            seen, m = s.wait_for(FINISHED_RE.pattern, timeout=120)
            (row,) = s.status()
            t = row["targets"][0]
            if t["bytes_sent_total"] != 256 * MiB or t["snapshot"] != m.group(1):
                notes.append(f"(a) repeat {i}: status after the seed: {t}")
        finally:
            s.stop()
        r["daemon"].append(float(m.group(4)))
        r["slot_to_seen"].append(seen - t0)
    finally:
        dr.stop()


def _a_replicate(rd: Path, p: Vol, i: int, r: dict, notes: list[str]) -> None:
    dr = Vol(rd / "d1", "512M", DR_ARGS)
    try:
        t = time.monotonic()
        res = json.loads(sh(BLOCKREP, "replicate", p.path, "--to", dr.uri, "--snapshot", "S", "--json").stdout)
        r["repl_wall"].append(time.monotonic() - t)
        r["repl"].append(float(res["seconds"]))
        if res["bytes_sent"] != 256 * MiB:
            notes.append(f"(a) repeat {i}: replicate sent {res['bytes_sent']}")
    finally:
        dr.stop()


def _a_nbdcopy(rd: Path, p: Vol, i: int, r: dict, notes: list[str]) -> None:
    m = MemTarget(rd / "m", "512M")
    try:
        t = time.monotonic()
        sh("nbdcopy", p.export("S"), m.uri)
        r["copy"].append(time.monotonic() - t)
    finally:
        m.stop()


def _a_nbdcopy_blockrep(rd: Path, p: Vol, i: int, r: dict, notes: list[str]) -> None:
    v = Vol(rd / "v", "512M")
    try:
        t = time.monotonic()
        sh("nbdcopy", p.export("S"), v.uri)
        r["copy_br"].append(time.monotonic() - t)
    finally:
        v.stop()


def fig_a(d: Path, repeat: int, notes: list[str]) -> list[tuple]:
    data = random_file(d, 256)
    r: dict[str, list[float]] = {k: [] for k in ("daemon", "slot_to_seen", "repl", "repl_wall", "copy", "copy_br")}
    order = [_a_daemon, _a_replicate, _a_nbdcopy, _a_nbdcopy_blockrep]
    for i in range(repeat):
        rd = d / f"a{i}"
        rd.mkdir()
        p = Vol(rd / "p", "512M")
        try:
            p.fill(data)
            sh(BLOCKREP, "snapshot", "create", p.path, "--name", "S")
            sh("nbdcopy", p.export("S"), "null:")  # untimed: the first read of a fresh snapshot is slower
            for fn in order[i % 4:] + order[:i % 4]:
                if fn is not _a_daemon:  # the daemon waits ~3 s for its slot: every step starts alike
                    time.sleep(SETTLE)
                fn(rd, p, i, r, notes)
        finally:
            p.stop()
            shutil.rmtree(rd, ignore_errors=True)
    daemon_s, slot_to_seen, repl_s, repl_wall, copy_s, copy_br = (r[k] for k in (
        "daemon", "slot_to_seen", "repl", "repl_wall", "copy", "copy_br"))
    over = [a - b for a, b in zip(slot_to_seen, daemon_s, strict=True)]
    notes.append("(a) runs (daemon / replicate / nbdcopy→memory / nbdcopy→blockrep, s): " + "; ".join(
        f"{a:.3f} / {b:.3f} / {c:.3f} / {e:.3f}" for a, b, c, e in zip(daemon_s, repl_s, copy_s, copy_br, strict=True)))
    return [
        ("(a) seed of 256 MiB random data + 256 MiB holes: the daemon (replicate's timer, its log line)",
         spread(daemon_s), f"**{med(daemon_s) / med(repl_s):.2f}×** `blockrep replicate`'s time"),
        ("(a) the same, `blockrep replicate --snapshot S --json` into a fresh DR: its `seconds`",
         spread(repl_s) + f"; wall with process start {spread(repl_wall)}",
         f"**{med(copy_s) / med(repl_s):.2f}×** nbdcopy's speed"),
        ("(a) anchor: `nbdcopy` of `@S` into a fresh `nbdkit memory 512M`", spread(copy_s), "1.00"),
        ("(a) beside it: `nbdcopy` of `@S` into a fresh blockrep volume (`blockrep serve`, not a DR)",
         spread(copy_br), f"{med(copy_s) / med(copy_br):.2f}× nbdcopy-to-memory's speed; replicate: "
         f"{med(copy_br) / med(repl_s):.2f}× this"),
        ("(a) the slot's instant → its \"finished\" line seen, minus the transfer's own time "
         "(snapshot, wake-up, state, log)", spread(over), f"{med(over) / med(repl_s):.2f}× the transfer"),
    ]


# ---------------------------------------------------------------------------------------- (b)

def fig_b(d: Path, repeat: int, notes: list[str]) -> list[tuple]:
    from engine.replication.copy import PROGRESS_SECONDS
    data_mib = 128
    data = random_file(d, data_mib)
    stop_lat, paused_lat, resumed_lat, after_close, while_closed, resent, beyond = ([] for _ in range(7))
    open_rate, start_off, poll_dt, modes, extra = ([] for _ in range(5))
    for i in range(repeat):
        rd = d / f"b{i}"
        rd.mkdir()
        p = Vol(rd / "p", "256M")
        dr = Vol(rd / "d", "256M", DR_ARGS)
        try:
            p.fill(data)
            t0 = whole_second(2.5)
            close, reopen = t0 + 3, t0 + 7
            window = f"{clock(reopen)}-{clock(close)}"  # spans "midnight": open now, closed in [close, reopen)
            s = Sched(rd, volume_toml(p, "1h", t0) + target_toml(dr, rate=RATE, window=window))
            try:
                started, _ = s.wait_for(r"transfer of \S+ started", timeout=30)
                samples: list[tuple[float, int]] = []  # (time after the call returned, live_bytes)
                done_at_pause = None
                deadline = time.monotonic() + 60
                while not s.seen(FINISHED_RE.pattern):
                    samples.append((time.time(), dr.live_bytes()))
                    s.poll()
                    if done_at_pause is None and s.seen(r"paused \(") and time.time() < reopen - 1.0:
                        done_at_pause = p.in_progress(dr.uri).get("done_upto")
                        t = s.status()[0]["targets"][0]
                        want = dt.datetime.fromtimestamp(reopen, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
                        if t["state"] != "paused" or not str(t["next_window"]).startswith(want):
                            notes.append(f"(b) repeat {i}: status while closed: state {t['state']}, next_window "
                                         f"{t['next_window']} (expected paused, {want}Z)")
                    if time.monotonic() > deadline or s.p.poll() is not None:
                        raise RuntimeError("(b): no finished line:\n" + s.text())
                    time.sleep(0.05)
                (row,) = s.status()
                total = row["targets"][0]["bytes_sent_total"]
                fin = s.seen(FINISHED_RE.pattern)[0][1]
                modes.append(fin.group(2))
                res = json.loads((p.path / "replication.json").read_text())["targets"][dr.uri]["runs"][-1]
                extra.append(float(fin.group(4)) - res["bytes_sent"] / RATE_BPS)  # beyond the link time
                pt = next((t for t, _ in s.seen(r"paused \(window")), float("nan"))
                rs = s.seen(r"resumed at")
                rt = rs[0][0] if rs else float("nan")
            finally:
                s.stop()
            before = [(t, v) for t, v in samples if t < close]
            closed = [(t, v) for t, v in samples if close <= t < reopen]
            if not before or not closed:
                notes.append(f"(b) repeat {i}: no samples around the close (transfer started {started - t0:.2f} s "
                             "after the slot)")
                continue
            last_growth = close
            for (_, a), (tb, b) in zip(closed, closed[1:], strict=False):
                if b != a:
                    last_growth = tb
            if closed[0][1] != before[-1][1]:
                last_growth = max(last_growth, closed[0][0])
            stop_lat.append(last_growth - close)
            poll_dt.append(med([b - a for (a, _), (b, _) in zip(samples, samples[1:], strict=False)]))
            paused_lat.append(pt - close)
            resumed_lat.append(rt - reopen)
            stable = closed[-1][1]
            after_close.append(stable - before[-1][1])
            # bytes that arrived in the closed window more than 3 s after the close (CANCEL_GRACE)
            late = [v for t, v in closed if t >= close + 3.2]
            while_closed.append((late[-1] - late[0]) if late else 0)
            resent.append(total - data_mib * MiB)
            start_off.append(started - t0)
            if done_at_pause is not None:
                beyond.append(stable - done_at_pause)
            first = next(((t, v) for t, v in before if v > 0), None)
            if first and before[-1][0] > first[0]:
                open_rate.append((before[-1][1] - first[1]) / (before[-1][0] - first[0]))
            if total < data_mib * MiB:
                notes.append(f"(b) repeat {i}: bytes_sent_total {total} < the data")
        finally:
            p.stop()
            dr.stop()
            shutil.rmtree(rd, ignore_errors=True)
    bound = PROGRESS_SECONDS * RATE_BPS
    return [
        (f"(b) window closes mid-transfer ({data_mib} MiB random data, rate {RATE}; \"started\" seen "
         f"{spread(start_off)} after the slot, the close at slot + 3 s): close → DR live_bytes stops growing "
         f"(polled every {med(poll_dt) * 1000:.0f} ms: that is the resolution)", spread(stop_lat),
         f"daemon logs \"paused\" {spread(paused_lat)} after the close; growth from the last poll before "
         f"the close to the paused value: {spread([x / MiB for x in after_close], 'MiB', '.1f')}"),
        ("(b) bytes arriving while closed, from close + 3.2 s to the reopening", spread(while_closed, "B", ".0f"),
         f"resumed line seen {spread(resumed_lat)} after the reopening"),
        ("(b) the resumed run: its time beyond its bytes' link time (bytes ÷ rate); the mode it ran in",
         spread(extra), ", ".join(sorted(set(modes)))),
        ("(b) re-sent = bytes_sent_total − data, after the resume finished",
         spread([x / MiB for x in resent], "MiB", ".2f") + " = "
         + spread([x / (data_mib * MiB) for x in resent], "× data", ".4f"),
         f"bound PROGRESS_SECONDS × rate = {mib(bound)}: **{med(resent) / bound:.3f}×** the bound"),
        ("(b) at the DR beyond the confirmed prefix at the pause (live_bytes − done_upto)",
         spread([x / MiB for x in beyond], "MiB", ".2f"),
         f"{med(beyond) / bound:.3f}× the bound" if beyond else "n/a"),
        ("(b) DR growth while open (live_bytes slope)", spread([x / MiB for x in open_rate], "MiB/s", ".1f"),
         f"{med(open_rate) / RATE_BPS:.3f}× the rate" if open_rate else "n/a"),
    ]


# ---------------------------------------------------------------------------------------- (c)

def fig_c(d: Path, repeat: int, notes: list[str]) -> list[tuple]:
    from engine.replication.copy import PROGRESS_SECONDS
    data_mib = 128
    data = random_file(d, data_mib)
    busy, idle, term_beyond, kill_beyond, kill_resent, kill_modes = [], [], [], [], [], []
    for i in range(repeat):
        rd = d / f"c{i}"
        rd.mkdir()
        p = Vol(rd / "p", "256M")
        dr = Vol(rd / "d", "256M", DR_ARGS)
        try:
            p.fill(data)
            # anchor: nothing to do (first slot an hour away)
            s = Sched(rd, volume_toml(p, "1h", time.time() + 3600) + target_toml(dr, rate=RATE))
            time.sleep(1.0)
            rc, took = s.stop()
            idle.append(took)
            if rc != 0:
                notes.append(f"(c) idle daemon exited {rc}")
            t0 = whole_second(2.5)
            s = Sched(rd, volume_toml(p, "1h", t0) + target_toml(dr, rate=RATE))
            s.wait_for(r"transfer of \S+ started", timeout=30)
            time.sleep(1.5)
            live = dr.live_bytes()
            rc, took = s.stop()
            busy.append(took)
            if rc != 0 or not s.seen(r"paused \(the scheduler is stopping\)"):
                notes.append(f"(c) repeat {i}: exit {rc}, log:\n" + s.text())
            if not 0 < live < data_mib * MiB:
                notes.append(f"(c) repeat {i}: DR live_bytes {live} at the signal: not mid-transfer")
            done = p.in_progress(dr.uri).get("done_upto")
            if not done:
                notes.append(f"(c) repeat {i}: no confirmed prefix saved at exit")
            else:
                term_beyond.append(dr.live_bytes() - done)
        finally:
            p.stop()
            dr.stop()
        # SIGKILL (a crash): what was unconfirmed is sent again by the next daemon. Killed 3.8 s
        # after the start, near the end of the second progress period (PROGRESS_SECONDS = 2)
        p = Vol(rd / "p2", "256M")
        dr = Vol(rd / "d2", "256M", DR_ARGS)
        try:
            p.fill(data)
            cfg = volume_toml(p, "1h", whole_second(2.5)) + target_toml(dr, rate=RATE)
            s = Sched(rd, cfg)
            started, _ = s.wait_for(r"transfer of \S+ started", timeout=30)
            time.sleep(max(0.0, started + 3.8 - time.time()))
            s.stop(signal.SIGKILL)
            time.sleep(0.3)
            live = dr.live_bytes()
            done = p.in_progress(dr.uri).get("done_upto") or 0
            s = Sched(rd, cfg)
            try:
                s.wait_for(FINISHED_RE.pattern, timeout=60)
                (row,) = s.status()
                sent = row["targets"][0]["bytes_sent_total"]  # the killed run's bytes were never counted
                kill_modes.append(s.seen(FINISHED_RE.pattern)[0][1].group(2))
            finally:
                s.stop()
            if not s.seen(r"resumed at"):
                notes.append(f"(c) repeat {i}: the daemon after SIGKILL did not resume:\n" + s.text())
            kill_beyond.append(live - done)
            kill_resent.append(sent - (data_mib * MiB - live))
        finally:
            p.stop()
            dr.stop()
            shutil.rmtree(rd, ignore_errors=True)
    bound = PROGRESS_SECONDS * RATE_BPS
    return [("(c) SIGTERM → exit during a transfer at rate " + RATE, spread(busy),
             f"idle daemon {spread(idle)}; docs: ≤ 10 s: **{'pass' if busy and max(busy) <= 10 else 'FAIL'}**; "
             f"at the DR beyond the saved prefix afterwards: {spread([x / MiB for x in term_beyond], 'MiB', '.2f')}"),
            ("(c) SIGKILL 3.8 s into the transfer: at the DR beyond the saved prefix (what a resume from the "
             "prefix would send again)", spread([x / MiB for x in kill_beyond], "MiB", ".1f"),
             f"{med(kill_beyond) / bound:.2f}× the bound PROGRESS_SECONDS × rate = {mib(bound)}"),
            (f"(c) … re-sent by the next daemon's run ({', '.join(sorted(set(kill_modes)))}): its bytes_sent − "
             "(data − DR live_bytes at the kill)", spread([x / MiB for x in kill_resent], "MiB", ".2f"),
             f"**{med(kill_resent) / bound:.3f}×** the bound")]


# ---------------------------------------------------------------------------------------- (d)

def fig_d(d: Path, repeat: int, seconds: float, cli_runs: int, notes: list[str]) -> list[tuple]:
    data = random_file(d, 32)
    cyc_s, cyc_cpu, cyc_srv, cyc_wall, n_cycles = [], [], [], [], []
    cli_s, cli_wall, cli_cpu, cli_srv = [], [], [], []
    for i in range(repeat):
        rd = d / f"d{i}"
        rd.mkdir()
        p = Vol(rd / "p", "256M")
        dr = Vol(rd / "d", "256M", DR_ARGS)
        try:
            p.fill(data)
            servers = (p.pid, dr.pid)
            s = Sched(rd, volume_toml(p, "2s", whole_second(1.5)) + target_toml(dr))
            try:
                s.wait_for(r"finished \(seed\)", timeout=60)
                k = len(s.seen(FINISHED_RE.pattern))
                t1, _ = s.wait_for(FINISHED_RE.pattern, count=k + 1, timeout=30)
                c1, srv1 = s.cpu(), sum(cpu_seconds(x) for x in servers)
                n = max(1, round(seconds / 2))
                t2, _ = s.wait_for(FINISHED_RE.pattern, count=k + 1 + n, timeout=seconds * 3 + 30)
                c2, srv2 = s.cpu(), sum(cpu_seconds(x) for x in servers)
                lines = s.seen(FINISHED_RE.pattern)[k + 1:k + 1 + n]
                taken = [t for t, _ in s.seen(r"snapshot \S+ taken") if t1 < t <= t2]
            finally:
                s.stop()
            sent = {m.group(3) for _, m in lines}
            if sent != {"0 B"} and sent != {"0 bytes"}:
                notes.append(f"(d) repeat {i}: the unchanged cycles sent {sorted(sent)}")
            if len(taken) != n:
                notes.append(f"(d) repeat {i}: {len(taken)} snapshots taken for {n} transfers")
            n_cycles.append(n)
            cyc_s += [float(m.group(4)) for _, m in lines]
            cyc_cpu.append((c2 - c1) / n)
            cyc_srv.append((srv2 - srv1) / n)
            cyc_wall.append((t2 - t1) / n)
            # the cron anchor: one process per cycle, same volume, same DR, nothing changed
            srv_all = sum(cpu_seconds(x) for x in servers)
            for _ in range(cli_runs):
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.monotonic()
                res = json.loads(sh(BLOCKREP, "replicate", p.path, "--to", dr.uri, "--keep-local", "3",
                                    "--json").stdout)
                cli_wall.append(time.monotonic() - t)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cli_cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                cli_s.append(float(res["seconds"]))
                if res["bytes_sent"]:
                    notes.append(f"(d) the cron anchor sent {res['bytes_sent']} bytes")
            cli_srv.append((sum(cpu_seconds(x) for x in servers) - srv_all) / cli_runs)  # ticks are 10 ms
        finally:
            p.stop()
            dr.stop()
            shutil.rmtree(rd, ignore_errors=True)
    ms = 1000
    return [
        (f"(d) nothing changed, every = \"2s\": {sum(n_cycles)} cycles over {repeat} run(s) of ~{seconds:.0f} s; "
         "the daemon's incremental (its log line)",
         spread([x * ms for x in cyc_s], "ms", ".0f"),
         f"**{med(cyc_s) / med(cli_s):.2f}×** the CLI's `seconds` (which also take the snapshot and prune); "
         f"cycle period {spread(cyc_wall)}"),
        ("(d) the daemon's CPU per cycle (utime+stime, idle time between cycles included)",
         spread([x * ms for x in cyc_cpu], "ms", ".0f"),
         f"**{med(cyc_cpu) / med(cli_cpu):.2f}×** a `blockrep replicate` process"),
        ("(d) the two nbdkit servers' CPU per cycle (primary + DR), daemon",
         spread([x * ms for x in cyc_srv], "ms", ".0f"),
         f"cron anchor {spread([x * ms for x in cli_srv], 'ms', '.0f')}"),
        (f"(d) anchor: `blockrep replicate VOL --to DR --keep-local 3 --json` ({len(cli_s)} runs)",
         f"`seconds` {spread([x * ms for x in cli_s], 'ms', '.0f')}; "
         f"wall {spread([x * ms for x in cli_wall], 'ms', '.0f')}",
         f"CPU {spread([x * ms for x in cli_cpu], 'ms', '.0f')} per run"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repeat, (d) over 10 s, 3 CLI runs (about 75 s)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure, the median is shown (default 3; "
                    "--quick: 1)")
    ap.add_argument("--cycle-seconds", type=float, default=None, help="(d): seconds of 2 s cycles (default 20; "
                    "--quick: 10)")
    ap.add_argument("--cli-runs", type=int, default=None, help="(d): cron-anchor runs per repeat (default 5; "
                    "--quick: 3)")
    ap.add_argument("--only", default="abcd", help="figures to run, e.g. ab")
    ap.add_argument("--no-save", action="store_true", help="print only, do not write bench/results/")
    ap.add_argument("--workdir", default=None, help="where the temporary directory goes (default: $TMPDIR)")
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.cycle_seconds or (10.0 if args.quick else 20.0)
    cli_runs = args.cli_runs or (3 if args.quick else 5)
    for tool in ("nbdcopy", "nbdkit"):
        if not shutil.which(tool):
            print(f"schedule_bench: {tool} is missing", file=sys.stderr)
            return 2
    load_before = loadavg()
    t_start = time.monotonic()
    rows: list[tuple] = []
    notes: list[str] = []

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        with tempfile.TemporaryDirectory(prefix="blockrep-sbench-", dir=args.workdir) as td:
            d = Path(td)
            for key, fn in (("a", lambda: fig_a(d, repeat, notes)), ("b", lambda: fig_b(d, repeat, notes)),
                            ("c", lambda: fig_c(d, repeat, notes)),
                            ("d", lambda: fig_d(d, repeat, seconds, cli_runs, notes))):
                if key in args.only:
                    try:
                        rows += fn()
                    except (RuntimeError, subprocess.CalledProcessError, KeyError, ValueError) as e:
                        err = (getattr(e, "stderr", None) or str(e)).strip()
                        notes.append(f"({key}) failed: {err}")
                        rows.append((f"({key})", "n/a: failed (see the notes)", ""))
                    finally:
                        cleanup()
    finally:
        cleanup()
    out = [f"Scheduler benchmark, {time.strftime('%Y-%m-%d %H:%M')}, median of {repeat} run(s)"
           f"{' (--quick)' if args.quick else ''}", "",
           "| figure | measured | against the anchor |", "|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append(f"\nload average before {load_before}, after {loadavg()} (2 vCPUs shared; above ~0.5 is suspect); "
               f"{time.monotonic() - t_start:.0f} s in all")
    if notes:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    text = "\n".join(out)
    print(text)
    if not args.no_save:
        res_dir = ROOT / "bench" / "results"
        res_dir.mkdir(exist_ok=True)
        (res_dir / f"schedule-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text + "\n")
    return 1 if any("failed" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
