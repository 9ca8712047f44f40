"""Rewrite suppression is used only while the target's head is known to hold the base.

Suppression skips changed blocks whose content equals the base snapshot's. If a transfer of some
other snapshot was interrupted, the target head may hold newer bytes in such a block; skipping it
would leave them there. For a plain target replication.json records the head's state
(`head_uuid`: the snapshot it holds, absent while a transfer is in between); a blockrep DR tells
what its head changed since the base (`!changes`), and checks every touched chunk before it commits.
"""

import json
import os
import uuid

import nbd
from conftest import run_blockrep
from replhelp import nbdkit_target

from engine.replication import protocol as P


def _open(u, export):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(u)
    h.set_export_name(export)
    h.opt_go()
    return h


def _replicate(vol, to, snap):
    r = run_blockrep("replicate", vol, "--to", to, "--snapshot", snap, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _setup(make_server, to=None):
    p = make_server("p", size="64M")
    d = None if to else make_server("d", size="64M")
    h = p.connect()
    h.pwrite(b"a" * 65536, 0)
    h.flush()
    assert run_blockrep("snapshot", "create", p.vol, "--name", "s1").returncode == 0
    _replicate(p.vol, to or d.uri, "s1")
    h.pwrite(b"a" * 65536, 0)  # rewritten with the same bytes: changed, but equal to the base
    h.pwrite(b"b" * 4096, 1 << 20)
    h.flush()
    assert run_blockrep("snapshot", "create", p.vol, "--name", "s2").returncode == 0
    return p, d


def test_identical_rewrites_are_not_sent_when_the_target_holds_the_base(make_server):
    p, d = _setup(make_server)
    res = _replicate(p.vol, d.uri, "s2")
    assert res["bytes_skipped"] == 65536 and res["bytes_sent"] == 4096


def test_an_interrupted_transfer_into_a_blockrep_dr_is_undone_not_skipped(make_server):
    p, d = _setup(make_server)
    # what an interrupted transfer of another snapshot leaves at the DR: its head changed since
    # s1 in a block that s2 holds equal to s1
    prim = json.loads(run_blockrep("info", p.vol, "--json", check=True).stdout)["uuid"]
    base = json.loads(run_blockrep("snapshot", "list", d.vol, "--json", check=True).stdout)[0]["uuid"]
    token = os.urandom(16).hex()
    sess = _open(d.uri, P.build("begin", primary=prim, snap=str(uuid.uuid4()), name="lost", base=base,
                                token=token, force=False))
    dh = _open(d.uri, P.build("data", token=token))
    dh.pwrite(b"x" * 4096, 0)
    dh.flush()
    dh.shutdown()
    sess.shutdown()  # the run died: its transfer is not live any more
    res = _replicate(p.vol, d.uri, "s2")
    assert res["bytes_skipped"] == 0 and res["bytes_sent"] >= 4096 + 65536
    r = run_blockrep("verify", p.vol, "s2", "--against", d.uri)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_plain_target_left_in_between_gets_a_seed(make_server, targets, tmp_path):
    img = tmp_path / "t.img"
    img.write_bytes(b"")
    os.truncate(img, 64 << 20)
    cmd, u, sock = nbdkit_target(tmp_path, "file", ["file", img])
    targets(cmd, u, sock=sock)
    p, _ = _setup(make_server, to=u)
    state_file = p.vol / "replication.json"
    state = json.loads(state_file.read_text())
    del state["targets"][u]["head_uuid"]  # a transfer was interrupted there
    state_file.write_text(json.dumps(state))
    with open(img, "r+b") as f:
        f.write(b"x" * 4096)
    res = _replicate(p.vol, u, "s2")
    assert res["mode"] == "seed" and res["bytes_skipped"] == 0
    assert run_blockrep("verify", p.vol, "s2", "--against", u).returncode == 0
