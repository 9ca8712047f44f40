"""Replication a DR site can trust (issue 7; RELIABILITY R20, R22): any size, identity not names,
one run per target, an append-only DR that verifies before it commits, retention that keeps the
common base, hash rebase, status that tells the truth.

Real parts only: the primary and the DR are `blockrep serve` (nbdkit + the plugin), plain targets
are nbdkit servers, hostile peers are libnbd clients that hold the key.

    primary ──replicate──► DR (bound to the primary; "" read-only; !begin/!data/!manifest/!commit)
    attacker (PSK) ──!delete / forged !commit / !data / !begin──► refused and logged
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import uuid

import nbd
import pytest
from conftest import run_blockrep
from replhelp import (
    MiB,
    assert_one_error_line,
    connected,
    free_port,
    nbdkit_target,
    parse_stats,
    replicate,
    status,
    uri,
    wait_for,
    write_blocks,
)

GiB = 1 << 30
TiB = 1 << 40
TOKEN = "ab" * 16


def snaps(vol) -> list[dict]:
    return json.loads(run_blockrep("snapshot", "list", vol, "--json", check=True).stdout)


def rep(vol, to, *args, check=False, timeout=120):
    return run_blockrep("replicate", vol, "--to", to, *args, timeout=timeout, check=check)


def open_export(u: str, export: str, write: bool = False) -> nbd.NBD:
    """Connect to one export by name; raises nbd.Error when the server refuses it."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    h.connect_uri(u)
    h.set_export_name(export)
    h.opt_go()
    return h


def refused(u: str, export: str) -> bool:
    try:
        h = open_export(u, export)
    except nbd.Error:
        return True
    h.shutdown()
    return False


def verify(vol, name, against) -> subprocess.CompletedProcess:
    return run_blockrep("verify", vol, name, "--against", against)


@pytest.fixture
def pair(make_server):
    """A served primary with data and an empty served DR of the same size."""
    p = make_server("primary", size="64M")
    d = make_server("dr", size="64M")
    write_blocks(p.uri, {0: b"\x11" * MiB, 10 * MiB: b"\x22" * 65536})
    return p, d


# ------------------------------------------------------------------ any size (R22)

def test_2tib_sparse_volume_with_data_beyond_4gib_replicates_verifies_and_diffs(make_server, targets, tmp_path):
    size = 2 * TiB
    p = make_server("big", size="2T")
    d = make_server("bigdr", size="2T")
    blocks = {0: b"\x01" * 4096, 5 * GiB: b"\x05" * 65536, TiB + 12345 * 4096: b"\x07" * 8192,
              size - 4096: b"\x09" * 4096}
    write_blocks(p.uri, blocks)
    t0 = time.monotonic()
    r1 = replicate(p.vol, d.uri)
    assert r1["mode"] == "seed" and r1["bytes_sent"] == sum(len(b) for b in blocks.values())
    write_blocks(p.uri, {6 * GiB: b"\x06" * 4096, size - 8192: b"\x08" * 4096})
    r2 = replicate(p.vol, d.uri)
    assert r2["mode"] == "incremental" and r2["bytes_sent"] == 8192, r2
    seconds = time.monotonic() - t0
    assert verify(p.vol, r2["snapshot"], d.uri).returncode == 0
    diff = json.loads(run_blockrep("diff", p.vol, r1["snapshot"], r2["snapshot"], "--json", check=True).stdout)
    assert diff == [{"offset": 6 * GiB, "length": 4096}, {"offset": size - 8192, "length": 4096}]
    # a plain server: nbdkit memory (sparse), seed then incremental, verified by reading it here
    cmd, u, _ = nbdkit_target(tmp_path, "mem", ["memory", "size=2T"])
    targets(cmd, u, sock=tmp_path / "mem.sock")
    # (the seed zeroes 2 TiB of the plain target: ~25 s on a quiet machine, more on a loaded CI)
    assert replicate(p.vol, u, timeout=240)["mode"] == "seed"
    write_blocks(p.uri, {7 * GiB: b"\x0a" * 4096})
    r3 = replicate(p.vol, u, timeout=120)
    assert r3["mode"] == "incremental" and r3["bytes_sent"] == 4096
    assert verify(p.vol, r3["snapshot"], u).returncode == 0
    print(f"2 TiB: seed + incremental + verify to a blockrep DR in {seconds:.1f} s")


