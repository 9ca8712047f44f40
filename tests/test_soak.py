"""R19 soak: the real product under a mixed workload with snapshots, the collector, replication,
kills and link faults, for BLOCKREP_SOAK_SECONDS (default 75 in `make test`; `make soak` runs 300,
`make soak DURATION=3600` an hour).

    primary (16 MiB, 1 MiB segments, `blockrep serve`)  ──`blockrep replicate --to`──►  DR (a second
         ▲ libnbd: writes of every size (unaligned too),                              `blockrep serve`,
         │ trims, write-zeroes, flushes, FUA, reads                                   --keep 3 --keep-min-age 0)
         soak loop (one thread) + one `blockrep replicate` at a time in the background

The loop picks, at random (seeded; BLOCKREP_SOAK_SEED replays the schedule, the seed is printed):
  - a batch of I/O on one libnbd connection, checked against a model (numpy arrays):
      `cur` what the head holds now (every reply arrived: reads must equal it while the server is up),
      `durable` what must survive a kill (flush replies, FUA replies), and `pending`, the requests
      issued since the last flush in issue order (each may or may not survive: after a kill a byte
      must read as its durable value or as the value of a pending request covering it that no
      later durable request overwrote), as tests/test_crash.py's oracle does per block;
  - `blockrep snapshot create` (the model content of each snapshot is recorded; its `@NAME` export
    must read back equal, refuse writes, and never change: every snapshot is re-read periodically,
    after every kill and at the end);
  - `blockrep snapshot delete` / `snapshot prune` (a refusal is accepted only when it names a
    replication target that needs the snapshot; the listing is reconciled with the records: no
    snapshot appears or disappears unasked);
  - `blockrep replicate PRIMARY --to DR --snapshot NAME --json` in the background while the I/O
    continues (sometimes rate-limited), and, with the workload paused, a bare `blockrep replicate
    --keep-local 2` (it takes its own snapshot, whose content is then the model's): every DR snapshot
    must equal the primary snapshot of the same name byte for byte (sha256 over the export), and
    sometimes `blockrep verify` must agree; a DR snapshot the soak never made is a violation;
  - SIGKILL of the primary's nbdkit at a random moment of an I/O batch or of idle time (the collector
    then runs in idle mode), restart, check the durable model, every snapshot and the recovery report;
  - SIGKILL of the DR's nbdkit (a link fault: the run in flight loses its peer) with a random outage,
    or of the replicate run itself; the DR must then hold only complete snapshots, and the next run
    that no fault touched must succeed;
  - idle time, so the collector (the server's maintain thread; the 1 MiB segments make it work)
    reclaims segments; at the end the soak asserts it reclaimed some.
Continuously: RSS (VmRSS of each nbdkit) and disk use (the volume directories) are sampled; after
the warm-up (the first fifth of the run, at least 30 s) no sample may exceed 2x the warm-up's peak plus a
constant; no server.log may contain "Traceback". At the end: a final bare replicate completes, every
check passes once more, both volumes are stopped and `blockrep check` finds them clean; the
figures (duration, ops, bytes, snapshots, replications, kills, violations, peaks) are printed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import threading
import time

import nbd
import numpy as np
import pytest
from conftest import BLOCKREP, pid_alive, run_blockrep
from replhelp import KiB, MiB, connected, nbd_exports, uri

from engine.volume import disk_usage

SOAK_SECONDS = float(os.environ.get("BLOCKREP_SOAK_SECONDS", "75"))
SEED = int(os.environ.get("BLOCKREP_SOAK_SEED", "19190"))
SIZE = 16 * MiB
BS = 4096
MAX_SNAPSHOTS = 6  # the soak prunes beyond this many local snapshots
DR_KEEP = 3
WARMUP = max(30.0, 0.2 * SOAK_SECONDS)
RSS_SLACK = 128 * MiB  # the source side of a run holds up to 4 connections x 64 requests in flight
DISK_SLACK = 8 * SIZE  # while busy the collector lets disk use reach 2x live data, plus a pool
REFUSED_NEEDED = ("replicat", "common base", "target")  # words of a refusal to delete a needed snapshot


class Violation(AssertionError):
    pass


# ------------------------------------------------------------------------------------ the model

class Model:
    """cur: the head as every reply so far says; durable: what a kill must not lose; pending:
    [offset, data, mask] of every request issued since the last flush, oldest first (mask: the
    bytes a later durable request has not overwritten)."""

    def __init__(self, size: int):
        self.cur = np.zeros(size, np.uint8)
        self.durable = np.zeros(size, np.uint8)
        self.pending: list[list] = []

    def issue(self, off: int, data: np.ndarray) -> None:
        self.pending.append([off, data, np.ones(len(data), bool)])
        self.cur[off:off + len(data)] = data

    def fua_acked(self) -> None:  # requests are synchronous: the FUA one is the last issued
        off, data, _ = self.pending.pop()
        end = off + len(data)
        self.durable[off:end] = data
        for o, d, m in self.pending:
            lo, hi = max(o, off), min(o + len(d), end)
            if lo < hi:
                m[lo - o:hi - o] = False

    def flush_acked(self) -> None:
        self.durable[:] = self.cur
        self.pending.clear()

    def crash_errors(self, got: np.ndarray) -> list[str]:
        ok = got == self.durable
        for o, d, m in self.pending:
            ok[o:o + len(d)] |= (got[o:o + len(d)] == d) & m
        bad = np.flatnonzero(~ok)
        if not len(bad):
            return []
        first = int(bad[0])
        runs = np.flatnonzero(np.diff(bad) != 1)
        return [f"{len(bad)} byte(s) in {len(runs) + 1} range(s) read neither their durable value nor a "
                f"pending write's; first at offset {first}: got {got[first:first + 16].tobytes().hex()}, "
                f"durable {self.durable[first:first + 16].tobytes().hex()}; {len(self.pending)} pending request(s)"]

    def recovered(self, got: np.ndarray) -> None:
        self.cur[:] = got
        self.durable[:] = got
        self.pending.clear()


def read_all(h, size: int = SIZE) -> np.ndarray:
    out = bytearray()
    for off in range(0, size, 4 * MiB):
        out += h.pread(min(4 * MiB, size - off), off)
    return np.frombuffer(bytes(out), np.uint8)


def export_sha(u: str) -> str:
    with connected(u) as h:
        d = hashlib.sha256()
        size = h.get_size()
        for off in range(0, size, 4 * MiB):
            d.update(h.pread(min(4 * MiB, size - off), off))
        return d.hexdigest()


def rss(pid: int | None) -> int:
    if not pid:
        return 0
    with contextlib.suppress(OSError):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------ the soak

class Soak:
    def __init__(self, p, dr, rnd: random.Random, seconds: float):
        self.p, self.dr, self.rnd = p, dr, rnd
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds - min(8.0, 0.04 * seconds)  # leave time for the end checks
        self.model = Model(SIZE)
        self.h = None
        # snapshots: name -> {"sha", "tagged", "live"}; order: creation order of live ones
        self.snaps: dict[str, dict] = {}
        self.order: list[str] = []
        self.dr_seen: dict[str, str] = {}  # DR snapshot -> sha verified at its first sight
        self.shipped: list[str] = []  # snapshots a run committed, oldest first
        self.run: dict | None = None  # the background replicate
        self.retry: str | None = None  # a snapshot whose run a fault interrupted
        self.samples: list[tuple[float, str, int]] = []
        self.segs_seen: set[str] = set()
        self.recovery_times: list[float] = []
        self.n = {"ops": 0, "bytes": 0, "writes": 0, "zeroes": 0, "trims": 0, "flushes": 0, "fua": 0,
                  "reads": 0, "model_checks": 0, "snapshots": 0, "snap_deleted": 0, "delete_refused": 0,
                  "pruned": 0, "repl_ok": 0, "repl_faulted": 0, "repl_bare": 0, "repl_resumed": 0,
                  "verify": 0, "dr_checks": 0, "kill_primary": 0, "kill_dr": 0, "kill_replicate": 0,
                  "violations": 0, "snap_checks": 0, "private_source": 0, "dr_pruned": 0}
        self.snap_seq = 0
        self.created = 0  # creation index of every snapshot, named by the soak or by a bare replicate
        self.killing = False  # a SIGKILL of the primary is armed or sent
        self.history: collections.deque = collections.deque(maxlen=60)  # the last requests, for reports

    # ---- bookkeeping ----
    def violation(self, msg: str):
        self.n["violations"] += 1
        raise Violation(f"seed={SEED} t={time.monotonic() - self.t0:.1f}s: {msg}\n  last requests (kind, offset, "
                        f"length, fua): {list(self.history)}")

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def connect(self):
        h = nbd.NBD()
        h.connect_uri(self.p.uri)
        self.h = h
        return h

    def disconnect(self) -> None:
        if self.h is not None:
            with contextlib.suppress(nbd.Error):
                self.h.shutdown()
            self.h = None

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for tag, s in (("primary", self.p), ("dr", self.dr)):
            r = rss(s.pid)
            if r:
                self.samples.append((t, f"rss {tag}", r))
            self.samples.append((t, f"disk {tag}", disk_usage(s.vol)))
        self.segs_seen |= {f.name for f in (self.p.vol / "segments").glob("*.seg")}
        if t > WARMUP:
            for what in {w for _, w, _ in self.samples}:
                warm = [v for tt, w, v in self.samples if w == what and tt <= WARMUP]
                if not warm:
                    continue
                limit = 2 * max(warm) + (RSS_SLACK if what.startswith("rss") else DISK_SLACK)
                _, _, v = next(x for x in reversed(self.samples) if x[1] == what)
                if v > limit:
                    self.violation(f"{what} grew without bound: {v >> 20} MiB > 2 x {max(warm) >> 20} MiB "
                                   f"(warm-up peak) + slack; snapshots {self.order}, info {self.p.info()}")

    def no_tracebacks(self) -> None:
        for s in (self.p, self.dr):
            log = s.vol / "server.log"
            if log.exists() and "Traceback" in (text := log.read_text(errors="replace")):
                i = text.index("Traceback")
                self.violation(f"Traceback in {log}:\n{text[max(0, i - 500):i + 2500]}")

    # ---- I/O ----
    def length(self) -> int:
        r = self.rnd.random()
        if r < 0.25:
            return self.rnd.randint(1, 4 * KiB)  # small and unaligned
        if r < 0.7:
            return BS * self.rnd.randint(1, 16)
        if r < 0.9:
            return self.rnd.randint(1, 256 * KiB)
        return BS * self.rnd.randint(64, 256)  # up to 1 MiB

    def extent(self) -> tuple[int, int]:
        n = self.length()
        if self.rnd.random() < 0.6:
            off = BS * self.rnd.randrange(0, (SIZE - n) // BS + 1)
        else:
            off = self.rnd.randrange(0, SIZE - n + 1)
        return off, n

    def one_op(self, h) -> None:
        r = self.rnd.random()
        m = self.model
        if r < 0.5:
            off, n = self.extent()
            if self.rnd.random() < 0.3:  # compressible: a repeated pattern
                pat = self.rnd.randbytes(self.rnd.choice((1, 16, 512)))
                data = (pat * (n // len(pat) + 1))[:n]
            else:
                data = self.rnd.randbytes(n)
            fua = self.rnd.random() < 0.1
            m.issue(off, np.frombuffer(data, np.uint8))
            self.history.append(("write", off, n, fua))
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            self.n["writes"] += 1
            self.n["bytes"] += n
        elif r < 0.72:
            kind = "zeroes" if r < 0.62 else "trims"
            off, n = self.extent()
            flag = self.rnd.random() < 0.1
            fua = flag
            if kind == "zeroes":
                m.issue(off, np.zeros(n, np.uint8))
            else:  # trim is advisory: only the whole blocks inside read as zeroes, partial ones keep their data
                lo, hi = -(-off // BS) * BS, (off + n) // BS * BS
                if lo < hi:
                    m.issue(lo, np.zeros(hi - lo, np.uint8))
                else:
                    fua = False  # the model has no request to make durable
            self.history.append((kind[:-1], off, n, flag))
            (h.zero if kind == "zeroes" else h.trim)(n, off, nbd.CMD_FLAG_FUA if flag else 0)
            self.n[kind] += 1
        elif r < 0.78:
            self.history.append(("flush",))
            h.flush()
            m.flush_acked()
            self.n["flushes"] += 1
            fua = False
        else:
            off, n = self.extent()
            self.history.append(("read", off, n))
            got = np.frombuffer(h.pread(n, off), np.uint8)
            if not np.array_equal(got, m.cur[off:off + n]):
                bad = off + int(np.flatnonzero(got != m.cur[off:off + n])[0])
                self.violation(f"read [{off}, +{n}) differs from the model at offset {bad}")
            self.n["reads"] += 1
            fua = False
        if fua:
            m.fua_acked()
            self.n["fua"] += 1
        self.n["ops"] += 1
        if len(m.pending) > 400:
            h.flush()
            m.flush_acked()
            self.n["flushes"] += 1

    def io(self, nops: int) -> bool:
        """nops requests; False if the primary died under them (a kill we made), else True."""
        h = self.h or self.connect()
        try:
            for _ in range(nops):
                self.one_op(h)
        except nbd.Error as e:
            if not self.killing:
                self.violation(f"a request failed and no kill was sent (primary pid {self.p.pid}): {e}")
            return False
        return True

    def check_model(self) -> None:
        got = read_all(self.h or self.connect())
        if not np.array_equal(got, self.model.cur):
            bad = np.flatnonzero(got != self.model.cur)
            self.violation(f"the head differs from the model in {len(bad)} bytes, first at {int(bad[0])}")
        self.n["model_checks"] += 1

    # ---- snapshots ----
    def new_name(self) -> str:
        self.snap_seq += 1
        return f"soak{self.snap_seq:04d}"

    def record(self, name: str, tagged: bool) -> None:
        self.add_snapshot(name, hashlib.sha256(self.model.cur.tobytes()).hexdigest(), tagged)

    def add_snapshot(self, name: str, sha: str, tagged: bool) -> None:
        self.created += 1
        self.snaps[name] = {"sha": sha, "tagged": tagged, "live": True, "idx": self.created}
        self.order.append(name)
        self.n["snapshots"] += 1

    def snapshot(self) -> str:
        name = self.new_name()
        r = run_blockrep("snapshot", "create", self.p.vol, "--name", name)
        if r.returncode != 0 or r.stdout.strip() != name:
            self.violation(f"snapshot create {name}: exit {r.returncode}: {r.stdout}{r.stderr}")
        self.record(name, tagged=False)
        self.check_snapshot(name, readonly_probe=True)
        return name

    def check_snapshot(self, name: str, readonly_probe: bool = False) -> None:
        u = uri(self.p.sock, "@" + name)
        got = export_sha(u)
        if got != self.snaps[name]["sha"]:
            self.violation(f"snapshot {name} reads differently from the content it was taken with")
        if readonly_probe:
            with connected(u) as h:
                if not h.is_read_only():
                    self.violation(f"snapshot export @{name} is offered writable")
                try:
                    h.pwrite(b"\xee" * BS, 0)
                except nbd.Error:
                    pass
                else:
                    self.violation(f"a write to snapshot export @{name} succeeded")
        self.n["snap_checks"] += 1

    def local_names(self) -> list[str]:
        r = run_blockrep("snapshot", "list", self.p.vol, "--json")
        if r.returncode != 0:
            self.violation(f"snapshot list: {r.stderr}")
        return [s["name"] for s in json.loads(r.stdout)]

    def reconcile(self, may_remove=None) -> None:
        """The volume's snapshots are exactly the live ones recorded, except that those for which
        may_remove(name) is true may have gone (then they are recorded as deleted)."""
        names = self.local_names()
        unknown = [n for n in names if n not in self.snaps or not self.snaps[n]["live"]]
        if unknown:
            self.violation(f"snapshots the soak did not make (or deleted) are listed: {unknown}")
        if names != [n for n in self.order if n in names]:
            self.violation(f"snapshot order changed: {names} vs {self.order}")
        gone = [n for n in self.order if n not in names]
        for n in gone:
            if may_remove is None or not may_remove(n):
                self.violation(f"snapshot {n} disappeared unasked; listed {names}")
            self.snaps[n]["live"] = False
            self.order.remove(n)

    def delete_or_prune(self) -> None:
        if self.rnd.random() < 0.5:
            victim = self.rnd.choice(self.order[:-1] or self.order)
            r = run_blockrep("snapshot", "delete", self.p.vol, victim)
            if r.returncode == 0:
                self.n["snap_deleted"] += 1
            elif any(w in r.stderr for w in REFUSED_NEEDED):
                self.n["delete_refused"] += 1
            else:
                self.violation(f"snapshot delete {victim}: exit {r.returncode}: {r.stderr}")
            self.reconcile(lambda n: n == victim and r.returncode == 0)
        else:
            keep = self.rnd.randint(2, 4)
            before = list(self.order)
            r = run_blockrep("snapshot", "prune", self.p.vol, "--keep", keep)
            if r.returncode != 0:
                self.violation(f"snapshot prune --keep {keep}: exit {r.returncode}: {r.stderr}")
            self.reconcile(lambda n: n in before[:max(0, len(before) - keep)])
            self.n["pruned"] += len(before) - len(self.order)

    # ---- replication ----
    def dr_uri(self) -> str:
        return self.dr.uri

    def start_run(self, name: str) -> None:
        args = ["replicate", self.p.vol, "--to", self.dr_uri(), "--snapshot", name, "--json"]
        rate = self.rnd.choice((None, "2M", "4M", "16M"))
        if rate:
            args += ["--rate", rate]
        proc = subprocess.Popen([BLOCKREP, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.run = {"proc": proc, "snap": name, "faulted": False, "started": time.monotonic(), "rate": rate}

    def maybe_start_run(self) -> None:
        if self.run is not None:
            return
        if self.retry is not None and self.snaps.get(self.retry, {}).get("live"):
            self.start_run(self.retry)
            return
        self.retry = None
        newest = max((self.snaps[n]["idx"] for n in self.shipped), default=0)
        newer = [n for n in self.order if self.snaps[n]["idx"] > newest]
        if newer:
            self.start_run(newer[-1])

    def poll_run(self, wait: float = 0) -> None:
        """Collect the background run if it ended (waiting up to `wait` seconds)."""
        run = self.run
        if run is None:
            return
        try:
            run["proc"].wait(timeout=wait or None) if wait else None
        except subprocess.TimeoutExpired:
            return
        if run["proc"].poll() is None:
            return
        out, err = run["proc"].communicate()
        self.run = None
        self.finish_run(run["proc"].returncode, out, err, run["snap"], run["faulted"], run)

    def finish_run(self, rc: int, out: str, err: str, name: str, faulted: bool, run: dict | None = None) -> None:
        if rc == 0:
            res = json.loads(out)
            if res["snapshot"] != name and name is not None:
                self.violation(f"replicate --snapshot {name} shipped {res['snapshot']}: {res}")
            name = res["snapshot"]
            if res.get("resumed_from"):
                self.n["repl_resumed"] += 1
            if res.get("resumed_first"):
                self.n["repl_resumed"] += 1
                first = res["resumed_first"]["snapshot"]
                if first not in self.shipped:
                    self.shipped.append(first)
            if name not in self.shipped:
                self.shipped.append(name)
            self.n["repl_ok"] += 1
            self.retry = None
            self.check_dr(must_have=name)
            if self.snaps.get(name, {}).get("live") and self.rnd.random() < 0.3:
                r = run_blockrep("verify", self.p.vol, name, "--against", uri(self.dr.sock, "@" + name), "--json")
                if r.returncode != 0:
                    self.violation(f"blockrep verify {name} against the DR: {r.stdout}{r.stderr}")
                self.n["verify"] += 1
        elif faulted:
            self.log(f"replicate of {name} interrupted by the fault: {err.strip()[-200:]}")
            self.n["repl_faulted"] += 1
            self.retry = name
            self.check_dr()
        else:
            self.violation(f"replicate of {name} failed without a fault injected: exit {rc}: {err.strip()} "
                           f"{(out or '').strip()}")

    def check_dr(self, must_have: str | None = None) -> None:
        """Every DR snapshot is one the soak made and reads as it did on the primary."""
        names = [n[1:] for n in nbd_exports(self.dr.uri) if n.startswith("@")]
        if must_have is not None and must_have not in names:
            self.violation(f"replicate reported {must_have} shipped but the DR lists {names}")
        for n in names:
            if n not in self.snaps:
                self.violation(f"the DR holds a snapshot the soak never made: {n}")
        for n in set(self.dr_seen) - set(names):
            self.dr_pruned(n, names)
        for n in names:
            try:
                got = export_sha(uri(self.dr.sock, "@" + n))
            except nbd.Error as e:
                # the DR's retention may delete it while we read (a commit of a killed run may still
                # be finishing there): then it is gone from the list, and it was among the oldest
                now = [x[1:] for x in nbd_exports(self.dr.uri) if x.startswith("@")]
                if n in now:
                    self.violation(f"reading DR snapshot {n} failed: {e}")
                self.dr_pruned(n, now)
                continue
            if got != self.snaps[n]["sha"]:
                self.violation(f"DR snapshot {n} differs from the primary's snapshot {n} "
                               f"({'first check' if n not in self.dr_seen else 'it changed since it was checked'})")
            self.dr_seen[n] = got
        self.n["dr_checks"] += 1

    def dr_pruned(self, n: str, now: list[str]) -> None:
        """DR snapshot n is gone: only the DR's retention (--keep DR_KEEP, min age 0) may do that."""
        idx = self.snaps[n]["idx"]
        if len(now) < DR_KEEP or any(self.snaps[x]["idx"] < idx for x in now):
            self.violation(f"DR snapshot {n} disappeared although its retention keeps it; the DR lists {now}")
        self.dr_seen.pop(n, None)
        self.n["dr_pruned"] += 1

    def bare_replicate(self) -> None:
        """`blockrep replicate --keep-local 2` with the workload paused (its snapshot = the model)."""
        self.poll_run(wait=120)
        if self.run is not None:
            self.violation(f"replicate of {self.run['snap']} did not finish within 120 s")
        pending = self.retry
        cur_sha = hashlib.sha256(self.model.cur.tobytes()).hexdigest()
        r = run_blockrep("replicate", self.p.vol, "--to", self.dr_uri(), "--keep-local", "2", "--json", timeout=180)
        self.n["repl_bare"] += 1
        if r.returncode != 0:
            self.violation(f"bare replicate (after {'a fault on ' + pending if pending else 'no fault'}) "
                           f"failed: {r.stderr.strip()}")
        res = json.loads(r.stdout)
        name = res["snapshot"]
        self.add_snapshot(name, cur_sha, tagged=True)
        self.finish_run(0, r.stdout, r.stderr, name, False)
        pruned = set(res.get("pruned_local") or [])
        self.reconcile(lambda n: n in pruned and self.snaps[n]["tagged"])
        if len(self.order) > MAX_SNAPSHOTS:
            self.delete_or_prune()

    # ---- kills ----
    def start_primary(self) -> None:
        """serve the primary; while the private server of a replicate run that just ended (or was
        killed: its nbdkit dies after it, with the parent-death signal) still holds the volume's
        lock, `serve` says "in use by another process": that lasts as long as that nbdkit's exit."""
        deadline = time.monotonic() + 15
        while True:
            try:
                self.p.start()
                return
            except pytest.fail.Exception as e:
                if self.run is not None or "in use by another process" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def restart_primary(self, why: str) -> None:
        self.disconnect()
        pid = int(self.p.pid_file.read_text())
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            if time.monotonic() > deadline:
                self.violation(f"nbdkit {pid} still alive 10 s after SIGKILL")
            time.sleep(0.005)
        self.n["kill_primary"] += 1
        self.killing = False
        if self.run is not None:
            self.run["faulted"] = True
        if self.n["kill_primary"] % 4 == 0 and self.run is None:
            rec = self.p.info()["recovery"]  # opens the crashed volume directly: recovery runs here
            if rec["corrupt_records"] or rec["skipped_bytes"]:
                self.violation(f"recovery after kill ({why}) reports damage: {rec}")
        t = time.monotonic()
        try:
            self.start_primary()
        except pytest.fail.Exception as e:
            # a replicate that started while the primary was down serves the volume privately for
            # its run (one writer per volume): `serve` is refused until that run ends (the refusal
            # says "already being served", or "in use by another process" while that private
            # server is still starting)
            if self.run is None or not ("already being served" in str(e) or "in use by another process" in str(e)):
                raise
            self.n["private_source"] += 1
            self.log(f"serve refused while the replicate of {self.run['snap']} serves the volume itself")
            self.poll_run(wait=180)
            if self.run is not None:
                self.violation(f"replicate of {self.run['snap']} still runs 180 s after the primary's kill")
            t = time.monotonic()
            self.start_primary()
        self.recovery_times.append(time.monotonic() - t)
        h = self.connect()
        got = read_all(h)
        errors = self.model.crash_errors(got)
        if errors:
            self.violation(f"after SIGKILL #{self.n['kill_primary']} ({why}): " + "; ".join(errors))
        h.flush()
        self.model.recovered(got)
        self.reconcile()
        for n in self.order:
            self.check_snapshot(n)
        self.no_tracebacks()

    def kill_primary_during_io(self) -> None:
        pid = self.p.pid
        self.killing = True
        timer = threading.Timer(self.rnd.uniform(0, 0.5), os.kill, (pid, signal.SIGKILL))
        timer.start()
        try:
            while self.io(200):
                if not pid_alive(pid):
                    break
                if time.monotonic() > self.deadline + 5:
                    self.violation("the primary did not die after SIGKILL")
        finally:
            timer.join()
        self.restart_primary("during I/O")

    def kill_primary_idle(self) -> None:
        self.io(self.rnd.randint(10, 200))  # some unflushed writes for the collector and the kill
        time.sleep(self.rnd.uniform(0, 2.0))  # idle: the collector runs with GC_RATIO
        self.killing = True
        os.kill(self.p.pid, signal.SIGKILL)
        self.restart_primary("while idle")

    def kill_dr(self) -> None:
        if self.run is not None:
            self.run["faulted"] = True
        with contextlib.suppress(AssertionError):  # it may have ended meanwhile
            self.dr.kill()
        self.n["kill_dr"] += 1
        time.sleep(self.rnd.uniform(0.05, 3.0))  # the outage: the run retries with backoff
        self.dr.start()
        self.check_dr()

    def kill_replicate(self) -> None:
        run = self.run
        if run["proc"].poll() is None:
            run["proc"].kill()
            run["faulted"] = True
            self.n["kill_replicate"] += 1
        self.poll_run(wait=30)
        self.check_dr()

    # ---- the loop ----
    def io_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.io(20)

    def replication_round(self) -> None:
        """Start a background run (taking a snapshot first if there is nothing new to ship), then
        perhaps hit it with a fault while the I/O goes on."""
        if self.run is None:
            self.maybe_start_run()
            if self.run is None:
                self.snapshot()
                self.maybe_start_run()
        fault = self.rnd.choices(["none", "dr", "replicate", "primary"], [35, 20, 25, 20])[0]
        if fault == "primary":
            self.kill_primary_during_io()
            return
        self.io_for(self.rnd.uniform(0, 0.8))
        self.poll_run()
        if self.run is None:
            return  # it ended before the fault
        if fault == "dr":
            self.kill_dr()
        elif fault == "replicate":
            self.kill_replicate()

    def step(self) -> None:
        rnd = self.rnd
        self.poll_run()
        self.io(rnd.randint(50, 1500))  # no kill is armed: a failure is a violation
        r = rnd.random()
        if r < 0.15:
            self.snapshot()
            if len(self.order) > MAX_SNAPSHOTS:
                self.delete_or_prune()
        elif r < 0.22:
            if len(self.order) > 1:
                self.delete_or_prune()
        elif r < 0.42:
            self.replication_round()
        elif r < 0.48:
            self.kill_primary_during_io()
        elif r < 0.51:
            self.kill_primary_idle()
        elif r < 0.53:
            self.kill_dr()
        elif r < 0.56:
            self.bare_replicate()
        elif r < 0.64:
            time.sleep(rnd.uniform(0.5, 2.0))  # idle: the collector's GC_RATIO mode
        elif r < 0.70:
            self.check_model()
            for n in self.order:
                self.check_snapshot(n)
            self.check_dr()
            self.no_tracebacks()
        self.sample()

    def soak(self) -> None:
        self.connect()
        while time.monotonic() < self.deadline:
            self.step()
        self.finish()

    def finish(self) -> None:
        if self.run is not None:  # give it a moment, then it becomes a replicate kill
            self.poll_run(wait=5)
            if self.run is not None:
                self.run["proc"].kill()
                self.run["faulted"] = True
                self.n["kill_replicate"] += 1
                self.poll_run(wait=30)
        self.h.flush()
        self.model.flush_acked()
        self.check_model()
        self.bare_replicate()  # completes whatever a fault left, then ships the final head
        for n in self.order:
            self.check_snapshot(n)
        self.check_dr()
        self.no_tracebacks()
        self.sample()
        self.disconnect()
        for s in (self.p, self.dr):
            s.stop()
            r = run_blockrep("check", s.vol, "--json", timeout=300)
            if r.returncode != 0:
                self.violation(f"blockrep check {s.vol}: {r.stdout}{r.stderr}")
        self.no_tracebacks()

    def figures(self) -> str:
        n = self.n
        peak = {}
        for _, w, v in self.samples:
            peak[w] = max(peak.get(w, 0), v)
        warm = {}
        for t, w, v in self.samples:
            if t <= WARMUP:
                warm[w] = max(warm.get(w, 0), v)
        reclaimed = len([s for s in self.segs_seen if not (self.p.vol / "segments" / s).exists()])
        rt = self.recovery_times
        lines = [
            f"R19 soak: seed {SEED}, duration {time.monotonic() - self.t0:.1f} s (asked {SOAK_SECONDS:.0f} s)",
            f"  ops {n['ops']} (writes {n['writes']}, zeroes {n['zeroes']}, trims {n['trims']}, flushes "
            f"{n['flushes']}, FUA {n['fua']}, reads {n['reads']}), bytes written {n['bytes'] / MiB:.1f} MiB, "
            f"full model checks {n['model_checks']}",
            f"  snapshots created {n['snapshots']}, deleted {n['snap_deleted']} (refused as needed "
            f"{n['delete_refused']}), pruned {n['pruned']}, snapshot content checks {n['snap_checks']}",
            f"  replications ok {n['repl_ok']} (bare {n['repl_bare']}, resumed {n['repl_resumed']}), interrupted by "
            f"faults {n['repl_faulted']}, DR checks {n['dr_checks']}, DR snapshots checked "
            f"{len(self.dr_seen) + n['dr_pruned']} (then pruned by the DR's retention {n['dr_pruned']}), "
            f"verify {n['verify']}, runs that served the killed primary themselves {n['private_source']}",
            f"  kills: primary {n['kill_primary']}, DR {n['kill_dr']}, replicate {n['kill_replicate']}; recovery "
            + (f"p50 {statistics.median(rt) * 1000:.0f} ms, max {max(rt) * 1000:.0f} ms" if rt else "-"),
            f"  collector: {reclaimed} of {len(self.segs_seen)} segment files seen were reclaimed",
            "  peak " + ", ".join(f"{w} {peak[w] / MiB:.1f} MiB (warm-up {warm.get(w, 0) / MiB:.1f})"
                                  for w in sorted(peak)),
            f"  violations {n['violations']}",
        ]
        return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS * 1.5) + 300)
def test_soak(make_server):
    print(f"\nR19 soak: BLOCKREP_SOAK_SEED={SEED} BLOCKREP_SOAK_SECONDS={SOAK_SECONDS:.0f}", flush=True)
    rnd = random.Random(SEED)
    p = make_server("primary", size="16M", create_args=["--segment-size", "1M"])
    dr = make_server("dr", size="16M", create_args=["--segment-size", "1M"],
                     serve_args=["--keep", str(DR_KEEP), "--keep-min-age", "0"])
    soak = Soak(p, dr, rnd, SOAK_SECONDS)
    try:
        soak.soak()
    finally:
        print(soak.figures(), flush=True)
    assert soak.n["violations"] == 0
    if SOAK_SECONDS >= 60:
        reclaimed = [s for s in soak.segs_seen if not (p.vol / "segments" / s).exists()]
        assert reclaimed, "the collector reclaimed no segment during the soak"
        assert soak.n["kill_primary"] and soak.n["repl_ok"] and soak.n["snapshots"]
