"""R22 for the DR operations (issue 10): a 4 TiB sparse volume with data beyond 4 GiB and at the
far end goes through send/receive (full and incremental), restore (incremental, and full into a
new empty volume), promote, demote and the replication back, each moving only what changed and
each result verified by digests (only digests cross: 4 TiB is never read). 16 TiB replication
is in tests/test_dr_trust.py."""

from __future__ import annotations

import json

import pytest
from conftest import run_blockrep
from replhelp import replicate, write_blocks

pytestmark = pytest.mark.slow
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE = 4 * TiB


def ok_json(*args, timeout: float = 600) -> dict:
    r = run_blockrep(*args, "--json", timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def verified(vol, snap: str, against: str) -> None:
    r = run_blockrep("verify", vol, snap, "--against", against, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def same_content(a, snap_a: str, b, snap_b: str) -> None:
    """Two snapshots (of different identities) hold the same bytes: their servers' digests per
    1 MiB chunk are equal (holes cost nothing to digest)."""
    from engine.replication import checksums as C
    da = C.blockrep_sums(a.uri, snap_a, 20, None, SIZE)
    db = C.blockrep_sums(b.uri, snap_b, 20, None, SIZE)
    assert len(da) == len(db) == (SIZE >> 20) * 16 and not len(C.differing(da, db))


def test_a_4tib_volume_through_streams_restore_promote_and_failback(make_server, tmp_path):
    p = make_server("p", size="4T")
    d = make_server("d", size="4T", serve_args=("--keep-min-age", "0"))
    write_blocks(p.uri, {0: b"\x01" * 64 * KiB, 5 * GiB: b"\x05" * 64 * KiB, 3 * TiB: b"\x0f" * 4096,
                         SIZE - 4096: b"\x09" * 4096})
    s1 = replicate(p.vol, d.uri, timeout=300)["snapshot"]

    # streams: full into a new volume, then an increment; each verified against the source
    write_blocks(p.uri, {2 * TiB: b"\x0a" * 8192})
    run_blockrep("snapshot", "create", p.vol, "--name", "s2", check=True)
    q = make_server("q", size="4T")
    r = run_blockrep("send", p.vol, s1, "-o", tmp_path / "full.bs", timeout=600)
    assert r.returncode == 0 and "136.0 KiB of data" in r.stderr, r.stderr
    assert (tmp_path / "full.bs").stat().st_size < 4 * MiB  # holes are records, not bytes
    assert run_blockrep("receive", q.vol, "-i", tmp_path / "full.bs", timeout=600).returncode == 0
    run_blockrep("send", p.vol, "--from", s1, "s2", "-o", tmp_path / "inc.bs", check=True, timeout=600)
    assert run_blockrep("receive", q.vol, "-i", tmp_path / "inc.bs", timeout=600).returncode == 0
    verified(p.vol, "s2", f"nbd+unix:///@s2?socket={q.sock}")

    # restore: wreck the far end, restore from the DR: only what differs moves
    write_blocks(p.uri, {SIZE - 4096: b"\xee" * 4096, TiB + 12345 * 4096: b"\xee" * 4096})
    res = ok_json("restore", p.vol, "--from", d.uri, "--yes")
    assert res["mode"] == "incremental" and res["bytes_sent"] + res["bytes_zeroed"] <= 4 * MiB, res
    run_blockrep("snapshot", "create", p.vol, "--name", "restored", check=True)
    same_content(p, "restored", d, s1)

    # restore into a new, empty 4 TiB volume (the lost primary rebuilt): full, holes skipped
    r = make_server("r", size="4T")
    res = ok_json("restore", r.vol, "--from", d.uri, "--yes")
    assert res["mode"] == "full" and res["bytes_sent"] == 2 * 64 * KiB + 2 * 4096, res
    run_blockrep("snapshot", "create", r.vol, "--name", "rebuilt", check=True)
    same_content(r, "rebuilt", d, s1)

    # failover and failback at 4 TiB
    write_blocks(p.uri, {3 * TiB + 8192: b"\x0e" * 4096})  # lost in the disaster
    ok_json("promote", d.vol)
    write_blocks(d.uri, {2 * TiB + 65536: b"\x0d" * 4096})  # written at the DR
    ok_json("demote", p.vol, "--primary", d.uri, "--force")
    back = replicate(d.vol, p.uri, timeout=300)
    assert back["mode"] == "incremental" and back["bytes_sent"] + back.get("bytes_zeroed", 0) <= 1 * MiB, back
    verified(d.vol, back["snapshot"], f"nbd+unix:///@{back['snapshot']}?socket={p.sock}")