def test_16tib_volume_seed_incremental_and_verify(make_server):
    """The largest volume: every request stays within libnbd's limits (R22)."""
    p = make_server("huge", size="16T")
    d = make_server("hugedr", size="16T")
    write_blocks(p.uri, {0: b"\x01" * 65536, 15 * TiB: b"\x02" * 65536})
    r1 = replicate(p.vol, d.uri)
    assert r1["mode"] == "seed" and r1["bytes_sent"] == 2 * 65536
    write_blocks(p.uri, {10 * TiB: b"\x03" * 4096})
    r2 = replicate(p.vol, d.uri)
    assert r2["mode"] == "incremental" and r2["bytes_sent"] == 4096
    assert verify(p.vol, r2["snapshot"], d.uri).returncode == 0
    assert run_blockrep("verify", p.vol, r2["snapshot"], "--against", d.uri, "--quick").returncode == 0


def test_1mib_volume_replicates(make_server):
    p = make_server("tiny", size="1M")
    d = make_server("tinydr", size="1M")
    write_blocks(p.uri, {4096: b"t" * 4096})
    r = replicate(p.vol, d.uri)
    assert verify(p.vol, r["snapshot"], d.uri).returncode == 0


# ------------------------------------------------------------------ identity, not names

def test_a_volume_replicated_into_itself_is_refused_and_nothing_changes(pair):
    p, _ = pair
    before = snaps(p.vol)
    with connected(p.uri) as h:
        data = h.pread(MiB, 0)
    r = rep(p.vol, p.uri, "--force")
    assert "itself" in assert_one_error_line(r)
    assert snaps(p.vol) == before
    with connected(p.uri) as h:
        assert h.pread(MiB, 0) == data


def test_a_foreign_volume_is_refused_unless_forced_and_force_keeps_its_snapshots(pair):
    p, d = pair
    write_blocks(d.uri, {0: b"own data" * 512})
    run_blockrep("snapshot", "create", d.vol, "--name", "theirs", check=True)
    before_p = snaps(p.vol)
    r = rep(p.vol, d.uri)
    line = assert_one_error_line(r)
    assert "data of its own" in line and "theirs" in line and "--force" in line
    assert snaps(p.vol) == before_p, "a refused target must not leave a new primary snapshot"
    assert [s["name"] for s in snaps(d.vol)] == ["theirs"]
    with connected(d.uri) as h:
        assert h.pread(4096, 0) == (b"own data" * 512)[:4096]
    res = replicate(p.vol, d.uri, "--force")
    assert res["mode"] == "rebase"
    assert [s["name"] for s in snaps(d.vol)] == ["theirs", res["snapshot"]]
    assert verify(p.vol, res["snapshot"], d.uri).returncode == 0
    # the DR's own snapshot is still what it was
    with connected(uri(d.sock, "@theirs")) as h:
        assert h.pread(4096, 0) == (b"own data" * 512)[:4096]
    assert "FORCED bind" in (d.vol / "server.log").read_text()


def test_a_dr_bound_to_another_primary_is_refused(pair, make_server):
    p, d = pair
    replicate(p.vol, d.uri)
    other = make_server("other", size="64M")
    write_blocks(other.uri, {0: b"o" * 4096})
    r = rep(other.vol, d.uri)
    assert "another primary" in assert_one_error_line(r)


def test_a_name_the_dr_holds_with_another_identity_is_refused(pair):
    p, d = pair
    run_blockrep("snapshot", "create", p.vol, "--name", "nightly", check=True)
    replicate(p.vol, d.uri, "--snapshot", "nightly")
    run_blockrep("snapshot", "delete", p.vol, "nightly", "--force", check=True)
    write_blocks(p.uri, {0: b"\x33" * 4096})
    run_blockrep("snapshot", "create", p.vol, "--name", "nightly", check=True)
    r = rep(p.vol, d.uri, "--snapshot", "nightly")
    assert "different snapshot named nightly" in assert_one_error_line(r)
    with connected(uri(d.sock, "@nightly")) as h:  # the DR's nightly is the old one, untouched
        assert h.pread(4096, 0) == b"\x11" * 4096


