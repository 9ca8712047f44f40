"""R15: SIGKILL the replication worker at random points; it resumes and re-sends only what was not
confirmed. With R14's DR kill: SIGKILL the DR's nbdkit in a few of the rounds and restart it.

    primary (256 MiB, blockrep serve) ──replicate --rate 16M──► DR (nbdkit --filter=log --filter=stats,
                                                                    the blockrep plugin, run here by hand)

The DR's nbdkit is run by hand, as in test_dr_trust.py's hash rebase test, so that what reaches it is
counted independently of blockrep: nbdkit's stats filter writes its totals only when nbdkit exits
cleanly, which a SIGKILLed DR never does, so the log filter (one line per request, on disk as it
happens) is in front of it too. The byte counts come from the log; the stats filter's totals of every
DR process that exits cleanly must agree with them (a check of the log's parsing).

Seed first (not counted), then rounds until KILLS SIGKILLs of `blockrep replicate ... --rate 16M
--json` (default 12; BLOCKREP_KILLS overrides; `make soak-replication` runs R15's 50). A round: write
~64 MiB of random data scattered over the primary if the DR holds everything written so far, start a
replicate in the background, SIGKILL it at a random moment (seeded random.Random; the seed is
printed; BLOCKREP_KILL_SEED replays the schedule): anywhere up to the run's expected end, or anchored
on what the DR's request log shows (a flush returned; the data connections closed after the last
flush; the manifest opened) to reach the millisecond-wide windows around confirmation and commit. In
DR_KILLS (3) of the rounds the DR's nbdkit is SIGKILLed first, at a random moment, and restarted
after a random outage; the worker retries (or gives up) and is then SIGKILLed too. After every kill:
  - no DR snapshot is partial: every snapshot the DR lists is one of the primary's (same uuid) and
    `blockrep verify` passes for it; the DR only gains snapshots; every acknowledged commit is there;
  - while nothing was committed, `in_progress` in replication.json keeps the same snapshot and token,
    and `done_upto` never goes back;
  - the round lost at most one unconfirmed window: bytes written at the DR in the round minus the
    growth of the confirmed prefix <= WINDOW (two windows when the DR was killed too);
  - a kill that took a commit's acknowledgement: naming that snapshot again is "already replicated".
Then one run to completion: exit 0, it resumed from the saved done_upto, the DR holds exactly the
committed snapshots (also by its own `snapshot list` once stopped), `verify` of the final snapshot
passes, and the re-sent/dirty ratio (bytes written at the DR after the seed / bytes the primary
changed, by `blockrep diff` between the committed snapshots) is printed and bounded by
1 + (kills x WINDOW) / changed.

Two ways to restart the worker are tested:
  - "named": the restarted worker names the interrupted snapshot (`--snapshot`, taken from
    `in_progress`) while one is pending, as tests/test_replication.py's resume test does;
  - "bare": exactly `blockrep replicate PRIMARY --to DR --rate 16M --json`, a cron job or a supervisor
    that knows nothing: the run first finishes the interrupted transfer (same snapshot, same token,
    from its confirmed prefix), then takes and ships a new snapshot. A run that started anew
    instead raises NotResumed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from itertools import pairwise
from pathlib import Path

import nbd
import pytest
from conftest import run_blockrep
from replhelp import KiB, MiB, nbd_exports, parse_stats, replication_state, uri, wait_for, write_blocks

from engine.replication.copy import PROGRESS_SECONDS
from engine.server import PLUGIN, plugin_env

KILLS = int(os.environ.get("BLOCKREP_KILLS", "12"))
DR_KILLS = min(KILLS, int(os.environ.get("BLOCKREP_DR_KILLS", "3")))
SIZE = 256 * MiB
BATCH = 64 * MiB  # random data written per batch
RATE = 16 * MiB  # --rate 16M
# What one kill may cost: the bytes written since the last confirmed progress. Progress is
# confirmed (flush of every target connection, then replication.json) every PROGRESS_SECONDS
# (2 s) while data moves, and the rate cap lets through at most RATE bytes a second (no initial
# burst, copy.py), so a kill loses at most ~2 s x 16 MiB/s = 32 MiB plus what was written while
# that flush round and the state write were under way: 0.5 s of slack for those.
WINDOW = int((PROGRESS_SECONDS + 0.5) * RATE)  # 40 MiB


class NotResumed(AssertionError):
    """A restarted run did not continue the interrupted transfer (other snapshot or token)."""


# ------------------------------------------------------------------------------ the DR, by hand

class DR:
    """The DR volume served by an nbdkit of our own: log and stats filters in front of the plugin.
    Each start is an incarnation with its own request log and stats file."""

    def __init__(self, vol: Path, work: Path):
        self.vol, self.work = vol, work
        self.sock = work / "dr.sock"
        self.uri = uri(self.sock)
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self.stats: list[Path] = []

    def start(self) -> DR:
        n = len(self.logs)
        log, stats, err = (self.work / f"dr.{n}.{ext}" for ext in ("log", "stats", "err"))
        self.logs.append(log)
        self.stats.append(stats)
        self.sock.unlink(missing_ok=True)  # a SIGKILLed nbdkit leaves its socket behind
        # logfile= is the log filter's (it does not reach the plugin): the plugin's warnings go to
        # nbdkit's stderr, dr.N.err
        with open(err, "w") as ef:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-U", self.sock, "--filter=log", "--filter=stats", "python", PLUGIN,
                 f"volume={self.vol}", f"logfile={log}", f"statsfile={stats}"],
                env=plugin_env(), stdin=subprocess.DEVNULL, stdout=ef, stderr=ef)
        wait_for(lambda: self._answers() or self._dead(), timeout=60, what="the DR to serve")
        assert self.proc.poll() is None, f"the DR's nbdkit exited {self.proc.returncode}: {err.read_text()}"
        return self

    def _dead(self) -> bool:
        return self.proc.poll() is not None

    def _answers(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            hello(self.uri)
            return True
        except nbd.Error:
            return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def position(self) -> tuple[int, int]:
        """(incarnation, lines of its log so far): a point in the DR's request history."""
        return len(self.logs) - 1, len(_lines(self.logs[-1]))

    def quiet(self, seconds: float = 0.3, timeout: float = 10) -> None:
        """Wait until the request log stops growing: a killed client's last requests, still in the
        socket buffer, are served (and logged) after it died."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.logs[-1].stat().st_size if self.logs[-1].exists() else 0
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return
            time.sleep(0.05)

    def wait_for_request(self, what: str, offset: int, proc: subprocess.Popen, busy: bool = False) -> float | None:
        """Follow the request log from byte offset until it shows `what` (flush: a flush returned;
        end: a `!data` connection closed; commit: a `!manifest` connection opened); returns the
        time.monotonic() it was seen, or None when proc ended first. busy: poll without sleeping."""
        data: set[str] = set()
        rest = ""
        with open(self.logs[-1]) as log:
            log.seek(offset)
            while proc.poll() is None:
                chunk = log.read()
                if not chunk:
                    if not busy:
                        time.sleep(0.001)
                    continue
                *lines, rest = (rest + chunk).split("\n")
                for ln in lines:
                    m = re.search(r"connection=(\d+) (Connect export=\"!(\w+)|Disconnect|\.\.\.Flush id=)", ln)
                    if not m:
                        continue
                    if m.group(3) == "data":
                        data.add(m.group(1))
                    elif (what == "flush" and m.group(2).startswith("...Flush")) or \
                            (what == "end" and m.group(2) == "Disconnect" and m.group(1) in data) or \
                            (what == "commit" and m.group(3) == "manifest"):
                        return time.monotonic()
        return None

    def _between(self, a: tuple[int, int], b: tuple[int, int]) -> list[str]:
        out: list[str] = []
        for inc in range(a[0], b[0] + 1):
            lines = _lines(self.logs[inc])
            out += lines[a[1] if inc == a[0] else 0:b[1] if inc == b[0] else len(lines)]
        return out

    def exports_seen(self, a: tuple[int, int], b: tuple[int, int]) -> set[str]:
        """What the DR saw between a and b: "begin", "manifest" (opened), "data closed"."""
        seen, data = set(), set()
        for ln in self._between(a, b):
            m = re.search(r"connection=(\d+) (?:Connect export=\"!(\w+)|(Disconnect))", ln)
            if not m:
                continue
            if m.group(2) == "data":
                data.add(m.group(1))
            elif m.group(2) in ("begin", "manifest"):
                seen.add(m.group(2))
            elif m.group(3) and m.group(1) in data:
                seen.add("data closed")
        return seen

    def written(self, a: tuple[int, int], b: tuple[int, int]) -> int:
        """Bytes of write requests the DR received between positions a and b (every request the
        log shows, answered or not: what was sent)."""
        return sum(_write_bytes(ln) for ln in self._between(a, b))


_WRITE = re.compile(r" Write id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+) ")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _write_bytes(line: str) -> int:
    m = _WRITE.search(line)
    return int(m.group(1), 16) if m else 0


def hello(u: str) -> dict:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    h.connect_uri(u)
    try:
        h.set_export_name("!hello")
        h.opt_go()
        return json.loads(h.pread(h.get_size(), 0))
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass


# ------------------------------------------------------------------------------ helpers

def snaps(vol) -> list[dict]:
    return json.loads(run_blockrep("snapshot", "list", vol, "--json", check=True).stdout)


def dr_snaps(u: str) -> list[dict]:
    """The DR's snapshot list while it serves (its !hello: name, uuid, created, source), checked
    against the snapshot exports it lists (NBD_OPT_LIST)."""
    held = hello(u)["snapshots"]
    assert sorted(s["name"] for s in held) == sorted(n[1:] for n in nbd_exports(u) if n.startswith("@"))
    return held


def diff_bytes(vol, a: str, b: str) -> list[tuple[int, int]]:
    r = run_blockrep("diff", vol, a, b, "--json", check=True)
    return [(e["offset"], e["length"]) for e in json.loads(r.stdout)]


def merged_total(*lists) -> int:
    out: list[list[int]] = []
    for o, n in sorted(e for lst in lists for e in lst):
        if out and o <= out[-1][1]:
            out[-1][1] = max(out[-1][1], o + n)
        else:
            out.append([o, o + n])
    return sum(e - o for o, e in out)


def write_batch(rnd: random.Random, u: str, nbytes: int = BATCH) -> tuple[int, int]:
    """~nbytes of random data in pieces of 64 KiB .. 2 MiB at random 4 KiB-aligned offsets.
    Returns (bytes written, bytes of their union: pieces may overlap)."""
    blocks, total = {}, 0
    while total < nbytes:
        n = rnd.randrange(16, 513) * 4 * KiB
        o = rnd.randrange(0, (SIZE - n) // (4 * KiB)) * 4 * KiB
        blocks[o] = rnd.randbytes(n)
        total += n
    write_blocks(u, blocks)
    return total, merged_total([(o, len(b)) for o, b in blocks.items()])


def in_progress(vol, target: str) -> dict | None:
    return (replication_state(vol).get(target) or {}).get("in_progress")


def parse_json(out: str) -> dict | None:
    try:
        return json.loads(out)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ the test

@pytest.mark.slow
@pytest.mark.timeout(180 + 25 * KILLS)
@pytest.mark.parametrize("restart", [
    "named",
    "bare",
])
def test_sigkilled_replication_resumes_and_resends_only_what_was_not_confirmed(make_server, procs, tmp_path,
                                                                               restart):
    seed = int(os.environ.get("BLOCKREP_KILL_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nR15 ({restart}): seed {seed} (BLOCKREP_KILL_SEED={seed} replays the kill schedule), "
          f"{KILLS} kills of replicate, {DR_KILLS} of the DR")
    rnd = random.Random(seed)
    t_start = time.monotonic()

    p = make_server("primary", size=SIZE)
    d = make_server("dr", size=SIZE, start=False)
    dr = DR(d.vol, tmp_path)
    dr.start()
    try:
        _run(p, dr, procs, rnd, restart, t_start)
    finally:
        if dr.proc and dr.proc.poll() is None:
            dr.kill()


def _run(p, dr: DR, procs, rnd: random.Random, restart: str, t_start: float) -> None:
    du = dr.uri
    # ---- seed (not counted): a little data, shipped whole, then a clean restart of the DR so the
    # counted incarnations begin after it
    write_blocks(p.uri, {0: rnd.randbytes(4 * MiB), 100 * MiB: rnd.randbytes(4 * MiB)})
    r = run_blockrep("replicate", p.vol, "--to", du, "--json", timeout=120, check=True)
    seed_snap = json.loads(r.stdout)["snapshot"]
    dr.stop()
    dr.start()
    start_pos = dr.position()

    def primary_uuids() -> dict[str, str]:
        return {s["name"]: s["uuid"] for s in snaps(p.vol)}

    verified: dict[str, str] = {seed_snap: primary_uuids()[seed_snap]}  # DR snapshots checked complete
    acked: set[str] = {seed_snap}  # commits a replicate reported (exit 0)
    dr_names = [seed_snap]

    def check_dr(when: str) -> list[str]:
        """No partial snapshot at the DR: each one is the primary's (uuid) and verifies; the DR only
        gains snapshots; every acknowledged commit is there. Returns the ones new since last time."""
        held = dr_snaps(du)
        names = [s["name"] for s in held]
        assert names[:len(dr_names)] == dr_names, f"{when}: the DR lost or reordered snapshots: {dr_names} -> {names}"
        assert acked <= set(names), f"{when}: acknowledged commits missing at the DR: {acked - set(names)}"
        mine = primary_uuids()
        new = names[len(dr_names):]
        for s in held[len(dr_names):]:
            assert mine.get(s["name"]) == s["uuid"], f"{when}: DR snapshot {s} is not one of the primary's"
            v = run_blockrep("verify", p.vol, s["name"], "--against", du, "--json", timeout=120)
            assert v.returncode == 0, f"{when}: DR snapshot {s['name']} is partial or wrong: {v.stdout}{v.stderr}"
            verified[s["name"]] = s["uuid"]
        dr_names[:] = names
        return new

    # ---- the rounds: until KILLS SIGKILLs of replicate (a run that ends before its kill moment is a
    # round without a kill); DR_KILLS of them also SIGKILL the DR first
    dr_at = sorted(rnd.sample(range(KILLS), DR_KILLS))  # before which replicate kill the DR dies
    batches = written_total = 0
    pending: tuple[set[str], int] | None = None  # (primary snapshots before the batch, its bytes)
    rounds: list[dict] = []
    plan_total: dict[str, int] = {}  # snapshot -> plan bytes of its transfer
    kills = dr_kills = 0
    dr_outcomes: list[str] = []
    phases = {"startup": 0, "copy": 0, "commit": 0, "after commit": 0}

    for i in range(4 * KILLS + 8):
        if kills >= KILLS:
            break
        if pending is None or any(n not in pending[0] for n in dr_names):  # the last batch is at the DR
            before = set(primary_uuids())
            n, union = write_batch(rnd, p.uri)
            pending = (before, union)
            written_total += n
            batches += 1
        prev = in_progress(p.vol, du)
        args = ["replicate", p.vol, "--to", du, "--rate", "16M", "--json"]
        resuming = prev is not None and prev["snapshot"] not in dr_names
        if restart == "named" and resuming:
            args += ["--snapshot", prev["snapshot"]]
        if resuming:
            plan_total.setdefault(prev["snapshot"], _plan_bytes(p.vol, dr_names[-1], prev))
            remaining = plan_total[prev["snapshot"]] - prev["done_upto"]
        else:
            remaining = pending[1]
        dr_kill = dr_kills < DR_KILLS and kills >= dr_at[dr_kills]
        rec: dict = {"round": i, "dr_kill": dr_kill, "done_before": prev["done_upto"] if resuming else 0,
                     "snap_before": prev["snapshot"] if resuming else None}
        pos0 = dr.position()
        log_at = dr.logs[-1].stat().st_size
        new: list[str] = []
        t0 = time.monotonic()
        proc = procs(*args)
        rec["expected_end"] = end = 0.3 + remaining / RATE  # startup, then the rate (within 0.05 s)
        if dr_kill:
            # the DR dies at a random moment of the run and is down for up to 1.5 s (plus its
            # restart); the worker retries (backoff 1, 2, 4 s: by ~3.5 s after the kill it has tried
            # again) and is SIGKILLed itself later
            t_dr, outage = rnd.uniform(0.1, max(0.2, end - 0.1)), rnd.uniform(0.1, 1.5)
            t_kill = t_dr + rnd.uniform(3.5, 6.0)
            while time.monotonic() - t0 < t_dr and proc.poll() is None:
                time.sleep(0.002)
            rec["t_dr"] = time.monotonic() - t0
            rec["run_alive_at_dr_kill"] = proc.poll() is None
            seen = dr.exports_seen(pos0, dr.position())
            rec["dr_killed_in"] = ("commit" if "data closed" in seen or "manifest" in seen else
                                   "copy" if "begin" in seen else "startup")
            dr.kill()
            dr_kills += 1
            time.sleep(outage)
            dr.start()
            rec["outage"] = time.monotonic() - t0 - rec["t_dr"]
            restarted_at = dr.position()
            new += check_dr(f"round {i}, after the DR's restart")
        else:
            # a random moment from the start to the run's expected end (startup ~0.3 s, then the rate:
            # measured within 0.05 s of the real end), or a moment anchored on what the DR's request
            # log shows (one kill in eight each; the windows are milliseconds wide):
            #   flush:  a flush returned (the race between a confirmation and its record)
            #   end:    the data connections closed after the last flush: everything is confirmed,
            #           the manifest and the commit request follow within ~6 ms
            #   commit: the manifest connection opened; the commit request follows within ~1 ms, and
            #           the DR verifies and commits in its open (~80 ms) whether or not the primary
            #           is still there
            rec["aim"] = rnd.choices(["time", "flush", "end", "commit"], weights=[5, 1, 1, 1])[0]
            if rec["aim"] == "time":
                t_kill = rnd.uniform(0.05, end)
            else:
                delay = {"flush": (0, 0.03), "end": (0, 0), "commit": (0, 0.15)}[rec["aim"]]
                hit = dr.wait_for_request(rec["aim"], log_at, proc, busy=rec["aim"] == "end")
                t_kill = (hit - t0 + rnd.uniform(*delay)) if hit else float("inf")
        while time.monotonic() - t0 < t_kill and proc.poll() is None:
            time.sleep(min(0.002, max(0.0, t_kill - (time.monotonic() - t0))))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            rec["killed_at"] = time.monotonic() - t0
            kills += 1
        else:
            rec["ended_at"] = time.monotonic() - t0
        out, err = proc.communicate(timeout=60)
        rec["rc"] = proc.returncode
        dr.quiet()
        new += check_dr(f"round {i} (rc {proc.returncode})")
        if proc.returncode == 0:
            res = parse_json(out)
            assert res and res["snapshot"] in dr_names, (out, err)
            acked.add(res["snapshot"])
        else:
            # a kill, or (in a round the DR was killed) a run that gave up: nothing else may fail it
            assert proc.returncode == -signal.SIGKILL or dr_kill, \
                f"round {i}: replicate exited {proc.returncode} without being killed: {out}{err}"
        rec["written"] = dr.written(pos0, dr.position())
        if dr_kill:
            # what the worker did about the dead DR: retried into the restarted one, or gave up
            # (exit 1: then the next run must resume the transfer, checked below like any other)
            rec["after_restart"] = dr.written(restarted_at, dr.position())
            rec["dr_outcome"] = ("ended before the DR kill" if not rec["run_alive_at_dr_kill"] else
                                 "gave up" if proc.returncode == 1 else
                                 "retried" if rec["after_restart"] or proc.returncode == 0 else "no retry")
            assert rec["dr_outcome"] != "no retry", \
                f"round {i}: {t_kill - rec['t_dr']:.1f} s after the DR died the worker still had not tried again: {rec}"
            # giving up is by design at the first contact (probe, !begin: "not worth a minute of
            # retries") and is what the manifest/commit step does; in the middle of the copy, a DR
            # that comes back within seconds must be retried
            assert not (rec["dr_outcome"] == "gave up" and rec["dr_killed_in"] == "copy"), \
                f"round {i}: the worker gave up on a DR killed mid-copy and back after {rec['outage']:.1f} s: {err}"
            dr_outcomes.append(rec["dr_outcome"])
        cur = in_progress(p.vol, du)
        # while nothing was committed, the interrupted transfer is the one that goes on
        if resuming and not new:
            if not cur or (cur["snapshot_uuid"], cur["token"]) != (prev["snapshot_uuid"], prev["token"]):
                print(f"  round {i:2}: in_progress changed without a commit: {prev} -> {cur}")
                raise NotResumed(f"round {i}: nothing was committed, yet in_progress changed from "
                                 f"{prev['snapshot']} token {prev['token']} done_upto {prev['done_upto']} to "
                                 f"{cur and cur['snapshot']} token {cur and cur['token']} done_upto "
                                 f"{cur and cur['done_upto']}")
            assert cur["done_upto"] >= prev["done_upto"], (prev, cur)
        # what the round added to the confirmed prefix, and what it wrote beyond that
        for name in new:
            base = dr_names[dr_names.index(name) - 1]
            plan_total.setdefault(name, _plan_bytes(p.vol, base, cur if cur and cur["snapshot"] == name else prev,
                                                    name))
        if new:
            # every snapshot the round committed: a bare run that resumed S commits S, then takes and
            # commits a new one on top of it (its delta may be empty), so count them all
            gain = sum(plan_total[n] for n in new) - (rec["done_before"] if rec["snap_before"] in new else 0)
        elif cur and cur["snapshot"] not in dr_names:
            gain = cur["done_upto"] - (rec["done_before"] if rec["snap_before"] == cur["snapshot"] else 0)
        else:
            gain = 0
        rec["gain"], rec["done_after"] = gain, (cur or {}).get("done_upto")
        rec["lost"] = rec["written"] - gain
        if "killed_at" in rec:
            seen = dr.exports_seen(pos0, dr.position())
            if new:
                phase = "after commit"  # the DR committed; the kill took the acknowledgement
            elif "manifest" in seen or ("data closed" in seen and cur and cur["done_upto"] >= _plan_bytes(
                    p.vol, dr_names[-1], cur)):
                phase = "commit"  # everything confirmed, not committed: the manifest, the commit request
            elif "begin" in seen:
                phase = "copy"  # the transfer was open: data, progress flushes and their records
            else:
                phase = "startup"  # before the transfer began (probe, snapshot, plan, !begin)
            phases[phase] += 1
            rec["phase"] = phase
        if rec.get("phase") == "after commit" and restart == "named":
            # the worker that restarts knows only in_progress: it names the snapshot the DR already
            # committed; that must be "already replicated", exit 0, nothing sent
            name = new[-1]
            at = dr.position()
            r = run_blockrep("replicate", p.vol, "--to", du, "--snapshot", name, "--json", timeout=60)
            res = parse_json(r.stdout) or {}
            assert r.returncode == 0 and res.get("already_replicated") and res["bytes_sent"] == 0, r.stdout + r.stderr
            dr.quiet()
            assert dr.written(at, dr.position()) == 0
            assert (in_progress(p.vol, du) or {}).get("snapshot") != name, \
                "the record of a committed snapshot stays 'in progress'"
        rounds.append(rec)
        what = (f"DR killed at {rec['t_dr']:.2f} s ({rec['dr_killed_in']}), back after {rec['outage']:.2f} s "
                f"({rec['dr_outcome']}, "
                f"{rec['after_restart'] / MiB:.1f} MiB into it); " if dr_kill else "")
        what += (f"killed at {rec['killed_at']:.2f} s ({rec['phase']}; aimed: {rec.get('aim', 'after DR')})"
                 if "killed_at" in rec
                 else f"exited {rec['rc']} at {rec['ended_at']:.2f} s")
        if rec["rc"] not in (0, -signal.SIGKILL):
            what += f" [{err.strip().splitlines()[-1] if err.strip() else 'no stderr'}]"
        if "expected_end" in rec:
            what += f" (expected end {rec['expected_end']:.2f} s)"
        print(f"  round {i:2}: {what}; written {rec['written'] / MiB:5.1f} MiB, confirmed +{gain / MiB:5.1f} MiB, "
              f"lost {rec['lost'] / MiB:5.1f} MiB, done_upto {rec['done_after']}, committed {new or '-'}")
        bound = WINDOW * (2 if dr_kill else 1)
        assert rec["lost"] <= bound, (f"round {i} re-sent {rec['lost']} B that had been confirmed or more than one "
                                      f"unconfirmed window ({bound} B): {rec}")
    assert kills == KILLS and dr_kills == DR_KILLS, (kills, dr_kills, len(rounds))

    # ---- one run to completion
    prev = in_progress(p.vol, du)
    args = ["replicate", p.vol, "--to", du, "--rate", "16M", "--json"]
    if restart == "named" and prev and prev["snapshot"] not in dr_names:
        args += ["--snapshot", prev["snapshot"]]
    pos0 = dr.position()
    r = run_blockrep(*args, timeout=180)
    assert r.returncode == 0, f"the final run failed: {r.stdout}{r.stderr}"
    final = json.loads(r.stdout)
    dr.quiet()
    new = check_dr("after the final run")
    acked.add(final["snapshot"])
    final_written = dr.written(pos0, dr.position())
    if prev and prev["snapshot"] == final["snapshot"]:
        assert final["resumed_from"] == prev["done_upto"], (final, prev)
        assert final["bytes_sent"] <= final["delta_bytes"] - final["resumed_from"], final
    assert in_progress(p.vol, du) is None
    v = run_blockrep("verify", p.vol, final["snapshot"], "--against", du, timeout=120)
    assert v.returncode == 0 and "identical" in v.stdout, v.stdout + v.stderr
    # the DR holds exactly the committed snapshots: the seed, every acknowledged one, and those whose
    # commit landed before a kill took the acknowledgement (each verified when it appeared)
    assert dr_names == [s["name"] for s in dr_snaps(du)]
    assert set(dr_names) == set(verified) and acked <= set(dr_names), (dr_names, acked, verified)
    mine = primary_uuids()
    assert all(mine[n] == u for n, u in verified.items())

    # ---- the DR's counts: stop it cleanly so its stats filter writes its totals
    end_pos = dr.position()
    dr.stop()
    # and the DR volume's own snapshot list, unserved: the same snapshots, the same uuids
    assert {s["name"]: s["uuid"] for s in snaps(dr.vol)} == verified
    for inc in (0, len(dr.logs) - 1):  # the DR processes that exited cleanly: the seed's and the last
        stats = parse_stats(dr.stats[inc]).get("write", {"bytes": 0})["bytes"]
        logged = dr.written((inc, 0), (inc, len(_lines(dr.logs[inc]))))
        assert abs(stats - logged) <= 0.005 * max(logged, 1) + 64 * KiB, (inc, stats, logged)
    written = dr.written(start_pos, end_pos)
    changed = sum(sum(n for _, n in diff_bytes(p.vol, a, b)) for a, b in pairwise(dr_names))
    ratio = written / changed
    bound = 1 + (kills + dr_kills) * WINDOW / changed
    seconds = time.monotonic() - t_start
    print(f"R15 ({restart}): {kills} replicate SIGKILLs in {len(rounds)} rounds (at {phases}), {dr_kills} DR "
          f"SIGKILLs ({', '.join(dr_outcomes)}); {batches} batch(es) of random data ({written_total / MiB:.1f} MiB "
          f"written, {changed / MiB:.1f} MiB changed), {len(dr_names) - 1} snapshot(s) committed; the final run "
          f"resumed from {final['resumed_from']} and sent {final_written / MiB:.1f} MiB")
    print(f"R15 ({restart}): written at the DR {written / MiB:.1f} MiB (stats filter of the last DR process "
          f"{stats / MiB:.1f} MiB = its log {logged / MiB:.1f} MiB); re-sent/dirty ratio {ratio:.3f} "
          f"(bound {bound:.3f}); worst round lost {max(x['lost'] for x in rounds) / MiB:.1f} MiB; "
          f"{seconds:.0f} s")
    assert changed >= BATCH // 2, changed  # the batches were shipped (a vacuous ratio otherwise)
    assert ratio >= 1 - 0.01, f"less written at the DR ({written}) than changed ({changed}): the count is wrong"
    assert ratio <= bound, f"re-sent/dirty ratio {ratio:.3f} above {bound:.3f}"


def _plan_bytes(vol, base: str, progress: dict | None, name: str | None = None) -> int:
    """Plan bytes of the transfer of snapshot `name` (default: progress's) on top of DR snapshot
    `base`: the primary's delta, with the DR-side changes the run merged in (in_progress's dr_dirty)."""
    name = name or progress["snapshot"]
    dirty = [tuple(e) for e in (progress or {}).get("dr_dirty") or []] \
        if progress and progress["snapshot"] == name else []
    return merged_total(diff_bytes(vol, base, name), dirty)
