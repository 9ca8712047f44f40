"""Asynchronous replication end to end (DESIGN.md M6, M9, M12; RELIABILITY.md R13-R15, R17).

Every test uses real parts: the primary is a volume served by `blockrep serve` (nbdkit + the
plugin), the DR site is a second `blockrep serve` or a plain NBD server (qemu-nbd over qcow2,
nbdkit memory/file, nbd-server), the copies are compared with `nbdcopy` + `cmp` and `qemu-img
compare`, bytes on the wire are counted by nbdkit's stats filter in front of the target, and
faults are real SIGKILLs of the DR server and of the replicating process.

    primary (blockrep serve) --@SNAP--> blockrep replicate --NBD--> DR (any NBD server)
                                                                     └─ blockrep DR: @SNAP exports

Numbers this file measures and prints (run with -s to see them): bytes shipped per changed byte
for scattered 4 KiB writes (perf target <= 1.05), and, in the slow netns test, the replication
time over a 100 Mbit/s tbf link divided by changed_bytes / 12.5e6 (target <= 1.1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import nbd
import pytest
from blockdev import attached, mounted
from conftest import BLOCKREP, run_blockrep
from replhelp import (  # noqa: F401  (fixtures too)
    ERROR_PREFIX,
    VOL_SIZE,
    KiB,
    MiB,
    Target,
    assert_cmp,
    assert_export_equals,
    assert_one_error_line,
    connected,
    dr_snapshots,
    free_port,
    local_snapshots,
    nbd_exports,
    nbdcopy_to,
    nbdkit_target,
    parse_stats,
    replicate,
    replication_state,
    scattered_offsets,
    sh,
    snapshot,
    status,
    uri,
    wait_for,
    write_blocks,
)

# -------------------------------------------------------------- 1. blockrep primary -> blockrep DR

def test_blockrep_dr_seed_incremental_snapshots_immutable_and_verify(make_server, tmp_path):
    """R13 round by round: seed then incremental to a blockrep DR; the DR exports @s1 and @s2,
    each byte-equal (nbdcopy + cmp) to the primary's; verify passes; later DR head writes never
    change a DR snapshot, and verify against the DR head names exactly the extent written there."""
    rnd = random.Random(1301)
    p = make_server("primary")
    dr = make_server("dr")
    work = tmp_path / "work"
    work.mkdir()

    # round 1: data in scattered blocks and one large extent, holes elsewhere, one zeroed range
    big = (40 * MiB, 3 * MiB + 4 * KiB)
    blocks = {o: rnd.randbytes(4 * KiB) for o in scattered_offsets(rnd, 64, avoid=[big, (50 * MiB, 256 * KiB)])}
    blocks[big[0]] = rnd.randbytes(big[1])
    write_blocks(p.uri, blocks)
    with connected(p.uri) as h:
        h.zero(256 * KiB, 50 * MiB)
    snapshot(p.vol, "s1")
    r1 = replicate(p.vol, dr.uri, "--snapshot", "s1")
    assert r1["snapshot"] == "s1" and r1["base"] is None and r1["full"] is True
    assert r1["target_is_blockrep"] is True
    data_bytes = sum(len(d) for d in blocks.values())
    # the seed covers the whole volume: data as writes, holes as write-zeroes
    assert r1["delta_bytes"] == VOL_SIZE, r1
    assert r1["bytes_sent"] == data_bytes, r1
    assert r1["bytes_zeroed"] == VOL_SIZE - data_bytes, r1
    assert dr_snapshots(dr) == ["s1"]
    assert_export_equals(uri(p.sock, "@s1"), uri(dr.sock, "@s1"), work, "r1")
    run_blockrep("verify", p.vol, "s1", "--against", uri(dr.sock, "@s1"), check=True)

    # round 2: overwrite some blocks, add new ones, zero and trim some of round 1's data
    changed = {}
    old = sorted(blocks)
    for o in old[:10]:
        changed[o] = rnd.randbytes(4 * KiB)
    for o in scattered_offsets(rnd, 20, avoid=blocks):
        changed[o] = rnd.randbytes(4 * KiB)
    write_blocks(p.uri, changed)
    with connected(p.uri) as h:
        h.zero(4 * KiB, old[10])
        h.trim(4 * KiB, old[11])
        h.flush()
    snapshot(p.vol, "s2")
    r2 = replicate(p.vol, dr.uri, "--snapshot", "s2")
    assert r2["base"] == "s1" and r2["full"] is False, r2
    assert r2["bytes_sent"] == 30 * 4 * KiB, r2  # only the changed blocks
    assert r2["bytes_zeroed"] >= 8 * KiB, r2   # the zeroed and the trimmed block
    assert dr_snapshots(dr) == ["s1", "s2"]
    assert_export_equals(uri(p.sock, "@s2"), uri(dr.sock, "@s2"), work, "r2")
    assert_export_equals(uri(p.sock, "@s1"), uri(dr.sock, "@s1"), work, "r2s1")  # s1 untouched
    run_blockrep("verify", p.vol, "s2", "--against", uri(dr.sock, "@s2"), check=True)
    run_blockrep("verify", p.vol, "s1", "--against", uri(dr.sock, "@s1"), check=True)
    with connected(uri(dr.sock, "@s2")) as h:
        assert h.pread(4 * KiB, old[10]) == bytes(4 * KiB)
        assert h.pread(4 * KiB, old[0]) == changed[old[0]]

    # s1 against the DR's s2: verify names every 1 MiB chunk that changed between them, exit 1
    r = run_blockrep("verify", p.vol, "s1", "--against", uri(dr.sock, "@s2"))
    assert r.returncode == 1
    reported = [tuple(map(int, ln.split())) for ln in r.stdout.splitlines()]
    touched = sorted({o // MiB * MiB for o in [*changed, old[10], old[11]]})
    covered = sorted({o for off, n in reported for o in range(off, off + n, MiB)})
    assert covered == touched, (reported, touched)
    assert r.stderr.startswith(ERROR_PREFIX) and "differ" in r.stderr

    # the DR is append-only: its head (bound to the primary) and its snapshots refuse writes
    victim = old[3]
    for u in (dr.uri, uri(dr.sock, "@s2")):
        with connected(u) as h:
            with pytest.raises(nbd.Error, match="EPERM|not permitted"):
                h.pwrite(b"\xee" * 4 * KiB, victim)
            with pytest.raises(nbd.Error):
                h.trim(2 * MiB, 40 * MiB)
    assert_export_equals(uri(p.sock, "@s2"), uri(dr.sock, "@s2"), work, "after-head-write")
    # verify against the DR server's own URI opens @s2 there
    r = run_blockrep("verify", p.vol, "s2", "--against", dr.uri, check=True)
    assert "identical" in r.stdout

    # restarting the DR keeps every snapshot and its content
    dr.restart()
    assert dr_snapshots(dr) == ["s1", "s2"]
    run_blockrep("verify", p.vol, "s1", "--against", uri(dr.sock, "@s1"), check=True)
    run_blockrep("verify", p.vol, "s2", "--against", uri(dr.sock, "@s2"), check=True)


def test_replicate_again_is_a_no_op_and_unserved_primary_works(make_server, tmp_path):
    """Shipping a snapshot the DR already has sends nothing; a primary that is not served is
    served privately for the run (and left unserved)."""
    p = make_server("primary")
    dr = make_server("dr")
    write_blocks(p.uri, {0: os.urandom(MiB)})
    p.stop()
    r = replicate(p.vol, dr.uri)  # no --snapshot: takes one now
    name = r["snapshot"]
    assert local_snapshots(p.vol) == [name]
    assert dr_snapshots(dr) == [name]
    assert r["bytes_sent"] == MiB
    assert not p.running, "the private source server must be stopped after the run"
    again = replicate(p.vol, dr.uri, "--snapshot", name)
    assert again["bytes_sent"] == 0 and again.get("already_replicated"), again
    run_blockrep("verify", p.vol, name, "--against", uri(dr.sock, "@" + name), check=True)
    assert not p.running


# ------------------------------------------------------------------ 3. plain NBD servers as target

def _qemu_nbd(tmp_path, targets, size=VOL_SIZE):
    img = tmp_path / "dr.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, size)
    sock = tmp_path / "qemu-nbd.sock"
    t = targets(["qemu-nbd", "-f", "qcow2", "-k", sock, "--persistent", "--cache=writeback", img],
                uri(sock), sock=sock)
    return t, img, "qcow2"


def _nbdkit_memory(tmp_path, targets, size=256 * MiB):
    cmd, u, sock = nbdkit_target(tmp_path, "memory", ["memory", str(size)])
    return targets(cmd, u, sock=sock), None, None


def _nbd_server(tmp_path, targets, size=VOL_SIZE, flush=True):
    img = tmp_path / "nbd-server.img"
    with open(img, "wb") as f:
        f.truncate(size)
    port = free_port()
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nallowlist = true\n"
                    f"[disk]\nexportname = {img}\nflush = {str(flush).lower()}\ntrim = true\n")
    pidfile = tmp_path / "nbd-server.pid"
    t = targets(["nbd-server", "-C", conf, "-p", pidfile], f"nbd://127.0.0.1:{port}/disk",
                pidfile=pidfile, tcp=("127.0.0.1", port))
    return t, img, "raw"


PLAIN_TARGETS = {"qemu-nbd-qcow2": _qemu_nbd, "nbdkit-memory": _nbdkit_memory}
if shutil.which("nbd-server"):
    PLAIN_TARGETS["nbd-server"] = _nbd_server
    # without `flush = true` nbd-server refuses NBD_CMD_FLUSH (can_flush false): writes go through
    PLAIN_TARGETS["nbd-server-noflush"] = lambda tmp_path, targets: _nbd_server(tmp_path, targets, flush=False)


@pytest.mark.parametrize("kind", sorted(PLAIN_TARGETS))
def test_plain_nbd_target_seed_incremental_full(kind, make_server, targets, tmp_path):
    """Any NBD server as the DR: seed, then incremental runs that send only the changed blocks
    (the primary remembers the last shipped snapshot per target), then --full sends everything."""
    rnd = random.Random(hash(kind) & 0xffff)
    p = make_server("primary")
    t, img, fmt = PLAIN_TARGETS[kind](tmp_path, targets)
    work = tmp_path / "work"
    work.mkdir()

    blocks = {o: rnd.randbytes(4 * KiB) for o in scattered_offsets(rnd, 40, avoid=[(8 * MiB, 2 * MiB)])}
    blocks[8 * MiB] = rnd.randbytes(2 * MiB)
    write_blocks(p.uri, blocks)
    # the target holds old data where the primary has holes: the seed must zero it
    write_blocks(t.uri, {20 * MiB: b"\xab" * MiB, VOL_SIZE - MiB: b"\xcd" * MiB, 8 * MiB: b"\xef" * 4 * MiB})
    r1 = replicate(p.vol, t.uri)
    s1 = r1["snapshot"]
    assert r1["full"] and r1["base"] is None and not r1["target_is_blockrep"]
    written = sum(len(d) for d in blocks.values())
    assert r1["bytes_sent"] == written, r1
    assert_export_equals(uri(p.sock, "@" + s1), t.uri, work, "seed")
    run_blockrep("verify", p.vol, s1, "--against", t.uri, check=True)

    changed = {o: rnd.randbytes(4 * KiB) for o in scattered_offsets(rnd, 25, avoid=blocks)}
    changed[8 * MiB + 64 * KiB] = rnd.randbytes(4 * KiB)  # inside the big extent
    write_blocks(p.uri, changed)
    r2 = replicate(p.vol, t.uri)
    s2 = r2["snapshot"]
    assert r2["base"] == s1 and not r2["full"], r2
    assert r2["bytes_sent"] == 26 * 4 * KiB, r2
    assert_export_equals(uri(p.sock, "@" + s2), t.uri, work, "incr")
    if img is not None:
        # qemu-img compare of the primary snapshot with the target's own image file
        sh("qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, uri(p.sock, "@" + s2), img)
    st = {row["target"]: row for row in status(p.vol)}[t.uri]
    assert st["snapshot"] == s2 and st["pending_bytes"] == 0 and st["last_error"] is None

    # --full: every written byte goes again (no base, no rewrite suppression)
    r3 = replicate(p.vol, t.uri, "--full")
    assert r3["full"] and r3["base"] is None
    assert r3["bytes_sent"] == written + 25 * 4 * KiB, r3
    assert_export_equals(uri(p.sock, "@" + r3["snapshot"]), t.uri, work, "full")


def test_target_lost_its_data_full_resend_repairs_it(make_server, targets, tmp_path):
    """An nbdkit memory target restarted empty: an incremental run cannot know, verify catches it
    (exit 1), and --full repairs it."""
    p = make_server("primary")
    cmd, u, sock = nbdkit_target(tmp_path, "mem", ["memory", "64M"])
    t = targets(cmd, u, sock=sock)
    write_blocks(p.uri, {0: os.urandom(2 * MiB)})
    s1 = replicate(p.vol, u)["snapshot"]
    t.kill()
    t.start()
    r = run_blockrep("verify", p.vol, s1, "--against", u)
    assert r.returncode == 1 and r.stdout.split() == ["0", str(2 * MiB)], (r.stdout, r.stderr)
    s2 = replicate(p.vol, u, "--full")["snapshot"]
    run_blockrep("verify", p.vol, s2, "--against", u, check=True)


# ------------------------------------------------------------------------ 4. bytes on the wire

def test_bytes_on_the_wire_incremental_rewrite_suppression_and_zeroes(make_server, targets, tmp_path):
    """nbdkit's stats filter in front of the target counts what really arrived. Seed: only the
    data (holes skipped, zeroed ranges as zero commands). Incremental after N scattered 4 KiB
    writes: <= 1.05 x N x 4 KiB written at the target; blocks rewritten with identical data are
    not sent (bytes_skipped); blocks zeroed on the primary go as zero commands, not data."""
    rnd = random.Random(4404)
    p = make_server("primary")
    img = tmp_path / "target.img"
    with open(img, "wb") as f:
        f.truncate(VOL_SIZE)
    sock = tmp_path / "stats.sock"
    stats_file = tmp_path / "stats.txt"

    def start_target():
        stats_file.unlink(missing_ok=True)
        return targets(["nbdkit", "-f", "-U", sock, "--filter=stats", "file", img,
                        f"statsfile={stats_file}"], uri(sock), sock=sock)

    # seed: 8 MiB of data in 1 MiB pieces across the volume, a zeroed 2 MiB range, holes
    seed = {o: rnd.randbytes(MiB) for o in range(0, VOL_SIZE, 8 * MiB)}
    write_blocks(p.uri, seed)
    with connected(p.uri) as h:
        h.zero(2 * MiB, 20 * MiB)
        h.flush()
    t = start_target()
    r1 = replicate(p.vol, t.uri)
    t.stop()
    st = parse_stats(stats_file)
    assert st["write"]["bytes"] == 8 * MiB, st
    assert st.get("zero", {}).get("bytes", 0) >= 2 * MiB, st
    assert r1["bytes_sent"] == 8 * MiB

    # incremental: N fresh scattered blocks, M identical rewrites, K blocks zeroed
    n, per_seed = 200, 6
    offs = scattered_offsets(rnd, n, avoid=seed)
    fresh = {o: rnd.randbytes(4 * KiB) for o in offs}
    # zero one 4 KiB block inside each seeded MiB
    zeroed = [b + 128 * KiB for b in sorted(seed)]
    k = len(zeroed)
    # rewrite 6 blocks of each seeded MiB with the bytes they already hold
    rewrites = {b + 512 * KiB + 4 * KiB * j: seed[b][512 * KiB + 4 * KiB * j:][:4 * KiB]
                for b in seed for j in range(per_seed)}
    m = len(rewrites)
    write_blocks(p.uri, {**fresh, **rewrites})
    with connected(p.uri) as h:
        for o in zeroed:
            h.zero(4 * KiB, o)
        h.flush()
    t = start_target()
    r2 = replicate(p.vol, t.uri)
    t.stop()
    st = parse_stats(stats_file)
    changed = n * 4 * KiB
    wire = st["write"]["bytes"]
    ratio = wire / changed
    print(f"\nbytes shipped per changed byte (scattered 4 KiB writes, n={n}): {ratio:.4f} "
          f"(target writes {wire} B in {st['write']['ops']} ops, zero {st.get('zero')}, "
          f"skipped {r2['bytes_skipped']} B)")
    assert r2["base"] == r1["snapshot"]
    assert r2["bytes_sent"] == changed, r2
    assert r2["bytes_skipped"] == m * 4 * KiB, r2
    assert wire <= 1.05 * changed, st
    assert wire >= changed * 0.995, st  # (stats rounds to two decimals)
    assert st["write"]["ops"] == n, st  # one write per scattered block
    assert st.get("zero", {}).get("bytes", 0) >= k * 4 * KiB, st
    # the target file equals the snapshot
    assert_cmp(nbdcopy_to(uri(p.sock, "@" + r2["snapshot"]), tmp_path / "snap.img"), img)


# ------------------------------------------------------------------------- 5. faults (R14, R15)

def _fill(u: str, size: int, start: int = 0) -> None:
    with connected(u) as h:
        for o in range(start, start + size, 4 * MiB):
            h.pwrite(os.urandom(4 * MiB), o)
        h.flush()


def test_dr_killed_mid_transfer_no_partial_snapshot_then_resume(make_server, procs, tmp_path):
    """R14/R15 against a blockrep DR: SIGKILL the DR server once progress has been confirmed,
    then SIGKILL the replicating process while it retries. The interrupted snapshot does not
    exist at the DR after its restart, the earlier one is intact, status shows the confirmed
    progress, and a rerun resends only what was not confirmed, then commits; verify passes."""
    p = make_server("primary")
    dr = make_server("dr")
    _fill(p.uri, 2 * MiB)
    snapshot(p.vol, "base")
    replicate(p.vol, dr.uri, "--snapshot", "base")
    _fill(p.uri, 32 * MiB, start=16 * MiB)
    snapshot(p.vol, "big")
    # 32 MiB at 4 MiB/s: ~8 s; progress is confirmed every 5 s
    proc = procs("replicate", p.vol, "--to", dr.uri, "--snapshot", "big", "--rate", "4M", "--json")
    def confirmed():
        prog = (replication_state(p.vol).get(dr.uri) or {}).get("in_progress") or {}
        return prog if prog.get("done_upto", 0) > 0 else None
    prog = wait_for(confirmed, timeout=20, what="confirmed progress in replication.json")
    assert prog["snapshot"] == "big" and prog["mode"] == "incremental" and prog["done_upto"] > 0, prog
    dr.kill()
    # the worker notices and retries (records the error) instead of dying
    wait_for(lambda: (replication_state(p.vol).get(dr.uri) or {}).get("last_error"), timeout=20,
             what="the replicator to record the transfer error")
    assert proc.poll() is None, f"replicate gave up at once: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    dr.start()
    assert dr_snapshots(dr) == ["base"], "an interrupted transfer must never become a DR snapshot"
    run_blockrep("verify", p.vol, "base", "--against", uri(dr.sock, "@base"), check=True)
    row = {r["target"]: r for r in status(p.vol)}[dr.uri]
    assert row["in_progress"]["snapshot"] == "big"
    done = row["in_progress"]["done_upto"]
    assert done > 0 and row["last_error"], row
    assert row["snapshot"] == "base"

    r = replicate(p.vol, dr.uri, "--snapshot", "big")
    assert r["base"] == "base" and r["delta_bytes"] == 32 * MiB
    assert r["bytes_sent"] <= r["delta_bytes"] - done, (r, done)
    assert r["bytes_sent"] < r["delta_bytes"]
    print(f"\nresume after kill: confirmed {done} of {r['delta_bytes']} B before the kill, "
          f"re-sent {r['bytes_sent']} B")
    assert dr_snapshots(dr) == ["base", "big"]
    run_blockrep("verify", p.vol, "big", "--against", uri(dr.sock, "@big"), check=True)
    assert_export_equals(uri(p.sock, "@big"), uri(dr.sock, "@big"), tmp_path, "resumed")
    row = {r["target"]: r for r in status(p.vol)}[dr.uri]
    assert row["in_progress"] is None and row["last_error"] is None and row["snapshot"] == "big"


def test_plain_target_killed_and_restarted_replicate_retries_and_completes(make_server, targets, procs, tmp_path):
    """R14 against a plain server: nbdkit file (with a 20 ms write delay) is SIGKILLed
    mid-transfer and comes back a second later; replicate retries with backoff, completes
    with exit 0, and the target equals the snapshot."""
    p = make_server("primary")
    img = tmp_path / "target.img"
    with open(img, "wb") as f:
        f.truncate(VOL_SIZE)
    cmd, u, sock = nbdkit_target(tmp_path, "slow", ["file", img], filters=["delay"])
    cmd.append("delay-write=20ms")
    t = targets(cmd, u, sock=sock)
    _fill(p.uri, 8 * MiB)
    snapshot(p.vol, "s1")
    proc = procs("replicate", p.vol, "--to", u, "--snapshot", "s1", "--rate", "4M", "--json")
    time.sleep(0.8)
    assert proc.poll() is None
    t.kill()
    wait_for(lambda: (replication_state(p.vol).get(u) or {}).get("last_error"), timeout=20,
             what="the transfer error to be recorded")
    t.start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["snapshot"] == "s1"
    assert_cmp(nbdcopy_to(uri(p.sock, "@s1"), tmp_path / "s1.img"), img)
    row = {r["target"]: r for r in status(p.vol)}[u]
    assert row["last_error"] is None and row["snapshot"] == "s1" and row["in_progress"] is None


def test_unreachable_target_fails_cleanly_and_changes_nothing(make_server, tmp_path):
    p = make_server("primary")
    write_blocks(p.uri, {0: os.urandom(64 * KiB)})
    snapshot(p.vol, "keep1")
    snapshot(p.vol, "keep2")
    before = local_snapshots(p.vol)
    for to in (uri(tmp_path / "nobody-listens.sock"), f"nbd://127.0.0.1:{free_port()}/"):
        t0 = time.monotonic()
        r = run_blockrep("replicate", p.vol, "--to", to, "--keep-local", "1")
        msg = assert_one_error_line(r)
        assert "unreachable" in msg or "connect" in msg, msg
        assert time.monotonic() - t0 < 10, "an unreachable target is not worth retrying for a minute"
        assert local_snapshots(p.vol) == before  # no new snapshot, nothing pruned
        rec = replication_state(p.vol)[to]  # the failed run is recorded, nothing else
        assert "snapshot" not in rec and rec["last_failure"]["result"] == "failed", rec


def test_target_smaller_than_volume_is_refused(make_server, targets, tmp_path):
    p = make_server("primary")
    write_blocks(p.uri, {0: os.urandom(64 * KiB)})
    cmd, u, sock = nbdkit_target(tmp_path, "small", ["memory", "32M"])
    targets(cmd, u, sock=sock)
    small_dr = make_server("smalldr", size="32M")
    for to in (u, small_dr.uri):
        r = run_blockrep("replicate", p.vol, "--to", to)
        msg = assert_one_error_line(r)
        assert "smaller" in msg, msg
    assert local_snapshots(p.vol) == []
    assert dr_snapshots(small_dr) == []


def test_read_only_target_is_refused(make_server, targets, tmp_path):
    p = make_server("primary")
    write_blocks(p.uri, {0: os.urandom(64 * KiB)})
    dr = make_server("dr")
    snapshot(p.vol, "s1")
    replicate(p.vol, dr.uri, "--snapshot", "s1")
    snapshot(p.vol, "s2")
    r = run_blockrep("replicate", p.vol, "--to", uri(dr.sock, "@s1"), "--snapshot", "s2")
    assert "read-only" in assert_one_error_line(r)
    assert dr_snapshots(dr) == ["s1"]


# ------------------------------------------------- 6. retention, status, rate, transient errors

def test_keep_local_keep_remote_prune_after_success_and_status_shape(make_server, tmp_path):
    p = make_server("primary")
    dr = make_server("dr")
    names = []
    for i in range(5):
        write_blocks(p.uri, {i * MiB: os.urandom(64 * KiB)})
        r = replicate(p.vol, dr.uri, "--keep-local", "2", "--keep-remote", "3")
        names.append(r["snapshot"])
        assert r["base"] == (names[-2] if i else None), r
        assert local_snapshots(p.vol) == names[-2:]
        # the DR's retention is its own: without --allow-remote-prune the request is ignored
        assert dr_snapshots(dr) == names and r["keep_remote"].startswith("ignored"), r
        if i:
            assert r["bytes_sent"] == 64 * KiB, r
    # a failing run prunes nothing, on either side
    snapshot(p.vol, "extra")
    before_local, before_remote = local_snapshots(p.vol), dr_snapshots(dr)
    r = run_blockrep("replicate", p.vol, "--to", uri(tmp_path / "gone.sock"), "--snapshot", "extra",
                     "--keep-local", "1", "--keep-remote", "1")
    assert_one_error_line(r)
    assert local_snapshots(p.vol) == before_local and dr_snapshots(dr) == before_remote
    # every DR snapshot that is kept still verifies
    for n in dr_snapshots(dr):
        if n in local_snapshots(p.vol):
            run_blockrep("verify", p.vol, n, "--against", uri(dr.sock, "@" + n), check=True)

    # status --json: one row per target with the documented keys
    write_blocks(p.uri, {30 * MiB: os.urandom(3 * 4 * KiB)})
    rows = status(p.vol)
    row = {r["target"]: r for r in rows}[dr.uri]
    assert set(row) >= {"target", "snapshot", "replicated_at", "rpo_seconds", "pending_bytes",
                        "last_rate", "last_error", "in_progress"}, row
    assert row["snapshot"] == names[-1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["replicated_at"]), row
    assert isinstance(row["rpo_seconds"], int) and 0 <= row["rpo_seconds"] < 120, row
    assert row["pending_bytes"] == 3 * 4 * KiB, row
    assert row["last_error"] is None and row["in_progress"] is None
    text = run_blockrep("status", p.vol, check=True).stdout
    assert dr.uri in text and names[-1] in text


def test_status_of_a_never_replicated_volume(make_server):
    p = make_server("primary", start=False)
    assert status(p.vol) == []
    assert "no replication targets" in run_blockrep("status", p.vol, check=True).stdout
    r = run_blockrep("status", p.vol.parent / "no-such-volume")
    assert_one_error_line(r)


def test_rate_caps_throughput(make_server, tmp_path):
    p = make_server("primary")
    dr = make_server("dr")
    _fill(p.uri, 4 * MiB)
    t0 = time.monotonic()
    r = replicate(p.vol, dr.uri, "--rate", "2M")
    wall = time.monotonic() - t0
    # 4 MiB at 2 MiB/s: no faster than 2 s (the limiter allows no initial burst)
    assert r["bytes_sent"] == 4 * MiB
    assert r["seconds"] >= 1.9, r
    assert 4 * MiB / r["seconds"] <= 2 * MiB * 1.05, r
    assert wall < 15, wall
    print(f"\n--rate 2M: 4 MiB in {r['seconds']} s ({4 / r['seconds']:.2f} MiB/s)")
    # unlimited is much faster
    _fill(p.uri, 4 * MiB)
    fast = replicate(p.vol, dr.uri)
    assert fast["seconds"] < r["seconds"] / 2, (fast, r)


def test_transient_write_errors_are_retried_then_succeed(make_server, targets, procs, tmp_path):
    """nbdkit's error filter fails every write while a trigger file exists: replicate records the
    error, backs off, retries, and completes once the errors stop."""
    p = make_server("primary")
    img = tmp_path / "t.img"
    with open(img, "wb") as f:
        f.truncate(VOL_SIZE)
    trigger = tmp_path / "fail-now"
    trigger.touch()
    cmd, u, sock = nbdkit_target(tmp_path, "err", ["file", img], filters=["error"])
    cmd += ["error-pwrite=EIO", "error-pwrite-rate=100%", f"error-file={trigger}"]
    targets(cmd, u, sock=sock)
    _fill(p.uri, 2 * MiB)
    proc = procs("replicate", p.vol, "--to", u, "--json")
    wait_for(lambda: (replication_state(p.vol).get(u) or {}).get("last_error"), timeout=20,
             what="the write error to be recorded")
    assert proc.poll() is None, proc.communicate()
    trigger.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert_cmp(nbdcopy_to(uri(p.sock, "@" + res["snapshot"]), tmp_path / "s.img"), img)
    assert status(p.vol)[0]["last_error"] is None


def test_killed_replicate_of_unserved_volume_leaves_no_server_behind(make_server, procs, tmp_path):
    p = make_server("primary")
    dr = make_server("dr")
    _fill(p.uri, 8 * MiB)
    snapshot(p.vol, "s1")
    p.stop()
    proc = procs("replicate", p.vol, "--to", dr.uri, "--snapshot", "s1", "--rate", "2M")
    wait_for(lambda: (replication_state(p.vol).get(dr.uri) or {}).get("in_progress"), timeout=20,
             what="the transfer to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphan = p.pid
    try:
        wait_for(lambda: not p.running, timeout=5, what="the private source server to exit")
    except AssertionError:
        raise AssertionError(f"nbdkit {orphan} still serves {p.vol} after its replicate was killed") from None
    finally:
        p.teardown()
    p.start()  # the volume can be served again


# ---------------------------------------------- R14: "complete but wrong" must never happen

class CorruptingProxy:
    """A Unix-socket proxy in front of an NBD server that flips one byte of the client-to-server
    stream once `after` bytes have gone that way (in practice inside a write payload)."""

    def __init__(self, listen: Path, upstream: Path, after: int):
        import threading
        self.listen, self.upstream, self.after = listen, upstream, after
        self.forwarded = 0
        self.flipped = False
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(listen))
        self.srv.listen(64)
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.closing:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.connect(str(self.upstream))
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, a, b, upstream: bool):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if upstream:
                    with self.lock:
                        start = self.forwarded
                        self.forwarded += len(data)
                        if not self.flipped and start <= self.after < self.forwarded:
                            i = self.after - start
                            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                            self.flipped = True
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.closing = True
        self.srv.close()


def assert_committed_right_or_failed(p, dr, name, r):
    """Either the run failed (and committed nothing) or the DR snapshot it committed is right."""
    if name in dr_snapshots(dr):
        v = run_blockrep("verify", p.vol, name, "--against", uri(dr.sock, "@" + name))
        assert v.returncode == 0, f"replicate exited {r.returncode} and committed a wrong DR snapshot: {v.stdout}"
    else:
        assert r.returncode != 0


def test_bytes_corrupted_in_flight_never_become_a_dr_snapshot(make_server, tmp_path):
    p = make_server("primary")
    dr = make_server("dr")
    _fill(p.uri, 8 * MiB)
    snapshot(p.vol, "s1")
    proxy = CorruptingProxy(tmp_path / "proxy.sock", dr.sock, after=3 * MiB + 12345)
    try:
        r = run_blockrep("replicate", p.vol, "--to", uri(tmp_path / "proxy.sock"), "--snapshot", "s1", timeout=120)
    finally:
        proxy.close()
    assert proxy.flipped, "the proxy never corrupted anything: the test did not test"
    # either the run fails (and commits nothing) or the DR snapshot it committed is right
    assert_committed_right_or_failed(p, dr, "s1", r)


def test_dr_head_written_at_dr_site_is_not_carried_into_next_snapshot(make_server, tmp_path):
    p = make_server("primary")
    dr = make_server("dr")
    write_blocks(p.uri, {0: os.urandom(MiB), 16 * MiB: os.urandom(MiB)})
    snapshot(p.vol, "s1")
    replicate(p.vol, dr.uri, "--snapshot", "s1")
    # nobody writes a bound DR's head behind the primary's back: it is read-only over NBD
    with connected(dr.uri) as h:
        assert h.is_read_only()
        with pytest.raises(nbd.Error, match="EPERM|not permitted|read-only"):
            h.pwrite(b"\x99" * 4 * KiB, 16 * MiB)
    write_blocks(p.uri, {4 * MiB: os.urandom(4 * KiB)})
    snapshot(p.vol, "s2")
    r = run_blockrep("replicate", p.vol, "--to", dr.uri, "--snapshot", "s2")
    assert_committed_right_or_failed(p, dr, "s2", r)


# ---------------------------------------------------------------------------- 7. TLS-PSK link

def test_tls_psk_replication_and_plaintext_refused(make_server, tmp_path):
    p = make_server("primary")
    psk = tmp_path / "psk"
    psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    port = free_port()
    dr = make_server("dr", start=False)
    dr.serve_args = ["--listen", f"127.0.0.1:{port}", "--tls-psk", psk]
    dr.start()
    tls = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}"
    write_blocks(p.uri, {0: os.urandom(MiB), 32 * MiB: os.urandom(64 * KiB)})
    snapshot(p.vol, "t1")

    # plaintext to a TLS-only DR: refused before anything moves; no snapshot anywhere
    for plain in (f"nbd://127.0.0.1:{port}/", f"nbd://alice@127.0.0.1:{port}/"):
        r = run_blockrep("replicate", p.vol, "--to", plain, "--snapshot", "t1")
        assert_one_error_line(r)
    r = run_blockrep("replicate", p.vol, "--to", f"nbd://127.0.0.1:{port}/")  # would take a snapshot
    assert_one_error_line(r)
    assert local_snapshots(p.vol) == ["t1"]
    # a wrong key is refused too
    wrong = tmp_path / "wrong"
    wrong.write_text(f"alice:{secrets.token_hex(32)}\n")
    r = run_blockrep("replicate", p.vol, "--to", f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={wrong}",
                     "--snapshot", "t1")
    assert_one_error_line(r)
    assert dr_snapshots_tls(tls) == []

    res = replicate(p.vol, tls, "--snapshot", "t1")
    assert res["target_is_blockrep"] and res["bytes_sent"] == MiB + 64 * KiB
    assert dr_snapshots_tls(tls) == ["t1"]
    tls_snap = f"nbds://alice@127.0.0.1:{port}/@t1?tls-psk-file={psk}"
    run_blockrep("verify", p.vol, "t1", "--against", tls_snap, check=True)
    write_blocks(p.uri, {4 * MiB: os.urandom(4 * KiB)})
    res = replicate(p.vol, tls)
    assert res["base"] == "t1" and res["bytes_sent"] == 4 * KiB
    assert_export_equals(uri(p.sock, "@" + res["snapshot"]),
                         f"nbds://alice@127.0.0.1:{port}/@{res['snapshot']}?tls-psk-file={psk}",
                         tmp_path, "tls")


def dr_snapshots_tls(u: str) -> list[str]:
    return [n[1:] for n in nbd_exports(u) if n.startswith("@")]


# ------------------------------------------------------- slow: retries exhausted (about a minute)

@pytest.mark.slow
def test_persistent_write_errors_exhaust_retries_fail_cleanly_and_prune_nothing(make_server, targets, tmp_path):
    """Every write fails (nbdkit error filter): replicate backs off 1, 2, 4 s (--retries 3; the
    default 6 goes on with 8, 16, 30 s), then exits 1 with one error line; the local snapshots
    are not pruned (--keep-local 1 applies only after success) and status shows the error."""
    p = make_server("primary")
    img = tmp_path / "t.img"
    with open(img, "wb") as f:
        f.truncate(VOL_SIZE)
    cmd, u, sock = nbdkit_target(tmp_path, "err", ["file", img], filters=["error"])
    cmd += ["error-pwrite=EIO", "error-pwrite-rate=100%"]
    targets(cmd, u, sock=sock)
    for name in ("a", "b", "c"):
        write_blocks(p.uri, {0: os.urandom(64 * KiB)})
        snapshot(p.vol, name)
    t0 = time.monotonic()
    r = run_blockrep("replicate", p.vol, "--to", u, "--snapshot", "c", "--keep-local", "1", "--retries", "3",
                     timeout=200)
    took = time.monotonic() - t0
    msg = assert_one_error_line(r)
    assert "after 4 attempt(s)" in msg, msg
    assert took >= 7, f"gave up after {took:.0f} s: the backoff 1+2+4 s was not honoured"
    assert local_snapshots(p.vol) == ["a", "b", "c"]
    row = status(p.vol)[0]
    assert row["last_error"] and row["snapshot"] is None, row


# ----------------------------------------------------- slow: ext4 on the primary, mounted at DR



def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "lost+found" not in p.parts}


@pytest.mark.slow
def test_ext4_primary_freeze_snapshots_replicated_and_mounted_read_only_at_dr(make_server, tmp_path):
    rnd = random.Random(202)
    p = make_server("primary", size="256M")
    dr = make_server("dr", size="256M")
    mnt = tmp_path / "mnt"
    manifests = {}
    results = {}
    with attached(p.uri, tmp_path / "pw") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, mnt):
            for i in range(30):
                sub = mnt / f"d{i % 4}"
                sub.mkdir(exist_ok=True)
                (sub / f"f{i:02d}.bin").write_bytes(rnd.randbytes(rnd.choice([1, 4096, 100_000, 1 << 20, 3 << 20])))
            manifests["e1"] = _manifest(mnt)
            run_blockrep("snapshot", "create", p.vol, "--name", "e1", "--freeze", mnt, check=True)
            results["e1"] = replicate(p.vol, dr.uri, "--snapshot", "e1")
            # round 2: delete, overwrite in place, append, new files
            files = sorted(mnt.rglob("*.bin"))
            for f in files[:5]:
                f.unlink()
            for f in files[5:10]:
                with open(f, "r+b") as fh:
                    fh.write(rnd.randbytes(2048))
            with open(files[10], "ab") as fh:
                fh.write(rnd.randbytes(500_000))
            (mnt / "new").mkdir()
            for i in range(5):
                (mnt / "new" / f"n{i}.bin").write_bytes(rnd.randbytes(777_777))
            manifests["e2"] = _manifest(mnt)
            run_blockrep("snapshot", "create", p.vol, "--name", "e2", "--freeze", mnt, check=True)
            results["e2"] = replicate(p.vol, dr.uri, "--snapshot", "e2")
    assert results["e1"]["full"] and results["e2"]["base"] == "e1"
    assert results["e2"]["bytes_sent"] < results["e1"]["bytes_sent"] / 2, results
    assert manifests["e1"] != manifests["e2"]
    assert dr_snapshots(dr) == ["e1", "e2"]
    for name, manifest in manifests.items():
        run_blockrep("verify", p.vol, name, "--against", uri(dr.sock, "@" + name), check=True)
        with attached(uri(dr.sock, "@" + name), tmp_path / f"dr-{name}", readonly=True) as dev:
            with mounted(dev, tmp_path / f"drmnt-{name}", "-o", "ro,noload"):
                got = _manifest(tmp_path / f"drmnt-{name}")
        assert got == manifest, f"DR @{name}: files differ"


# --------------------------------------------- slow: a 100 Mbit/s link between two namespaces

@pytest.mark.slow
def test_incremental_over_100mbit_tbf_link_between_namespaces(make_server, tmp_path, capsys):
    """Primary side in namespace A, DR `blockrep serve --listen` in namespace B, joined by a veth
    pair shaped with tbf 100mbit on both ends. The incremental run's time is compared with
    changed_bytes / 12.5e6 (perf target <= 1.1x); completion and verify are asserted."""
    if not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("iproute2 (ip, tc) not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"brA{tag}", f"brB{tag}", f"vA{tag}", f"vB{tag}"
    addr_a, addr_b = "10.213.7.1", "10.213.7.2"  # only inside the two namespaces made here
    p = make_server("primary", size="256M")
    dr = make_server("dr", size="256M", start=False)
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", ns_a)
        sh("ip", "link", "set", veth_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, veth_a, addr_a), (ns_b, veth_b, addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", "100mbit", "burst", "64kb", "latency", "100ms")
        port = 10809
        sh("ip", "netns", "exec", ns_b, BLOCKREP, "serve", dr.vol, "--listen", f"{addr_b}:{port}")
        assert dr.running
        to = f"nbd://{addr_b}:{port}/"

        def rep(*args):
            r = sh("ip", "netns", "exec", ns_a, BLOCKREP, "replicate", p.vol, "--to", to, "--json", *args,
                   timeout=300)
            return json.loads(r.stdout)

        rnd = random.Random(8)
        write_blocks(p.uri, {o: rnd.randbytes(MiB) for o in range(0, 256 * MiB, 32 * MiB)})
        seed = rep()
        assert seed["full"] and seed["bytes_sent"] == 8 * MiB
        # 48 MiB of changes in 768 scattered 64 KiB blocks
        offs = sorted(rnd.sample(range(0, 256 * MiB, 256 * KiB), 768))
        write_blocks(p.uri, {o: rnd.randbytes(64 * KiB) for o in offs})
        t0 = time.monotonic()
        inc = rep()
        wall = time.monotonic() - t0
        changed = 768 * 64 * KiB
        assert inc["base"] == seed["snapshot"] and inc["bytes_sent"] == changed, inc
        bound = changed / 12.5e6
        ratio = inc["seconds"] / bound
        with capsys.disabled():
            print(f"\ntbf 100mbit: {changed} changed bytes in {inc['seconds']:.2f} s transfer "
                  f"({wall:.2f} s wall incl. snapshot/connect); bound {bound:.2f} s; "
                  f"ratio {ratio:.3f} (wall ratio {wall / bound:.3f})")
        assert ratio > 0.9, "faster than the link: the shaping is not in effect"
        assert ratio < 2.0, f"replication used less than half the link ({ratio:.2f}x the bound)"
        sh("ip", "netns", "exec", ns_a, BLOCKREP, "verify", p.vol, inc["snapshot"],
           "--against", f"nbd://{addr_b}:{port}/@{inc['snapshot']}")
    finally:
        dr.teardown()
        sh("ip", "netns", "del", ns_a, check=False)
        sh("ip", "netns", "del", ns_b, check=False)