def test_dr_snapshots_carry_the_primary_snapshot_uuids(pair):
    p, d = pair
    r = replicate(p.vol, d.uri)
    mine = {s["name"]: s["uuid"] for s in snaps(p.vol)}
    theirs = {s["name"]: s["uuid"] for s in snaps(d.vol)}
    assert theirs == {r["snapshot"]: mine[r["snapshot"]]}
    assert r["uuid"] == mine[r["snapshot"]]


def test_a_plain_target_changed_behind_our_back_gets_a_seed_not_a_wrong_increment(make_server, targets, tmp_path):
    p = make_server("prim", size="64M")
    write_blocks(p.uri, {0: b"a" * MiB})
    img = tmp_path / "t.img"
    img.write_bytes(b"")
    os.truncate(img, 64 * MiB)
    cmd, u, _ = nbdkit_target(tmp_path, "file", ["file", img])
    targets(cmd, u, sock=tmp_path / "file.sock")
    replicate(p.vol, u)
    with connected(u) as h:  # someone else writes where we shipped data
        h.pwrite(b"X" * 4096, 0)
        h.flush()
    write_blocks(p.uri, {32 * MiB: b"b" * 4096})
    r = replicate(p.vol, u)
    assert r["mode"] == "seed", r
    assert verify(p.vol, r["snapshot"], u).returncode == 0


# ------------------------------------------------------------------ one run per target

def test_a_plain_proxy_of_the_volume_itself_is_refused(pair, targets, tmp_path):
    """qemu-nbd in front of the primary's own export looks like any NBD server; shipping an older
    snapshot through it would revert the head's newer writes."""
    p, _ = pair
    run_blockrep("snapshot", "create", p.vol, "--name", "old", check=True)
    write_blocks(p.uri, {40 * MiB: b"\x99" * MiB})  # newer than "old"
    sock = tmp_path / "proxy.sock"
    targets(["qemu-nbd", "-t", "-e", "4", "-k", sock, "--image-opts",
             f"driver=nbd,server.type=unix,server.path={p.sock}"], uri(sock), sock=sock)
    r = rep(p.vol, uri(sock), "--snapshot", "old")
    assert "reads like this volume's own live export" in assert_one_error_line(r)
    with connected(p.uri) as h:
        assert h.pread(4096, 40 * MiB) == b"\x99" * 4096


def test_a_second_spelling_of_the_same_dr_is_still_one_run(pair, procs):
    p, d = pair
    write_blocks(p.uri, {20 * MiB: os.urandom(8 * MiB)})
    slow = procs("replicate", p.vol, "--to", d.uri, "--rate", "2M")
    wait_for(lambda: _hello_json(d.uri).get("transfer"), what="the first run's transfer")
    other = f"nbd+unix:///?socket={d.sock.parent}/./{d.sock.name}"
    r = rep(p.vol, other)
    assert "already replicating" in assert_one_error_line(r) and "blockrep DR volume" in r.stderr
    slow.communicate(timeout=60)
    assert slow.returncode == 0


def test_the_snapshot_being_shipped_cannot_be_deleted(pair, procs):
    p, d = pair
    write_blocks(p.uri, {20 * MiB: os.urandom(8 * MiB)})
    run_blockrep("snapshot", "create", p.vol, "--name", "mysnap", check=True)
    slow = procs("replicate", p.vol, "--to", d.uri, "--snapshot", "mysnap", "--rate", "2M")
    wait_for(lambda: _hello_json(d.uri).get("transfer"), what="the transfer")
    r = run_blockrep("snapshot", "delete", p.vol, "mysnap")
    assert "being replicated to" in assert_one_error_line(r)
    slow.communicate(timeout=60)
    assert slow.returncode == 0


