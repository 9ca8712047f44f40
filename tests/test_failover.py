"""Failover and failback (issue 10 item 4, docs/REPLICATION.md §9) with real servers: the README
runbook end to end on an ext4 (promote the DR, run there, demote the old primary, replicate back
incrementally, switch the roles back); a promote rolls back a partial delta a killed transfer
left; the old primary's transfers are refused once the DR is promoted; every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from blockdev import attached, fsck_clean, mounted, sh
from conftest import BLOCKREP, run_blockrep
from replhelp import assert_one_error_line, digest, local_snapshots, replicate, snap_uri, wait_for

pytestmark = pytest.mark.slow
MiB = 1 << 20
DR_ARGS = ("--keep", "5", "--keep-min-age", "0")


def blockrep_json(*args, timeout: float = 300) -> dict:
    r = run_blockrep(*args, "--json", timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write_files(m, prefix: str, n: int, size: int = 256 * 1024) -> dict[str, str]:
    out = {}
    for i in range(n):
        data = os.urandom(size)
        (m / f"{prefix}{i}").write_bytes(data)
        out[f"{prefix}{i}"] = hashlib.sha256(data).hexdigest()
    return out


def files_on(m) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in m.iterdir() if f.is_file()}


def role(server) -> str:
    return server.info()["role"]


def test_failover_and_failback_of_an_ext4_end_to_end(make_server, tmp_path):
    size = 256 * MiB
    p, d = make_server("p", size="256M"), make_server("d", size="256M", serve_args=DR_ARGS)
    with attached(p.uri, tmp_path / "a1") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "m1") as m:
            want = write_files(m, "a", 8)
    replicate(p.vol, d.uri)
    with attached(p.uri, tmp_path / "a2") as dev, mounted(dev, tmp_path / "m2") as m:
        want |= write_files(m, "b", 8)
    s2 = replicate(p.vol, d.uri)["snapshot"]
    with attached(p.uri, tmp_path / "a3") as dev, mounted(dev, tmp_path / "m3") as m:
        lost = write_files(m, "x", 4)  # written after the last replication: the DR never gets them
    p.kill()  # the primary site is lost

    # failover: the DR's live export becomes s2, writable; the VMs run there
    assert role(d) == "dr"
    res = blockrep_json("promote", d.vol)
    assert res["snapshot"] == s2 and res["role"] == "promoted" and role(d) == "promoted"
    assert digest(d.uri, size) == digest(snap_uri(d, s2), size)
    with attached(d.uri, tmp_path / "a4") as dev:
        fsck_clean(dev)
        with mounted(dev, tmp_path / "m4") as m:
            assert files_on(m) == want
            made_at_dr = write_files(m, "c", 12)  # 3 MiB of new data at the DR
    want |= made_at_dr

    # the old primary comes back; its scheduler's transfers are refused by the promoted DR
    p.start()
    r = run_blockrep("replicate", p.vol, "--to", d.uri, "--force")
    assert "promoted" in assert_one_error_line(r)
    # its writes since s2 never reached the DR: demote says so, and sets them aside only with --force
    assert "changed since" in assert_one_error_line(run_blockrep("demote", p.vol, "--primary", d.uri))
    assert role(p) == "primary" and len(local_snapshots(p.vol)) == 2  # a refusal leaves nothing behind
    dem = blockrep_json("demote", p.vol, "--primary", d.uri, "--force")
    assert dem["role"] == "dr" and role(p) == "dr" and dem["common_base"] == s2 and dem["discarded_bytes"] > 0
    safety = dem["safety_snapshot"]
    rows = json.loads(run_blockrep("status", p.vol, "--json", check=True).stdout)
    assert rows and all(r["state"] == "inactive" and r["volume_role"] == "dr" for r in rows), rows
    assert run_blockrep("status", p.vol, "--max-rpo", "1").returncode == 0  # a DR is not behind
    r = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", p.uri, check=False)
    assert r.returncode != 0  # a DR's live export is read-only

    # failback: the changes made at the DR go back incrementally from s2 (no full copy)
    back = replicate(d.vol, p.uri)
    assert back["mode"] == "incremental" and back["base"] == s2, back
    moved = back["bytes_sent"] + back.get("bytes_zeroed", 0)
    assert 3 * MiB <= back["bytes_sent"] and moved <= 12 * MiB, back  # ≈ what changed, of 256 MiB
    t = back["snapshot"]
    assert digest(snap_uri(p, t), size) == digest(snap_uri(d, t), size)

    # switch the roles back: the VMs stopped at the DR; the old primary becomes T, the DR a DR again
    res = blockrep_json("promote", p.vol, "--snapshot", t)
    assert res["bytes_sent"] == 0 and role(p) == "promoted"  # the head already equals T
    blockrep_json("demote", d.vol, "--primary", p.uri)
    assert role(d) == "dr"
    with attached(p.uri, tmp_path / "a5") as dev:
        fsck_clean(dev)
        with mounted(dev, tmp_path / "m5") as m:
            assert files_on(m) == want  # the DR's files are here, the lost ones are not
            write_files(m, "d", 2)
    again = replicate(p.vol, d.uri)
    assert again["mode"] == "incremental" and again["base"] == t, again
    assert digest(snap_uri(d, again["snapshot"]), size) == digest(snap_uri(p, again["snapshot"]), size)
    # what the old primary held when it was demoted is kept: its lost files are in the safety snapshot
    with attached(snap_uri(p, safety), tmp_path / "a6", readonly=True) as dev, \
            mounted(dev, tmp_path / "m6", "-o", "ro,noload") as m:
        assert {k: v for k, v in files_on(m).items() if k.startswith("x")} == lost
    assert safety in local_snapshots(p.vol)


def refused(u: str, export: str) -> bool:
    """True if the server refuses to open the export (opt_go fails)."""
    import nbd
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(u)
    h.set_export_name(export)
    try:
        h.opt_go()
    except nbd.Error:
        return True
    h.shutdown()
    return False


def _replicate_in_background(p, d, *args) -> subprocess.Popen:
    return subprocess.Popen([BLOCKREP, "replicate", str(p.vol), "--to", d.uri, "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dr_transfer(d) -> dict | None:
    return json.loads((d.vol / "dr.json").read_text()).get("transfer")


def test_promote_rolls_back_the_partial_delta_of_a_killed_transfer(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 8M", p.uri)
    s1 = replicate(p.vol, d.uri)["snapshot"]
    sh("qemu-io", "-f", "raw", "-c", "write -P 2 0 16M", p.uri)
    bg = _replicate_in_background(p, d, "--rate", "2M")
    try:
        wait_for(lambda: _dr_transfer(d) is not None, timeout=30, what="the transfer to begin at the DR")
        time.sleep(1.5)  # some of the delta is in the DR's head now
        # a transfer still connected: promote refuses (a planned failover stops replication first)
        r = run_blockrep("promote", d.vol)
        assert "transfer" in assert_one_error_line(r)
        assert role(d) == "dr"
        bg.send_signal(signal.SIGKILL)  # the primary dies mid-transfer
    finally:
        bg.kill()
        bg.wait()
    assert digest(d.uri, 64 * MiB) != digest(snap_uri(d, s1), 64 * MiB)  # the head is in between
    d.stop()  # a promote also works on a volume nobody serves
    res = blockrep_json("promote", d.vol)
    assert res["snapshot"] == s1 and res["bytes_sent"] > 0, res
    d.start()
    assert digest(d.uri, 64 * MiB) == digest(snap_uri(d, s1), 64 * MiB)
    assert "PROMOTED" in (d.vol / "server.log").read_text()
    # the old primary, even with --force, is refused: by its own check, and by the DR itself when
    # a key holder skips that check, under its own uuid or a made-up one
    assert "promoted" in assert_one_error_line(run_blockrep("replicate", p.vol, "--to", d.uri, "--force"))
    from engine.replication import protocol as P
    for prim in (p.info()["uuid"], str(uuid.uuid4())):
        assert refused(d.uri, P.build("begin", primary=prim, snap=str(uuid.uuid4()), name="forced",
                                      base=None, token=P.new_token(), force=True))
    log = (d.vol / "server.log").read_text()
    assert "takes no more deltas from its old primary" in log and "only a `blockrep demote`" in log
    assert role(d) == "promoted"
    # the snapshot it was promoted from is failback's base: retention keeps it
    run_blockrep("snapshot", "prune", d.vol, "--keep", "0", check=True)
    assert s1 in local_snapshots(d.vol)
    # the old primary's interrupted transfer never resumes after failback (the DR rolled it back)
    dem = blockrep_json("demote", p.vol, "--primary", d.uri, "--force")
    targets = json.loads((p.vol / "replication.json").read_text())["targets"]
    assert targets and all(not t.get("in_progress") for t in targets.values())
    assert dem["common_base"] == s1
    # once is enough
    assert "already promoted" in assert_one_error_line(run_blockrep("promote", d.vol))


def test_promote_and_demote_refusals(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    other = make_server("other")
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", p.uri)
    replicate(p.vol, d.uri)
    assert "not a DR" in assert_one_error_line(run_blockrep("promote", p.vol))
    assert "no snapshot" in assert_one_error_line(run_blockrep("promote", d.vol, "--snapshot", "nope"))
    assert role(d) == "dr"  # a refused promote changes nothing
    # demote: not to itself, not to a DR, not to a stranger without --force, not under a writer
    assert "itself" in assert_one_error_line(run_blockrep("demote", p.vol, "--primary", p.uri))
    assert "is itself a DR" in assert_one_error_line(run_blockrep("demote", other.vol, "--primary", d.uri))
    assert "shares no snapshot" in assert_one_error_line(run_blockrep("demote", other.vol, "--primary", p.uri))
    # a promote that stopped half way ("promoting"): the head stays read-only until it is finished
    from engine import control
    control.call(d.vol, "dr_promote", snapshot=None, force=False)
    assert role(d) == "promoting"
    assert sh("qemu-io", "-f", "raw", "-c", "write 0 4k", d.uri, check=False).returncode != 0
    blockrep_json("promote", d.vol)
    assert role(d) == "promoted"
    # nor does it take a stream (its old primary's or any other): its live data is in use
    sh("qemu-io", "-f", "raw", "-c", "write -P 7 2M 1M", p.uri)
    run_blockrep("snapshot", "create", p.vol, "--name", "later", check=True)
    stream = p.vol.parent / "later.bs"
    run_blockrep("send", p.vol, "--from", local_snapshots(p.vol)[0], "later", "-o", stream, check=True)
    assert "promoted" in assert_one_error_line(run_blockrep("receive", d.vol, "-i", stream, "--force"))
    run_blockrep("snapshot", "rollback", p.vol, local_snapshots(p.vol)[0], "--yes", check=True)
    h = p.connect()
    assert "read-write" in assert_one_error_line(run_blockrep("demote", p.vol, "--primary", d.uri, "--force"))
    h.pwrite(b"\1" * 4096, 0)  # the writer still writes: nothing was changed under it
    p.close_handles()
    assert role(p) == "primary" and len(local_snapshots(p.vol)) == 3  # no stray safety snapshot (later, rollback's)
    # its head changed since the snapshot both hold: a plain demote would silently drop that write
    assert "changed since" in assert_one_error_line(run_blockrep("demote", p.vol, "--primary", d.uri))
    blockrep_json("demote", p.vol, "--primary", d.uri, "--force")
    assert "already a DR" in assert_one_error_line(run_blockrep("demote", p.vol, "--primary", d.uri))
    # an unrelated server with --force: bound, and its first transfer is a rebase
    blockrep_json("demote", other.vol, "--primary", d.uri, "--force")
    assert role(other) == "dr"


def test_promote_force_stops_a_live_transfer_which_then_says_why(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 4M", p.uri)
    s1 = replicate(p.vol, d.uri)["snapshot"]
    sh("qemu-io", "-f", "raw", "-c", "write -P 2 0 16M", p.uri)
    bg = _replicate_in_background(p, d, "--rate", "2M", "--retries", "1")
    try:
        wait_for(lambda: (_dr_transfer(d) or {}).get("name") is not None and bg.poll() is None, timeout=30,
                 what="the transfer to begin at the DR")
        time.sleep(1)
        res = blockrep_json("promote", d.vol, "--force")
        assert res["snapshot"] == s1
        out, err = bg.communicate(timeout=120)
    finally:
        bg.kill()
        bg.wait()
    assert bg.returncode == 1 and err.count("blockrep: error:") == 1 and "Traceback" not in err, err
    assert "promoted" in err, err  # not a bare "Operation not permitted"
    assert digest(d.uri, 64 * MiB) == digest(snap_uri(d, s1), 64 * MiB)
    assert "its transfer stopped" in (d.vol / "server.log").read_text()
