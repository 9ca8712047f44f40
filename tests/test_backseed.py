"""Back seed and rollback (issue 10 items 1-2) with real servers: `blockrep restore` rebuilds a
wrecked ext4 from the DR shipping about what differs, keeps the wrecked state in a safety
snapshot, leaves the next replicate incremental; refusals (a client attached, no --yes, a foreign
DR snapshot); no common snapshot (digests) and an empty volume (full); `snapshot rollback`."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from blockdev import attached, fsck_clean, mounted, sh
from conftest import run_blockrep
from replhelp import digest, snap_uri

pytestmark = pytest.mark.slow
MiB = 1 << 20
DR_ARGS = ("--keep", "5", "--keep-min-age", "0")


def replicate(p, d) -> dict:
    r = run_blockrep("replicate", p.vol, "--to", d.uri, "--json", check=True)
    return json.loads(r.stdout[r.stdout.index("{"):])


def restore(p, d, *extra, check=True):
    r = run_blockrep("restore", p.vol, "--from", d.uri, "--yes", "--json", *extra, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    return r


def write(server, pattern: int, offset_mib: int, mib: int = 1) -> None:
    sh("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset_mib}M {mib}M", server.uri)


def one_error(r) -> str:
    assert r.returncode != 0 and r.stderr.count("blockrep: error:") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_restore_rebuilds_a_wrecked_ext4_shipping_what_differs(make_server, tmp_path):
    p, d = make_server("p", size="256M"), make_server("d", size="256M", serve_args=DR_ARGS)
    files = {}
    with attached(p.uri, tmp_path / "a") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "m") as m:
            for i in range(20):
                data = os.urandom(512 * 1024)
                (m / f"f{i}").write_bytes(data)
                files[f"f{i}"] = hashlib.sha256(data).hexdigest()
    good = replicate(p, d)["snapshot"]
    # wreck it: 8 MiB of garbage over the start (superblock, group descriptors, inode tables)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8 * MiB))
    sh("nbdcopy", "--", junk, p.uri)
    wrecked = digest(p.uri, 256 * MiB)
    res = restore(p, d)
    assert res["snapshot"] == good and res["mode"] == "incremental" and res["base"] == good
    assert res["bytes_sent"] <= 9 * MiB, res  # what differs, not the volume
    assert digest(p.uri, 256 * MiB) == digest(snap_uri(d, good), 256 * MiB)
    assert digest(snap_uri(p, res["safety_snapshot"]), 256 * MiB) == wrecked  # undo is possible
    with attached(p.uri, tmp_path / "b") as dev:
        fsck_clean(dev)
        with mounted(dev, tmp_path / "m2") as m:
            assert {f: hashlib.sha256((m / f).read_bytes()).hexdigest() for f in files} == files
    write(p, 0x44, 100)
    assert replicate(p, d)["mode"] == "incremental"


def test_restore_is_refused_with_a_client_attached_and_without_yes(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    write(p, 0x11, 0)
    replicate(p, d)
    before = run_blockrep("snapshot", "list", p.vol, "--json", check=True).stdout
    h = p.connect()
    one_error(r := restore(p, d, check=False))
    assert "connected" in r.stderr
    p.close_handles()
    r = run_blockrep("restore", p.vol, "--from", d.uri)
    assert "--yes" in one_error(r)
    assert run_blockrep("snapshot", "list", p.vol, "--json", check=True).stdout == before  # nothing changed
    del h


def test_while_restoring_no_other_client_may_open_the_live_export(make_server):
    import nbd
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    write(p, 0x12, 0)
    replicate(p, d)
    token = "0" * 32
    from engine import control
    control.call(p.vol, "head_exclusive", token=token, pid=os.getpid(), force=False)
    try:
        c = nbd.NBD()
        with pytest.raises(nbd.Error):
            c.connect_uri(p.uri)
        c2 = nbd.NBD()
        c2.set_export_name("!restore?token=" + "1" * 32)  # a wrong token is no way in either
        with pytest.raises(nbd.Error):
            c2.connect_unix(str(p.sock))
    finally:
        control.call(p.vol, "head_release", token=token)
    c3 = nbd.NBD()
    c3.connect_uri(p.uri)  # released: clients are welcome again
    c3.shutdown()


def test_restore_without_a_common_snapshot_compares_digests(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    for i in range(8):
        write(p, 0x20 + i, 4 * i, 2)
    s = replicate(p, d)["snapshot"]
    run_blockrep("snapshot", "delete", p.vol, s, "--force", check=True)  # the common base is gone here
    write(p, 0x66, 5)  # one MiB differs
    res = restore(p, d)
    assert res["mode"] == "rebase" and res["bytes_sent"] <= 2 * MiB, res
    assert digest(p.uri, 64 * MiB) == digest(snap_uri(d, s), 64 * MiB)
    assert replicate(p, d)["mode"] in ("none", "incremental")


def test_restore_into_an_empty_new_volume_is_a_full_copy(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    write(p, 0x31, 0, 4)
    s = replicate(p, d)["snapshot"]
    q = make_server("q")  # the primary's machine was lost: a fresh volume
    res = restore(q, d)
    assert res["mode"] == "full" and 4 * MiB <= res["bytes_sent"] <= 5 * MiB, res
    assert digest(q.uri, 64 * MiB) == digest(snap_uri(d, s), 64 * MiB)
    names = [x["name"] for x in json.loads(run_blockrep("snapshot", "list", q.vol, "--json", check=True).stdout)]
    assert s in names  # NAME's identity is here now


def test_restore_of_a_foreign_volume_needs_force(make_server):
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    write(p, 0x31, 0)
    replicate(p, d)
    other = make_server("other")
    write(other, 0x77, 0)
    assert "another volume" in one_error(restore(other, d, check=False))
    assert restore(other, d, "--force")["mode"] == "rebase"


def test_rollback_makes_the_live_volume_the_snapshot(make_server):
    p = make_server("p")
    write(p, 0x01, 0, 4)
    run_blockrep("snapshot", "create", p.vol, "--name", "s1", check=True)
    want = digest(p.uri, 64 * MiB)
    write(p, 0x02, 2, 4)
    sh("qemu-io", "-f", "raw", "-c", "discard 0 1M", p.uri)
    changed = digest(p.uri, 64 * MiB)
    r = run_blockrep("snapshot", "rollback", p.vol, "s1", "--yes", "--json", check=True)
    res = json.loads(r.stdout)
    assert digest(p.uri, 64 * MiB) == want
    assert digest(snap_uri(p, res["safety_snapshot"]), 64 * MiB) == changed
    assert res["bytes_sent"] <= 5 * MiB
    # change tracking stays exact: the rollback's writes are changes since the safety snapshot
    run_blockrep("snapshot", "create", p.vol, "--name", "after", check=True)
    d2 = json.loads(run_blockrep("diff", p.vol, res["safety_snapshot"], "after", "--json", check=True).stdout)
    assert sum(e["length"] for e in d2) >= 4 * MiB
    r = run_blockrep("snapshot", "rollback", p.vol, "s1")
    assert "--yes" in one_error(r)


def test_an_interrupted_restore_resumes_sending_only_what_did_not_arrive(make_server):
    import signal
    import subprocess
    import time

    from conftest import BLOCKREP
    p, d = make_server("p"), make_server("d", serve_args=DR_ARGS)
    write(p, 0x31, 0, 24)
    s = replicate(p, d)["snapshot"]
    write(p, 0x99, 0, 24)  # all of it to be undone by the restore
    wrecked = digest(p.uri, 64 * MiB)
    bg = subprocess.Popen([BLOCKREP, "restore", str(p.vol), "--from", d.uri, "--yes", "--rate", "4M"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)  # about half of the 24 MiB is written
        bg.send_signal(signal.SIGKILL)
    finally:
        bg.kill()
        bg.wait()
    safety = [n for n in json.loads(run_blockrep("snapshot", "list", p.vol, "--json", check=True).stdout)
              if n["name"].startswith("safety-")]
    assert len(safety) == 1
    # while a restore holds the head, nobody else's snapshot (a scheduler's) may catch it half done
    from engine import control
    control.call(p.vol, "head_exclusive", token="0" * 32, pid=os.getpid(), force=True)
    r = run_blockrep("snapshot", "create", p.vol, "--name", "midway")
    assert "being replaced" in one_error(r)
    control.call(p.vol, "head_release", token="0" * 32)
    res = restore(p, d)
    assert res["resumed"] and res["safety_snapshot"] == safety[0]["name"], res
    assert res["interim_snapshot"] and res["interim_snapshot"] != res["safety_snapshot"]  # the head as it was
    assert res["bytes_already_there"] >= 4 * MiB and res["bytes_sent"] <= 20 * MiB, res
    assert digest(p.uri, 64 * MiB) == digest(snap_uri(d, s), 64 * MiB)
    assert digest(snap_uri(p, res["safety_snapshot"]), 64 * MiB) == wrecked  # the undo point is the first one
    again = restore(p, d)  # a finished restore is not resumed: it is a new one, with its own safety snapshot
    assert not again["resumed"] and again["safety_snapshot"] != res["safety_snapshot"], again
    nxt = replicate(p, d)  # rewrite suppression: the restored blocks equal the base, none is shipped
    assert nxt["mode"] == "incremental" and nxt["bytes_sent"] == 0, nxt