def test_a_replication_record_of_an_unknown_version_is_never_read_as_empty(pair):
    p, d = pair
    base = replicate(p.vol, d.uri)["snapshot"]
    rec = p.vol / "replication.json"
    data = json.loads(rec.read_text())
    rec.write_text(json.dumps({**data, "version": 3}))
    for args in (("snapshot", "delete", p.vol, base), ("status", p.vol)):
        assert "replication record version 3" in assert_one_error_line(run_blockrep(*args))
    assert base in [s["name"] for s in snaps(p.vol)]


def test_an_export_name_that_is_not_utf8_is_refused_without_a_traceback(pair):
    import socket as so
    import struct
    _, d = pair
    c = so.socket(so.AF_UNIX)
    c.settimeout(10)
    c.connect(str(d.sock))
    hs = c.recv(18)
    assert hs[:16] == b"NBDMAGICIHAVEOPT"
    c.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
    name = b"!\xff\xfe"
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    c.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)  # NBD_OPT_GO
    reply = c.recv(20)
    assert len(reply) == 20 and struct.unpack(">I", reply[12:16])[0] & 0x80000000, reply  # an error reply
    c.close()
    assert refused(d.uri, "!hello") is False  # still serving
    log = (d.vol / "server.log").read_text()
    assert "Traceback" not in log and "refused export" in log


def _hello_json(u: str) -> dict:
    try:
        return json.loads(_hello(u))
    except nbd.Error:
        return {}


def test_two_runs_at_once_one_is_refused_at_once_the_other_waits(pair, procs):
    p, d = pair
    write_blocks(p.uri, {20 * MiB: os.urandom(8 * MiB)})
    slow = procs("replicate", p.vol, "--to", d.uri, "--rate", "2M", "--json")
    wait_for(lambda: list((p.vol / "replication.d").glob("*.lock")) if (p.vol / "replication.d").exists() else [],
             what="the first run's lock")
    time.sleep(0.5)
    t0 = time.monotonic()
    r = rep(p.vol, d.uri)
    line = assert_one_error_line(r)
    assert f"already replicating {p.vol.resolve()} to {d.uri} (pid {slow.pid}, since" in line, line
    assert time.monotonic() - t0 < 10
    waiter = procs("replicate", p.vol, "--to", d.uri, "--wait", "--json")
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0, err
    first = json.loads(out)
    out2, err2 = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err2
    second = json.loads(out2)
    assert second["mode"] == "incremental" and second["base"] == first["snapshot"]
    for s in (first["snapshot"], second["snapshot"]):
        assert verify(p.vol, s, d.uri).returncode == 0


# ------------------------------------------------------------------ an append-only DR (R20)

@pytest.fixture
def psk_dr(make_server, tmp_path):
    """A primary and a DR on TCP + TLS-PSK: the attacker holds the same key."""
    psk = tmp_path / "psk"
    run_blockrep("psk", "create", psk, "alice", check=False)
    if not psk.exists():
        psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    os.chmod(psk, 0o600)
    port = free_port()
    p = make_server("prim", size="64M")
    d = make_server("drtls", size="64M", serve_args=("--listen", f"127.0.0.1:{port}", "--tls-psk", psk))
    du = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}"
    write_blocks(p.uri, {0: b"\x44" * MiB})
    return p, d, du, psk, port


def _attacker_uri(port, psk, export=""):
    return f"nbds://alice@127.0.0.1:{port}/{export}?tls-psk-file={psk}"


