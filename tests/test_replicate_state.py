"""Rewrite suppression is used only while the target's head is known to hold the base.

Suppression skips changed blocks whose content equals the base snapshot's. If a transfer of some
other snapshot was interrupted, the target head may hold newer bytes in such a block; skipping it
would leave them there. replication.json records the target head's state ("head": the snapshot it
holds, None while a transfer is in between)."""

import json

from conftest import run_blockrep


def _replicate(vol, to, snap):
    r = run_blockrep("replicate", vol, "--to", to, "--snapshot", snap, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _setup(make_server):
    p = make_server("p", size="64M")
    d = make_server("d", size="64M")
    h = p.connect()
    h.pwrite(b"a" * 65536, 0)
    h.flush()
    assert run_blockrep("snapshot", "create", p.vol, "--name", "s1").returncode == 0
    _replicate(p.vol, d.uri, "s1")
    h.pwrite(b"a" * 65536, 0)  # rewritten with the same bytes: changed, but equal to the base
    h.pwrite(b"b" * 4096, 1 << 20)
    h.flush()
    assert run_blockrep("snapshot", "create", p.vol, "--name", "s2").returncode == 0
    return p, d


def test_identical_rewrites_are_not_sent_when_the_target_holds_the_base(make_server):
    p, d = _setup(make_server)
    res = _replicate(p.vol, d.uri, "s2")
    assert res["bytes_skipped"] == 65536 and res["bytes_sent"] == 4096


def test_no_suppression_after_an_interrupted_transfer(make_server):
    p, d = _setup(make_server)
    # what an interrupted transfer of another snapshot leaves: the head in between, and bytes
    # in a block that s2 holds equal to s1
    state_file = p.vol / "replication.json"
    state = json.loads(state_file.read_text())
    state[d.uri]["head"] = None
    state_file.write_text(json.dumps(state))
    dh = d.connect()
    dh.pwrite(b"x" * 4096, 0)
    dh.flush()
    res = _replicate(p.vol, d.uri, "s2")
    assert res["bytes_skipped"] == 0
    r = run_blockrep("verify", p.vol, "s2", "--against", d.uri.replace(":///", ":///@s2"))
    assert r.returncode == 0, r.stdout + r.stderr