def test_a_key_holder_cannot_delete_overwrite_or_forge_dr_history(psk_dr):
    p, d, du, psk, port = psk_dr
    r1 = replicate(p.vol, du)
    name = r1["snapshot"]
    att = _attacker_uri(port, psk)
    for export in (f"!delete@{name}", f"!commit@{name}", f"!commit?token={TOKEN}&entries=0&shift=16&keep=none",
                   f"!data?token={TOKEN}", f"!manifest?token={TOKEN}", f"!abort?token={TOKEN}",
                   "!commit?token=zz&entries=0&shift=16&keep=none", "!sums@" + name, "!bogus"):
        assert refused(att, export), export
    # the head of a bound DR is read-only for everyone
    with connected(att) as h:
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"evil" * 1024, 0)
    # snapshots are read-only exports
    with connected(_attacker_uri(port, psk, "@" + name)) as h:
        with pytest.raises(nbd.Error):
            h.pwrite(b"evil" * 1024, 0)
    # begin with the primary's identity but a forced rebind does not touch committed history
    assert [s["name"] for s in snaps(d.vol)] == [name]
    assert verify(p.vol, name, du).returncode == 0
    log = (d.vol / "server.log").read_text()
    assert log.count("DR refused") >= 7, log
    assert "tls user=alice" in log and "127.0.0.1:" in log


def test_a_commit_during_another_transfer_is_refused(psk_dr, procs):
    p, d, du, psk, port = psk_dr
    replicate(p.vol, du)
    write_blocks(p.uri, {8 * MiB: os.urandom(8 * MiB)})
    slow = procs("replicate", p.vol, "--to", du, "--rate", "2M", "--json")
    wait_for(lambda: json.loads(_hello(du)).get("transfer") and json.loads(_hello(du))["transfer"]["live"],
             what="a live transfer at the DR")
    prim = json.loads(run_blockrep("info", p.vol, "--json", check=True).stdout)["uuid"]
    att = _attacker_uri(port, psk)
    # a second transfer (another token) while one is live, and a commit without the token
    begin = (f"!begin?primary={prim}&snap={uuid.uuid4()}&name=forged&base=none&token={TOKEN}&force=0")
    assert refused(att, begin)
    assert refused(att, f"!commit?token={TOKEN}&entries=0&shift=20&keep=none")
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0, err
    res = json.loads(out)
    assert [s["name"] for s in snaps(d.vol)][-1] == res["snapshot"]
    assert "forged" not in [s["name"] for s in snaps(d.vol)]
    assert verify(p.vol, res["snapshot"], du).returncode == 0
    assert "another transfer is in progress" in (d.vol / "server.log").read_text()


def _hello(u: str) -> bytes:
    h = open_export(u, "!hello")
    try:
        return h.pread(h.get_size(), 0)
    finally:
        h.shutdown()


def test_a_commit_of_a_partial_transfer_is_refused_by_the_dr(pair):
    """A primary (or a key holder) that begins a transfer, writes part of the delta and commits
    with a manifest of the whole delta is refused: the DR checks every chunk itself."""
    p, d = pair
    replicate(p.vol, d.uri)
    prim = json.loads(run_blockrep("info", p.vol, "--json", check=True).stdout)["uuid"]
    base = snaps(d.vol)[-1]["uuid"]
    from engine.replication import protocol as P
    sess = open_export(d.uri, P.build("begin", primary=prim, snap=str(uuid.uuid4()), name="partial",
                                      base=base, token=TOKEN, force=False))
    data = open_export(d.uri, P.build("data", token=TOKEN))
    data.pwrite(b"\x55" * 65536, 0)  # half of what the manifest below claims
    data.flush()
    man = open_export(d.uri, P.build("manifest", token=TOKEN))
    full = P.chunk_sum(b"\x55" * 65536)
    man.pwrite(P.encode_manifest([(0, full), (1, full)]), 0)
    man.flush()
    assert refused(d.uri, P.build("commit", token=TOKEN, entries=2, shift=16, keep=None))
    # a manifest that leaves out a chunk the head changed is refused too
    man.pwrite(P.encode_manifest([(1, full)]), 0)
    man.flush()
    assert refused(d.uri, P.build("commit", token=TOKEN, entries=1, shift=16, keep=None))
    for h in (man, data, sess):
        h.shutdown()
    assert "partial" not in [s["name"] for s in snaps(d.vol)]
    assert "verification failed" in (d.vol / "server.log").read_text()
    # the next real run undoes the partial write and commits a verified snapshot
    write_blocks(p.uri, {30 * MiB: b"\x66" * 4096})
    r = replicate(p.vol, d.uri)
    assert r["mode"] == "incremental"
    assert verify(p.vol, r["snapshot"], d.uri).returncode == 0


def test_dr_retention_is_the_drs_own(make_server):
    p = make_server("prim", size="64M")
    d = make_server("dr", size="64M", serve_args=("--keep", "2", "--keep-min-age", "0"))
    names = []
    for i in range(4):
        write_blocks(p.uri, {i * MiB: bytes([i + 1]) * 4096})
        names.append(replicate(p.vol, d.uri, "--keep-remote", "1")["snapshot"])
    # --keep 2 at the DR; the primary's --keep-remote 1 is ignored without --allow-remote-prune
    assert [s["name"] for s in snaps(d.vol)] == names[-2:]
    assert "ignored a request to keep 1" in (d.vol / "server.log").read_text()
    assert "retention (keep 2, min age 0 s) deleted snapshot" in (d.vol / "server.log").read_text()


def test_a_flood_of_new_snapshots_cannot_push_the_recent_past_out_with_keep_min_age(make_server):
    """A key holder can add DR snapshots; with --keep-min-age the DR's count retention never
    deletes one younger than that, however many arrive."""
    p = make_server("prim", size="64M")
    d = make_server("dr", size="64M", serve_args=("--keep", "2", "--keep-min-age", "1h"))
    names = [replicate(p.vol, d.uri)["snapshot"] for _ in range(5)]
    assert [s["name"] for s in snaps(d.vol)] == names
    assert "deleted snapshot" not in (d.vol / "server.log").read_text()
    # the DR admin's own snapshots are never the DR retention's to delete
    d2 = make_server("dr2", size="64M", serve_args=("--keep", "1", "--keep-min-age", "0"))
    p2 = make_server("prim2", size="64M")
    r0 = replicate(p2.vol, d2.uri)["snapshot"]
    run_blockrep("snapshot", "create", d2.vol, "--name", "admin-own", check=True)
    last = [replicate(p2.vol, d2.uri)["snapshot"] for _ in range(2)][-1]
    assert [s["name"] for s in snaps(d2.vol)] == ["admin-own", last] and r0 != last
    r = run_blockrep("serve", p.vol, "--keep-min-age", "soon")
    assert "invalid --keep-min-age" in assert_one_error_line(r)


def test_remote_prune_when_the_dr_allows_it_never_below_its_keep(make_server):
    p = make_server("prim", size="64M")
    d = make_server("dr", size="64M", serve_args=("--keep", "3", "--keep-min-age", "0", "--allow-remote-prune"))
    names = [replicate(p.vol, d.uri, "--keep-remote", "2")["snapshot"] for _ in range(4)]
    assert [s["name"] for s in snaps(d.vol)] == names[-3:]
    d2 = make_server("dr2", size="64M", serve_args=("--allow-remote-prune", "--keep-min-age", "0"))
    names = [replicate(p.vol, d2.uri, "--keep-remote", "2")["snapshot"] for _ in range(3)]
    assert [s["name"] for s in snaps(d2.vol)] == names[-2:]


# ------------------------------------------------------------------ retention keeps the base

def test_deleting_or_pruning_the_common_base_is_refused_and_names_the_target(pair):
    p, d = pair
    base = replicate(p.vol, d.uri)["snapshot"]
    r = run_blockrep("snapshot", "delete", p.vol, base)
    line = assert_one_error_line(r)
    assert "common base of" in line and d.uri in line and "--force" in line
    r = run_blockrep("snapshot", "prune", p.vol, "--keep", "0")
    assert r.returncode == 0 and base in r.stderr and "common base" in r.stderr
    assert [s["name"] for s in snaps(p.vol)] == [base]


def test_keep_local_prunes_only_replicate_snapshots_never_the_base_or_user_ones(pair):
    p, d = pair
    run_blockrep("snapshot", "create", p.vol, "--name", "mine", check=True)
    made = [replicate(p.vol, d.uri, "--keep-local", "1")["snapshot"] for _ in range(3)]
    left = [s["name"] for s in snaps(p.vol)]
    assert left == ["mine", made[-1]]
    assert {s["name"]: s["origin"] for s in snaps(p.vol)} == {"mine": "user", made[-1]: "replicate"}


def test_hash_rebase_after_a_forced_base_delete_sends_only_what_differs(make_server, tmp_path):
    """The DR runs behind nbdkit's stats filter: bytes written to it are counted independently."""
    p = make_server("prim", size="64M")
    write_blocks(p.uri, {0: os.urandom(16 * MiB)})
    d = make_server("dr", size="64M", start=False)
    sock, stats = tmp_path / "dr.sock", tmp_path / "dr.stats"
    from engine.server import PLUGIN, plugin_env
    dr = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=stats", "python", PLUGIN, f"statsfile={stats}",
                           f"volume={d.vol}", f"logfile={d.vol / 'server.log'}"], env=plugin_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        du = uri(sock)
        wait_for(lambda: sock.exists() and not refused(du, "!hello"), what="the DR")
        base = replicate(p.vol, du)["snapshot"]
        run_blockrep("snapshot", "delete", p.vol, base, "--force", check=True)
        write_blocks(p.uri, {40 * MiB: b"\x77" * 4096})
        r = replicate(p.vol, du)
        assert r["mode"] == "rebase" and r["bytes_sent"] <= MiB, r  # one 1 MiB chunk differs
        assert verify(p.vol, r["snapshot"], du).returncode == 0
    finally:
        dr.send_signal(signal.SIGTERM)
        dr.wait(timeout=30)
    written = parse_stats(stats)["write"]["bytes"]
    assert 16 * MiB <= written <= 16 * MiB + MiB + 64 * 1024, written  # the seed + one chunk


# ------------------------------------------------------------------ the truth in status and output

def test_a_failed_run_shows_in_status_and_json(pair, tmp_path):
    p, d = pair
    replicate(p.vol, d.uri)
    bad = uri(tmp_path / "nobody.sock")
    r = rep(p.vol, bad, "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert "unreachable" in out["error"] and out["target"] == bad
    rows = {row["target"]: row for row in status(p.vol)}
    assert rows[bad]["state"] == "failing" and "unreachable" in rows[bad]["last_failure"]["error"]
    assert rows[d.uri]["state"] == "ok" and rows[d.uri]["last_success"]["mode"] == "seed"
    assert run_blockrep("status", p.vol, "--max-rpo", "3600").returncode == 2  # the bad target has no RPO
    run_blockrep("status", p.vol, "--forget", bad, check=True)
    assert [row["target"] for row in status(p.vol)] == [d.uri]
    assert run_blockrep("status", p.vol, "--max-rpo", "3600").returncode == 0


def test_verify_accepts_the_dr_server_uri_and_its_snapshot_export_and_json(pair):
    p, d = pair
    name = replicate(p.vol, d.uri)["snapshot"]
    r = verify(p.vol, name, d.uri)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and "identical" in r.stdout
    r = run_blockrep("verify", p.vol, name, "--against", uri(d.sock, "@" + name), "--json", check=True)
    assert json.loads(r.stdout)["identical"] is True
    run_blockrep("snapshot", "create", p.vol, "--name", "other", check=True)
    r = run_blockrep("verify", p.vol, "other", "--against", uri(d.sock, "@" + name))
    assert "not a copy" in assert_one_error_line(r)


def test_replicate_freeze_hooks_take_the_snapshot_between_pre_and_post(pair, tmp_path):
    p, d = pair
    log = tmp_path / "hooks.log"
    r = replicate(p.vol, d.uri, "--pre", f"echo pre >> {log}", "--post", f"echo post >> {log}")
    assert log.read_text().split() == ["pre", "post"] and r["mode"] == "seed"
    r = rep(p.vol, d.uri, "--pre", "false")
    assert r.returncode == 1
    assert len(snaps(p.vol)) == 1, "a failed pre command refuses the snapshot"


def test_bad_target_uri_is_one_error_line(pair):
    p, _ = pair
    assert "invalid target" in assert_one_error_line(rep(p.vol, "http://example.invalid/"))


