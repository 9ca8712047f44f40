"""Snapshots end to end: DESIGN.md M4 (create, list, delete, open read-only, freeze hooks),
M5 (changed extents between snapshots), M11 (backup from a snapshot export) and RELIABILITY.md
R12 (snapshot exports are read-only and never change) and R18 (SIGKILL during snapshot
create/delete).

Everything runs for real: `blockrep` commands (served: through the control socket; not served:
on the volume opened directly), a real nbdkit, and real clients on the `@NAME` exports (qemu-io,
qemu-img, nbdcopy, nbdinfo, nbdfuse + loop + ext4, libnbd's `nbd` module).

    export ""        the head (read-write)
    export "@NAME"   snapshot NAME (read-only), listed by `nbdinfo --list`
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import random
import re
import shlex
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import nbd
import pytest
from blockdev import attached, fsck_clean, mounted
from conftest import backend_create_args, run_blockrep, tree_state

KiB = 1 << 10
MiB = 1 << 20
BS = 4096
HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
ERROR_PREFIX = "blockrep: error:"
READ_ONLY_ERRNOS = (errno.EPERM, errno.EROFS)


# ------------------------------------------------------------------------------------- helpers

def run(*cmd, check=True, timeout=300, stdout=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=stdout is None, stdout=stdout,
                       text=stdout is None, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def qemu_io(uri, *commands, readonly=False, check=True) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for c in commands:
        args += ["-c", c]
    r = run(*args, uri, check=check)
    if check:
        assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
        assert "Pattern verification" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def snap_uri(server, name: str) -> str:
    return f"nbd+unix:///@{name}?socket={server.sock}"


def snapshot_create(vol, name: str | None = None, *extra) -> str:
    """`blockrep snapshot create`; asserts it printed exactly the name (and nothing else)."""
    args = ["snapshot", "create", vol] + ([f"--name={name}"] if name is not None else []) + list(extra)
    r = run_blockrep(*args, check=True)
    printed = r.stdout.strip()
    assert r.stdout == printed + "\n" and "\n" not in printed, r.stdout
    if name is not None:
        assert printed == name
    return printed


def snapshot_list(vol) -> list[dict]:
    r = run_blockrep("snapshot", "list", vol, "--json", check=True)
    assert r.stderr == ""
    return json.loads(r.stdout)


def names(vol) -> list[str]:
    return [s["name"] for s in snapshot_list(vol)]


def diff(vol, a: str, b: str) -> list[dict]:
    r = run_blockrep("diff", vol, a, b, "--json", check=True)
    return json.loads(r.stdout)


def info(vol) -> dict:
    return json.loads(run_blockrep("info", vol, "--json", check=True).stdout)


def export_names(server) -> set[str]:
    out = json.loads(run("nbdinfo", "--list", "--json", server.uri).stdout)
    return {e["export-name"] for e in out["exports"]}


def nbd_map(uri) -> list[tuple[int, int, int]]:
    """nbdinfo --map as [(offset, length, type)], adjacent runs of one type merged."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout):
        o, n, t = e["offset"], e["length"], e["type"]
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((o, n, t))
    return out


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def close(h) -> None:
    try:
        h.shutdown()
    except nbd.Error:
        pass
    if hasattr(h, "close"):
        h.close()


def read_export(uri, count=None, offset=0, chunk=8 * MiB) -> bytes:
    """Read [offset, offset+count) of an export (all of it by default) through libnbd."""
    h = connect(uri)
    try:
        if count is None:
            count = h.get_size() - offset
        out = bytearray()
        for o in range(offset, offset + count, chunk):
            out += h.pread(min(chunk, offset + count - o), o)
        return bytes(out)
    finally:
        close(h)


def export_sha(uri) -> str:
    """sha256 of a whole export, streamed by nbdcopy to stdout (a second client besides libnbd)."""
    p = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    digest = hashlib.sha256()
    for block in iter(lambda: p.stdout.read(1 << 20), b""):
        digest.update(block)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, f"nbdcopy {uri} - failed: {err}"
    return digest.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def coalesce(blocks, gran: int) -> list[dict]:
    """Sorted, coalesced [{offset, length}] of the granules that contain the given byte offsets."""
    granules = sorted({b // gran for b in blocks})
    out: list[dict] = []
    for g in granules:
        if out and out[-1]["offset"] + out[-1]["length"] == g * gran:
            out[-1]["length"] += gran
        else:
            out.append({"offset": g * gran, "length": gran})
    return out


def touched(offset: int, length: int) -> range:
    """The 4 KiB block offsets a request of [offset, offset+length) touches."""
    return range(offset // BS * BS, offset + length, BS)


def fails_cleanly(args, *watch) -> str:
    """Run blockrep ARGS; assert exit != 0, nothing on stdout, one `blockrep: error:` line,
    and nothing changed under the watched paths (tree_state). Returns the error line."""
    before = [tree_state(w) for w in watch]
    r = run_blockrep(*args)
    after = [tree_state(w) for w in watch]
    lines = r.stderr.splitlines()
    assert r.returncode != 0, f"blockrep {args} succeeded: {r.stdout!r} {r.stderr!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines
    assert len(lines[0]) > len(ERROR_PREFIX) + 5, "the error line must say what is wrong"
    assert "Traceback" not in r.stderr
    assert r.stdout == "", f"a failing command printed to stdout: {r.stdout!r}"
    for w, b, a in zip(watch, before, after, strict=True):
        assert a == b, f"{w} changed: before {b} after {a}"
    return lines[0]


def logical_state(vol) -> tuple:
    """What a volume holds, independent of how its files are laid out: volume.json, the
    snapshot list, and a digest of the head and of every snapshot (read in this process
    through the engine; the volume must not be served)."""
    from engine.volume import Volume

    with Volume.open(vol) as v:
        digests = [sha(v.read(v.size, 0))]
        for s in v.snapshots():
            digests.append((s["name"], s["id"], s["generation"], s["created"],
                            sha(v.snapshot_read(s["id"], v.size, 0))))
    return (Path(vol, "volume.json").read_bytes(), tuple(digests))


# ------------------------------------------------------------ M4: exports read the past exactly

@pytest.mark.parametrize("backend", ["lsfs", "image"])
def test_snapshot_export_reads_the_volume_as_it_was(make_server, tmp_path, backend):
    s = make_server(size="64M", create_args=backend_create_args(backend, tmp_path))
    qemu_io(s.uri, "write -P 0x11 0 1M", "write -P 0x22 4M 512K", "write -P 0x33 10M 64K",
            "write -P 0x44 16M 2M", f"discard {17 * MiB} {512 * KiB}", "write -P 0x55 40M 3",
            "flush")
    before = tmp_path / "before.img"
    run("nbdcopy", s.uri, before)
    map_before = nbd_map(s.uri)
    snapshot_create(s.vol, "s1")

    # change every one of those extents on the head: overwrite, zero, trim, fill a hole, new data
    qemu_io(s.uri, "write -P 0x66 0 1M", "write -z 4M 512K", "discard 10M 64K",
            f"write -P 0x77 {17 * MiB} {512 * KiB}", "write -P 0x88 30M 1M", "write -P 0x99 40M 1")
    snap = snap_uri(s, "s1")
    qemu_io(snap, "read -P 0x11 0 1M", "read -P 0 1M 3M", "read -P 0x22 4M 512K",
            "read -P 0x33 10M 64K", "read -P 0x44 16M 1M", f"read -P 0 {17 * MiB} {512 * KiB}",
            f"read -P 0x44 {17 * MiB + 512 * KiB} {512 * KiB}", "read -P 0 30M 1M",
            "read -P 0x55 40M 3", f"read -P 0 {40 * MiB + 3} 4093", readonly=True)
    qemu_io(s.uri, "read -P 0x66 0 1M", "read -P 0 4M 512K", "read -P 0 10M 64K",
            f"read -P 0x77 {17 * MiB} {512 * KiB}", "read -P 0x88 30M 1M", "read -P 0x99 40M 1",
            f"read -P 0x55 {40 * MiB + 1} 2", readonly=True)

    # nbdcopy of the snapshot equals the copy taken right before it; the head does not
    copy = tmp_path / "snap.img"
    run("nbdcopy", snap, copy)
    run("cmp", before, copy)
    head = tmp_path / "head.img"
    run("nbdcopy", s.uri, head)
    assert run("cmp", before, head, check=False).returncode == 1

    # qemu-img reads it too (into another format)
    qcow = tmp_path / "snap.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", snap, qcow)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", before, qcow)

    # block status of the snapshot: the holes and data as they were
    assert nbd_map(snap) == map_before
    head_map = nbd_map(s.uri)
    assert head_map != map_before
    hole_at_17m = [e for e in map_before if e[0] <= 17 * MiB < e[0] + e[1]]
    assert hole_at_17m and hole_at_17m[0][2] == HOLE, map_before


def test_snapshot_of_an_empty_volume_reads_zeroes_and_is_all_hole(server):
    snapshot_create(server.vol, "empty")
    h = server.connect()
    h.pwrite(b"\xee" * MiB, 0)
    snap = snap_uri(server, "empty")
    assert read_export(snap, MiB) == bytes(MiB)
    assert nbd_map(snap) == [(0, 64 * MiB, HOLE)]


def test_reading_a_deleted_snapshot_through_an_open_connection_fails(server):
    """A backup tool still connected to @NAME when NAME is deleted must get errors, never the
    head's data or reclaimed garbage."""
    h = server.connect()
    h.pwrite(b"\x01" * MiB, 0)
    snapshot_create(server.vol, "gone")
    h.pwrite(b"\x02" * MiB, 0)
    ro = server.connect(snap_uri(server, "gone"))
    assert ro.pread(4096, 0) == b"\x01" * 4096
    run_blockrep("snapshot", "delete", server.vol, "gone", check=True)
    with pytest.raises(nbd.Error):
        ro.pread(4096, 0)
    assert "@gone" not in export_names(server)
    with pytest.raises(nbd.Error):
        connect(snap_uri(server, "gone"))


# --------------------------------------------------------------- R12: read-only and immutable

def test_snapshot_export_refuses_writes_trims_and_zeroes(server, tmp_path):
    h = server.connect()
    pattern = random.Random(1).randbytes(2 * MiB)
    h.pwrite(pattern, 0)
    snapshot_create(server.vol, "ro")
    uri = snap_uri(server, "ro")
    digest = export_sha(uri)

    ro = server.connect(uri)
    assert ro.is_read_only()
    assert not ro.can_trim() and not ro.can_zero()
    # libnbd refuses on the client side first ...
    with pytest.raises(nbd.Error) as e:
        ro.pwrite(b"x" * 4096, 0)
    assert e.value.errnum in READ_ONLY_ERRNOS, e.value
    # ... so turn that off: the server itself must refuse every kind of change
    ro.set_strict_mode(0)
    attempts = {
        "write": lambda: ro.pwrite(b"x" * 4096, 0),
        "write FUA": lambda: ro.pwrite(b"y" * 65536, 8192, nbd.CMD_FLAG_FUA),
        "unaligned write": lambda: ro.pwrite(b"z" * 3, 4097),
        "trim": lambda: ro.trim(MiB, 0),
        "zero": lambda: ro.zero(MiB, 0),
        "fast zero": lambda: ro.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO),
        "zero no-hole": lambda: ro.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE),
    }
    for what, op in attempts.items():
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errnum in READ_ONLY_ERRNOS, f"{what}: {e.value}"
    ro.flush()  # allowed, and changes nothing
    assert ro.pread(4096, 0) == pattern[:4096], "the connection must survive refused requests"

    # qemu-io cannot open it read-write, nor write through a read-only open
    assert qemu_io(uri, "write -P 0x77 0 4k", check=False).returncode != 0
    r = qemu_io(uri, "write -P 0x77 0 4k", readonly=True, check=False)
    assert r.returncode != 0 or "failed" in r.stdout + r.stderr
    # nbdcopy into it fails
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * MiB)
    assert run("nbdcopy", src, uri, check=False).returncode != 0

    assert export_sha(uri) == digest
    assert h.pread(len(pattern), 0) == pattern


def _wait_for_collector(vol, ratio: float, timeout: float = 20) -> dict:
    """Poll `info` until used_bytes <= ratio x live_bytes; returns the last info."""
    deadline = time.monotonic() + timeout
    while True:
        i = info(vol)
        if i["used_bytes"] <= ratio * i["live_bytes"] or time.monotonic() > deadline:
            return i
        time.sleep(0.25)


@pytest.mark.lsfs_only(
    "waits for the lsfs collector to move snapshot blocks; the image backend's copy-before-"
    "write is tests/test_image_backend.py"
)
def test_snapshot_content_never_changes_across_writes_collector_restart_and_sigkill(make_server):
    """R12: a snapshot's bytes are the same after heavy head writes, after the collector has
    moved the snapshot's own blocks, after `stop`/`serve`, and after SIGKILL + serve."""
    s = make_server(size="64M", create_args=["--segment-size", "1M"])
    rnd = random.Random(12)
    h = s.connect()
    shadow = bytearray(rnd.randbytes(16 * MiB))
    for off in range(0, 16 * MiB, MiB):  # 1 MiB records: one per 1 MiB segment
        h.pwrite(shadow[off:off + MiB], off)
    # overwrite 3 of every 4 blocks: the segments holding the snapshot's data end up 25 % live,
    # so reaching the collector's target means relocating blocks only the snapshot maps
    for lba in range(4096):
        if lba % 4:
            blk = rnd.randbytes(BS)
            h.pwrite(blk, lba * BS)
            shadow[lba * BS:(lba + 1) * BS] = blk
    h.flush()
    snapshot_create(s.vol, "keep")
    # every segment that exists now holds blocks only the snapshot will map once the head moves on
    seg_dir = s.vol / "segments"
    holding = {p.name for p in seg_dir.glob("*.seg")}
    uri = snap_uri(s, "keep")
    digest = sha(bytes(shadow) + bytes(48 * MiB))
    assert export_sha(uri) == digest

    # the head moves on: overwrite it all twice, zero, trim, and fill new ground
    for _ in range(2):
        h.pwrite(rnd.randbytes(16 * MiB), 0)
    h.zero(4 * MiB, 4 * MiB)
    h.trim(2 * MiB, 12 * MiB)
    h.pwrite(rnd.randbytes(16 * MiB), 16 * MiB)
    h.flush()
    head = h.pread(32 * MiB, 0)
    s.close_handles()
    assert export_sha(uri) == digest

    # idle now: the collector runs. A segment of `holding` can only go away once its live
    # blocks, which only the snapshot maps, have been relocated.
    deadline = time.monotonic() + 20
    while {p.name for p in seg_dir.glob("*.seg")} >= holding and time.monotonic() < deadline:
        time.sleep(0.25)
    moved = holding - {p.name for p in seg_dir.glob("*.seg")}
    assert moved, f"the collector relocated no snapshot block within 20 s: {info(s.vol)}"
    i = info(s.vol)
    assert i["live_bytes"] == 16 * MiB + 26 * MiB, i  # the snapshot's blocks still count as live
    assert export_sha(uri) == digest
    assert read_export(s.uri, 32 * MiB) == head

    s.stop()
    s.start()
    assert export_sha(uri) == digest

    for cycle in range(3):
        h = s.connect()
        h.pwrite(rnd.randbytes(8 * MiB), cycle * 8 * MiB)  # unflushed when the kill comes
        h.trim(MiB, 40 * MiB)
        s.kill()
        s.start()
        assert names(s.vol) == ["keep"]
        assert export_sha(uri) == digest, f"snapshot changed after SIGKILL cycle {cycle}"
        rec = info(s.vol)["recovery"]
        assert rec["corrupt_records"] == 0 and rec["skipped_bytes"] == 0, rec
    s.stop()
    r = run_blockrep("check", s.vol, "--json")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.lsfs_only("crashes right after an lsfs collector pass over snapshot blocks")
def test_crash_after_the_collector_moved_snapshot_blocks_keeps_the_heads_newer_data(tmp_path):
    """Regression (found by the R18 churn test): the collector relocates a block that only a
    snapshot still maps (the head has a newer, flushed version); a crash before the collector's
    checkpoint must not let recovery put the snapshot's old data back into the head, nor into a
    snapshot taken after the relocation (R12).
    Deterministic: the engine in this process, one collector step, then `abandon` (a crash)."""
    from engine.volume import Volume, create

    vol = tmp_path / "vol"
    create(vol, 16 * MiB, segment_size=MiB)
    v = Volume.open(vol)
    try:
        v.write(b"A" * BS, 0)               # block 0 = A, in the first segment
        v.write(b"X" * (MiB - BS), BS)      # fill that segment ...
        v.write(b"Y" * (MiB - BS), BS)      # ... and make the filler dead
        v.snapshot_create("S")              # S maps block 0 = A
        v.write(b"B" * BS, 0)               # the head: block 0 = B; A is S's alone
        v.flush()                           # B is durable
        lib = v._n.lib
        sealed = sorted(int(p.stem, 16) for p in (vol / "segments").glob("*.seg"))[:-1]
        moved = [seg for seg in sealed if lib.vol_gc_segment(v._v, seg) == 0]
        assert moved, "the collector moved nothing"
        v.snapshot_create("S2")             # S2 maps block 0 = B (its create flushes)
        assert v.read(BS, 0) == b"B" * BS
    finally:
        v.abandon()  # crash before the collector's checkpoint
    with Volume.open(vol) as v:
        assert v.snapshot_read(v.snapshot("S")["id"], BS, 0) == b"A" * BS
        head, s2 = v.read(BS, 0), v.snapshot_read(v.snapshot("S2")["id"], BS, 0)
    assert head[:1] + s2[:1] == b"BB", (
        f"after recovery the head reads {head[:1]!r} and S2 {s2[:1]!r} instead of b'B': recovery "
        "replayed the relocation of S's block into the head (and S2 was cloned from it)")


# --------------------------------------------------- the same commands, served and not served

DEFAULT_NAME = re.compile(r"\d{8}T\d{6}")


def test_snapshot_commands_work_the_same_served_and_not_served(make_server):
    s = make_server(size="16M")
    qemu_io(s.uri, "write -P 0xa1 0 64K")
    s.stop()
    assert snapshot_create(s.vol, "off1") == "off1"  # not served: the volume is opened directly
    s.start()
    qemu_io(s.uri, "write -P 0xa2 64K 64K")
    s.stop()
    t0 = dt.datetime.now(dt.UTC)
    default = snapshot_create(s.vol)  # default name: a UTC timestamp
    assert DEFAULT_NAME.match(default), default
    stamp = dt.datetime.strptime(default[:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    assert abs((stamp - t0).total_seconds()) < 60, (default, t0)

    s.start()
    snapshot_create(s.vol, "on1")  # served: through the control socket
    qemu_io(s.uri, "write -P 0xa3 128K 64K")
    snapshot_create(s.vol, "on2")
    assert names(s.vol) == ["off1", default, "on1", "on2"]
    assert export_names(s) == {"", "@off1", f"@{default}", "@on1", "@on2"}
    qemu_io(snap_uri(s, "off1"), "read -P 0xa1 0 64K", "read -P 0 64K 128K", readonly=True)
    qemu_io(snap_uri(s, default), "read -P 0xa1 0 64K", "read -P 0xa2 64K 64K",
            "read -P 0 128K 64K", readonly=True)
    qemu_io(snap_uri(s, "on1"), "read -P 0xa2 64K 64K", "read -P 0 128K 64K", readonly=True)
    qemu_io(snap_uri(s, "on2"), "read -P 0xa3 128K 64K", readonly=True)

    r = run_blockrep("snapshot", "delete", s.vol, "on1", check=True)
    assert r.stdout == "" and r.stderr == ""
    served = snapshot_list(s.vol)
    assert [x["name"] for x in served] == ["off1", default, "on2"]
    assert export_names(s) == {"", "@off1", f"@{default}", "@on2"}
    with pytest.raises(nbd.Error):
        connect(snap_uri(s, "on1"))
    assert diff(s.vol, default, "on2") == [{"offset": 128 * KiB, "length": 64 * KiB}]
    assert served[2]["changed_bytes"] == 64 * KiB  # the deleted one's changes moved to on2

    s.stop()
    offline = snapshot_list(s.vol)
    assert offline == served
    assert diff(s.vol, default, "on2") == [{"offset": 128 * KiB, "length": 64 * KiB}]
    run_blockrep("snapshot", "delete", s.vol, "off1", check=True)
    assert names(s.vol) == [default, "on2"]
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "1", check=True)
    assert r.stdout.split() == ["deleted", default]
    assert names(s.vol) == ["on2"]
    s.start()
    assert export_names(s) == {"", "@on2"}
    qemu_io(snap_uri(s, "on2"), "read -P 0xa1 0 64K", "read -P 0xa2 64K 64K",
            "read -P 0xa3 128K 64K", readonly=True)


def test_snapshot_list_json_shape_and_order(server):
    assert snapshot_list(server.vol) == []
    h = server.connect()
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    written = []
    # names in reverse alphabetical order: the list must follow creation, not names
    for name, n in [("zz", 3), ("mm", 0), ("aa", 5)]:
        for i in range(n):
            h.pwrite(bytes([n + 1]) * BS, (100 + 2 * i) * BS)
        written.append(n * BS)
        snapshot_create(server.vol, name)
    snaps = snapshot_list(server.vol)
    assert [x["name"] for x in snaps] == ["zz", "mm", "aa"]
    for x in snaps:
        for key, typ in [("id", int), ("name", str), ("created", str), ("generation", int),
                         ("changed_bytes", int), ("pinned_bytes", int), ("uuid", str), ("flags", int)]:
            assert isinstance(x.get(key), typ), (key, x)
        created = dt.datetime.fromisoformat(x["created"].replace("Z", "+00:00"))
        assert created.utcoffset() == dt.timedelta(0), x["created"]
        assert t0 <= created <= dt.datetime.now(dt.UTC), (t0, x["created"])
    assert [x["changed_bytes"] for x in snaps] == [3 * BS, 0, 5 * BS]
    gens = [x["generation"] for x in snaps]
    assert gens == sorted(set(gens)), gens
    assert len({x["id"] for x in snaps}) == 3
    created = [x["created"] for x in snaps]
    assert created == sorted(created)
    # zz and mm map the same blocks (nothing written between them), aa overwrote 3 of them and
    # the head still shares everything with aa: zz and aa pin nothing of their own; mm's 3 blocks
    # (shared with zz) count at most once
    assert snaps[0]["pinned_bytes"] == 0, snaps
    assert snaps[1]["pinned_bytes"] in (0, 3 * BS), snaps
    assert snaps[2]["pinned_bytes"] == 0, snaps
    # the human listing: a header, then the same order, name first
    r = run_blockrep("snapshot", "list", server.vol, check=True)
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == ["NAME", "zz", "mm", "aa"]
    # info --json carries the same list and the total pinned
    i = info(server.vol)
    assert [x["name"] for x in i["snapshots"]] == ["zz", "mm", "aa"]
    assert i["pinned_bytes"] == sum(x["pinned_bytes"] for x in snaps)


def test_snapshot_list_json_shows_each_snapshots_uuid_served_and_not_served(make_server):
    s = make_server(size="16M")
    snapshot_create(s.vol, "on1")  # served: through the control socket
    served = snapshot_list(s.vol)
    s.stop()
    snapshot_create(s.vol, "off1")  # not served: the volume opened directly
    unserved = snapshot_list(s.vol)
    s.start()
    again = snapshot_list(s.vol)
    for listing in (served, unserved, again):
        for x in listing:
            u = uuid.UUID(x["uuid"])
            assert x["uuid"] == str(u), x  # canonical lowercase
            assert u.version == 4 and x["flags"] == 0, x
    assert [x["name"] for x in again] == ["on1", "off1"]
    # one identity per snapshot, the same whoever lists it and across stop/start
    assert unserved[0]["uuid"] == served[0]["uuid"] == again[0]["uuid"]
    assert unserved[1]["uuid"] == again[1]["uuid"] != again[0]["uuid"]


def test_diff_json_equals_the_extents_written_between_snapshots(server):
    """The delta between two snapshots is exactly the blocks whose state changed: every block a
    write touches (even with the same bytes), the partial edge blocks of an unaligned
    write-zeroes, and the whole blocks that a zero or trim turns from data into a hole. A zero
    or trim of a block that already reads as zeroes (never written, zeroed, trimmed) changes
    nothing and is not a change (csrc/lsfs/map.c lsfs_map_tombstone); a trim never touches partial
    blocks."""
    h = server.connect()
    size = 64 * MiB
    h.pwrite(random.Random(3).randbytes(8 * MiB), 0)  # before the first snapshot: not a change
    has_data = set(range(0, 8 * MiB, BS))
    snapshot_create(server.vol, "a")
    changed: set[int] = set()

    def write(off, n, data=None):
        h.pwrite(data if data is not None else b"\x42" * n, off)
        changed.update(touched(off, n))
        has_data.update(touched(off, n))

    def zero_or_trim(off, n, trim):
        (h.trim if trim else h.zero)(n, off)
        a, b = -(-off // BS) * BS, (off + n) // BS * BS
        if a >= b:  # inside one or two blocks: a zero writes them, a trim does nothing
            if not trim:
                changed.update(touched(off, n))
                has_data.update(touched(off, n))
            return
        if not trim:
            edges = ([a - BS] if off < a else []) + ([b] if b < off + n else [])
            changed.update(edges)
            has_data.update(edges)
        for blk in range(a, b, BS):
            if blk in has_data:
                changed.add(blk)
                has_data.discard(blk)

    for off, n in [(0, 4096), (5000, 100), (MiB, 64 * KiB), (MiB + 64 * KiB, 1),
                   (size - 4096, 4096), (33 * MiB + 1, 8190)]:
        write(off, n)
    zero_or_trim(7 * MiB, 12 * KiB, trim=False)           # data -> zero
    zero_or_trim(7 * MiB + 12 * KiB, 4 * KiB, trim=True)  # data -> trimmed
    zero_or_trim(9 * MiB, 64 * KiB, trim=False)           # never written: no change
    zero_or_trim(10 * MiB, 64 * KiB, trim=True)           # never written: no change
    zero_or_trim(20 * MiB + 100, 5000, trim=False)        # unaligned: two partial blocks
    zero_or_trim(6 * MiB + 100, 3 * BS, trim=True)        # unaligned trim: whole blocks only
    rnd = random.Random(4)
    for _ in range(60):
        off = rnd.randrange(0, size - 70000)
        n = rnd.randrange(1, 70000)
        op = rnd.choice(["write", "write", "zero", "trim"])
        if op == "write":
            write(off, n, rnd.randbytes(n))
        else:
            zero_or_trim(off, n, trim=op == "trim")
    snapshot_create(server.vol, "b")
    got = diff(server.vol, "a", "b")
    expected = coalesce(changed, BS)
    assert got == expected, f"diff differs:\n{got[:20]}\nvs\n{expected[:20]}"
    assert got == sorted(got, key=lambda e: e["offset"])
    assert all(e1["offset"] + e1["length"] < e2["offset"] for e1, e2 in zip(got, got[1:], strict=False)), \
        "extents must be coalesced"

    snapshot_create(server.vol, "c")  # nothing written in between
    assert diff(server.vol, "b", "c") == []
    assert diff(server.vol, "a", "c") == expected
    assert diff(server.vol, "b", "b") == []
    # rewriting identical bytes is still a write: it is marked
    h.pwrite(h.pread(BS, 30 * MiB), 30 * MiB)
    snapshot_create(server.vol, "d")
    assert diff(server.vol, "c", "d") == [{"offset": 30 * MiB, "length": BS}]
    assert snapshot_list(server.vol)[1]["changed_bytes"] == sum(e["length"] for e in expected)

    # deleting a snapshot in the middle keeps the deltas exact (its changes merge forward)
    run_blockrep("snapshot", "delete", server.vol, "c", check=True)
    assert diff(server.vol, "b", "d") == [{"offset": 30 * MiB, "length": BS}]
    run_blockrep("snapshot", "delete", server.vol, "b", check=True)
    assert diff(server.vol, "a", "d") == coalesce(changed | {30 * MiB}, BS)

    server.stop()  # the same answer from the volume opened directly
    assert diff(server.vol, "a", "d") == coalesce(changed | {30 * MiB}, BS)
    r = run_blockrep("diff", server.vol, "a", "d", check=True)
    assert [tuple(map(int, ln.split())) for ln in r.stdout.splitlines()] == \
        [(e["offset"], e["length"]) for e in coalesce(changed | {30 * MiB}, BS)]


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_diff_with_from_newer_than_to_is_refused(make_server, served):
    s = make_server(size="8M")
    h = s.connect()
    snapshot_create(s.vol, "old")
    h.pwrite(b"n" * BS, 0)
    snapshot_create(s.vol, "new")
    s.close_handles()
    if not served:
        s.stop()
    msg = fails_cleanly(["diff", s.vol, "new", "old", "--json"])
    assert "new" in msg and "old" in msg and ("newer" in msg or "older" in msg), msg
    assert diff(s.vol, "old", "new") == [{"offset": 0, "length": BS}]


def test_diff_coalesces_at_the_volume_granularity_of_64k(make_server):
    s = make_server(size="16M", create_args=["--granularity", "64K"])
    h = s.connect()
    h.pwrite(b"\x01" * MiB, 0)
    h.pwrite(b"\x01" * BS, 4 * MiB + 60 * KiB)
    snapshot_create(s.vol, "a")
    h.pwrite(b"x" * BS, 68 * KiB)           # -> [64K, 128K)
    h.pwrite(b"y", 200 * KiB + 5)            # -> [192K, 256K)
    h.trim(BS, 300 * KiB)                    # -> [256K, 320K): with the above, one extent
    h.pwrite(b"z" * BS, MiB - BS)            # -> [960K, 1024K) ...
    h.pwrite(b"z" * BS, MiB)                 # ... and [1024K, 1088K): one extent
    h.trim(BS, 4 * MiB + 60 * KiB)           # -> [4M, 4M+64K)
    h.zero(1, 16 * MiB - 1)                  # the last byte -> [16M-64K, 16M)
    snapshot_create(s.vol, "b")
    expected = [{"offset": 64 * KiB, "length": 64 * KiB},
                {"offset": 192 * KiB, "length": 128 * KiB},
                {"offset": 960 * KiB, "length": 128 * KiB},
                {"offset": 4 * MiB, "length": 64 * KiB},
                {"offset": 16 * MiB - 64 * KiB, "length": 64 * KiB}]
    assert diff(s.vol, "a", "b") == expected
    assert snapshot_list(s.vol)[1]["changed_bytes"] == 7 * 64 * KiB
    assert info(s.vol)["granularity"] == 64 * KiB


# ------------------------------------------------------------------------------- bad input

BAD_NAMES = ["a/b", "/", "a b", " ", "a@b", "@a", "", "x" * 65, "snäp", "日本", "a\tb", "a\nb",
             "../x", "a:b", "a*b", "a\\b", "é" * 32]
BAD_IDS = ["slash", "root", "space", "only-space", "at", "leading-at", "empty", "65-chars",
           "umlaut", "cjk", "tab", "newline", "dotdot-slash", "colon", "star", "backslash",
           "64-bytes-non-ascii"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=BAD_IDS)
def test_snapshot_create_rejects_bad_name_not_served(make_server, name):
    s = make_server(size="4M", start=False)
    msg = fails_cleanly(["snapshot", "create", s.vol, f"--name={name}"], s.vol)
    assert "invalid snapshot name" in msg
    assert snapshot_list(s.vol) == []


@pytest.mark.parametrize("command", ["delete", "diff-from", "diff-to"])
@pytest.mark.parametrize("name", ["a/b", "a b", "", "x" * 65, "snäp"],
                         ids=["slash", "space", "empty", "65-chars", "umlaut"])
def test_snapshot_delete_and_diff_reject_bad_name_before_opening(make_server, command, name):
    s = make_server(size="4M", start=False)
    snapshot_create(s.vol, "ok")
    args = {"delete": ["snapshot", "delete", s.vol, name],
            "diff-from": ["diff", s.vol, name, "ok"],
            "diff-to": ["diff", s.vol, "ok", name]}[command]
    msg = fails_cleanly(args, s.vol)
    assert "invalid snapshot name" in msg


def test_bad_names_are_refused_by_a_served_volume(server):
    snapshot_create(server.vol, "ok")
    exports = export_names(server)
    for name in BAD_NAMES:
        msg = fails_cleanly(["snapshot", "create", server.vol, f"--name={name}"])
        assert "invalid snapshot name" in msg, (name, msg)
        fails_cleanly(["snapshot", "delete", server.vol, name])
        fails_cleanly(["diff", server.vol, "ok", name])
    assert names(server.vol) == ["ok"]
    assert export_names(server) == exports


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_name_of_64_allowed_characters_is_accepted(make_server, served):
    s = make_server(size="4M", start=served)
    longest = ("Az09._-" * 10)[:64]
    odd = ["-", ".", "..", "_", "0", "-x", "a" * 63 + "."]
    for n in [longest, *odd]:
        snapshot_create(s.vol, n)
    assert names(s.vol) == [longest, *odd]
    if not served:
        s.start()
    assert export_names(s) == {"", *(f"@{n}" for n in [longest, *odd])}
    assert read_export(snap_uri(s, longest), BS) == bytes(BS)
    assert read_export(snap_uri(s, ".."), BS) == bytes(BS)
    r = run_blockrep("diff", s.vol, "--json", "--", longest, "-x", check=True)
    assert json.loads(r.stdout) == []
    # a name starting with '-' is reachable after `--`
    run_blockrep("snapshot", "delete", s.vol, "--", "-x", check=True)
    run_blockrep("snapshot", "delete", s.vol, longest, check=True)
    assert "-x" not in names(s.vol) and longest not in names(s.vol)


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_duplicate_snapshot_name_is_refused_and_the_first_is_kept(make_server, served):
    s = make_server(size="8M")
    h = s.connect()
    h.pwrite(b"\x01" * MiB, 0)
    snapshot_create(s.vol, "dup")
    h.pwrite(b"\x02" * MiB, 0)
    s.close_handles()
    before = snapshot_list(s.vol)
    if not served:
        s.stop()
        state = logical_state(s.vol)
    msg = fails_cleanly(["snapshot", "create", s.vol, "--name", "dup"])
    assert "dup" in msg and "exists" in msg, msg
    assert snapshot_list(s.vol) == before
    if not served:
        assert logical_state(s.vol) == state
        s.start()
    assert read_export(snap_uri(s, "dup"), MiB) == b"\x01" * MiB


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_delete_and_diff_of_a_missing_snapshot_fail(make_server, served):
    s = make_server(size="8M", start=served)
    snapshot_create(s.vol, "here")
    before = snapshot_list(s.vol)
    state = None if served else logical_state(s.vol)
    for args in (["snapshot", "delete", s.vol, "nothere"], ["diff", s.vol, "here", "nothere"],
                 ["diff", s.vol, "nothere", "here"], ["diff", s.vol, "nothere", "nothere"]):
        msg = fails_cleanly(args)
        assert "nothere" in msg and ("no snapshot" in msg or "not found" in msg), msg
    assert snapshot_list(s.vol) == before
    if not served:
        assert logical_state(s.vol) == state


def test_failed_offline_snapshot_command_leaves_every_file_untouched(make_server):
    s = make_server(size="8M", start=False)
    snapshot_create(s.vol, "here")
    fails_cleanly(["snapshot", "delete", s.vol, "nothere"], s.vol)


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_prune_rejects_negative_keep_and_keeps_everything(make_server, served):
    s = make_server(size="4M", start=served)
    for n in ("p1", "p2"):
        snapshot_create(s.vol, n)
    watch = [] if served else [s.vol]
    msg = fails_cleanly(["snapshot", "prune", s.vol, "--keep", "-1"], *watch)
    assert "--keep" in msg
    fails_cleanly(["snapshot", "prune", s.vol, "--keep", "many"], *watch)
    fails_cleanly(["snapshot", "prune", s.vol], *watch)
    assert names(s.vol) == ["p1", "p2"]
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "2", check=True)
    assert r.stdout == "" and names(s.vol) == ["p1", "p2"]
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "0", check=True)
    assert r.stdout.splitlines() == ["deleted p1", "deleted p2"]
    assert names(s.vol) == []


@pytest.mark.parametrize("args", [
    ["snapshot", "create", "{vol}"], ["snapshot", "create", "{vol}", "--name", "x"],
    ["snapshot", "list", "{vol}"], ["snapshot", "list", "{vol}", "--json"],
    ["snapshot", "delete", "{vol}", "x"], ["snapshot", "prune", "{vol}", "--keep", "1"],
    ["diff", "{vol}", "a", "b"], ["diff", "{vol}", "a", "b", "--json"]],
    ids=["create", "create-named", "list", "list-json", "delete", "prune", "diff", "diff-json"])
def test_snapshot_commands_on_a_missing_volume_fail(tmp_path, args):
    vol = tmp_path / "no-such-volume"
    msg = fails_cleanly([a.format(vol=vol) for a in args], tmp_path)
    assert "no volume" in msg or "does not exist" in msg or "not a blockrep volume" in msg, msg
    assert not vol.exists()


def test_snapshot_commands_on_a_directory_that_is_not_a_volume_fail(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "data.txt").write_text("hello\n")
    for args in (["snapshot", "create", d], ["snapshot", "list", d], ["diff", d, "a", "b"]):
        fails_cleanly(args, tmp_path)


# ---------------------------------------------------------------------------- freeze hooks

@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_failing_pre_command_refuses_the_snapshot_and_post_still_runs(make_server, tmp_path,
                                                                      served):
    s = make_server(size="4M", start=served)
    marker = tmp_path / "post-ran"
    watch = [] if served else [s.vol]
    msg = fails_cleanly(["snapshot", "create", s.vol, "--name", "never", "--pre", "false",
                         "--post", f"touch {shlex.quote(str(marker))}"], *watch)
    assert "pre command" in msg and "false" in msg, msg
    assert marker.exists(), "the post command must run even when a pre command fails"
    assert snapshot_list(s.vol) == []
    if served:
        assert export_names(s) == {""}
    # a pre command that is not even found is a failure too
    fails_cleanly(["snapshot", "create", s.vol, "--pre", "/nonexistent/freeze-tool"], *watch)
    assert snapshot_list(s.vol) == []


def test_pre_and_post_commands_run_around_the_snapshot(server, tmp_path):
    """The pre command writes 0x11 to the head, the post command 0x22: the snapshot must hold
    0x11 (taken after pre finished) and the head 0x22 (post ran after it was taken)."""
    a, b = tmp_path / "A", tmp_path / "B"
    head = shlex.quote(server.uri)
    pre = f"qemu-io -f raw -c 'write -P 0x11 0 4k' {head} >/dev/null && touch {shlex.quote(str(a))}"
    post = f"qemu-io -f raw -c 'write -P 0x22 0 4k' {head} >/dev/null && touch {shlex.quote(str(b))}"
    snapshot_create(server.vol, "hooked", "--pre", pre, "--post", post)
    assert a.exists() and b.exists()
    assert names(server.vol) == ["hooked"]
    qemu_io(snap_uri(server, "hooked"), "read -P 0x11 0 4k", readonly=True)
    qemu_io(server.uri, "read -P 0x22 0 4k", readonly=True)


def test_several_pre_and_post_commands_run_in_order(server, tmp_path):
    log = tmp_path / "log"
    q = shlex.quote(str(log))
    snapshot_create(server.vol, "ordered", "--pre", f"echo pre1 >> {q}", "--pre", f"echo pre2 >> {q}",
                    "--post", f"echo post1 >> {q}", "--post", f"echo post2 >> {q}")
    lines = log.read_text().split()
    assert lines[:2] == ["pre1", "pre2"] and sorted(lines[2:]) == ["post1", "post2"], lines


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_freeze_of_a_missing_mountpoint_refuses_the_snapshot(make_server, served):
    s = make_server(size="4M", start=served)
    watch = [] if served else [s.vol]
    msg = fails_cleanly(["snapshot", "create", s.vol, "--name", "frozen", "--freeze",
                         "/nonexistent/mnt"], *watch)
    assert "fsfreeze" in msg and "/nonexistent/mnt" in msg, msg
    assert snapshot_list(s.vol) == []


def sh(*cmd, check=True, timeout=300) -> subprocess.CompletedProcess:
    return run(*cmd, check=check, timeout=timeout)





def write_files(root: Path, rnd: random.Random, prefix: str, count: int) -> dict[str, str]:
    manifest = {}
    for i in range(count):
        sub = root / f"{prefix}{i % 4}"
        sub.mkdir(exist_ok=True)
        data = rnd.randbytes(rnd.choice([0, 1, 4095, 4096, 70000, 1 * MiB + 7, 3 * MiB]))
        p = sub / f"f{i:03d}.bin"
        p.write_bytes(data)
        manifest[str(p.relative_to(root))] = sha(data)
    return manifest


def check_files(root: Path, manifest: dict[str, str]) -> None:
    for rel, digest in manifest.items():
        p = root / rel
        assert p.exists(), f"{rel} is missing"
        assert sha(p.read_bytes()) == digest, f"{rel} differs"


@pytest.mark.slow
def test_freeze_snapshot_of_mounted_ext4_holds_the_files_and_fscks_clean(make_server, tmp_path):
    """`snapshot create --freeze MNT` on a mounted, busy ext4 (nothing synced by hand: only the
    freeze pushes the page cache to the volume). The @NAME export, attached read-only beside the
    still-mounted head (nbdfuse -r, losetup -r, mount -o ro,noload), fscks clean and holds
    exactly the files as they were."""
    rnd = random.Random(5)
    s = make_server(size="256M")
    mnt, smnt = tmp_path / "mnt", tmp_path / "smnt"
    with attached(s.uri, tmp_path / "head") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, mnt):
            old = write_files(mnt, rnd, "old", 24)
            snapshot_create(s.vol, "frozen", "--freeze", mnt)
            # the filesystem was thawed: it takes writes again
            new = write_files(mnt, rnd, "new", 12)
            deleted = list(old)[::3]
            for rel in deleted:
                (mnt / rel).unlink()
            changed = list(old)[1]
            (mnt / changed).write_bytes(b"changed after the snapshot")
            sh("sync")
            with attached(snap_uri(s, "frozen"), tmp_path / "snap", readonly=True) as sdev:
                fsck_clean(sdev)
                with mounted(sdev, smnt, "-o", "ro,noload"):
                    check_files(smnt, old)
                    assert not any((smnt / rel).exists() for rel in new)
            head_now = {k: v for k, v in old.items() if k not in deleted and k != changed}
            check_files(mnt, head_now | new)
        fsck_clean(dev)
    assert names(s.vol) == ["frozen"]


# ------------------------------------------------ R18: SIGKILL during snapshot create/delete

def _block(stamp: int, lba: int) -> bytes:
    return struct.pack("<QQ", stamp, lba) * (BS // 16)


class _Churn:
    """One round: a writer thread (sequential libnbd writes, each block stamped with the
    write's number) and a snapshot thread (`blockrep snapshot create/delete` in a loop) run
    until the server is SIGKILLed. Records, for every write and every command, when it started
    and when its reply arrived, so a snapshot's content can be checked against the writes."""

    def __init__(self, server, region_blocks: int, rnd: random.Random, first_stamp: int,
                 round_no: int):
        self.s = server
        self.nblocks = region_blocks
        self.rnd = rnd
        self.stamp = first_stamp
        self.round = round_no
        self.writes: list[list] = []  # [stamp, lba, n, t_start, t_end or None]
        self.creates: dict[str, list] = {}  # name -> [t0, t1, returncode]
        self.deletes: dict[str, list] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []

    def rewrite_region(self, h) -> None:
        """Every block of the region gets one known stamp, flushed: the round's base."""
        self.stamp += 1
        data = b"".join(_block(self.stamp, lba) for lba in range(self.nblocks))
        t = time.monotonic_ns()
        h.pwrite(data, 0)
        h.flush()
        self.writes.append([self.stamp, 0, self.nblocks, t, time.monotonic_ns()])

    def writer(self, h) -> None:
        try:
            while not self.stop.is_set():
                n = self.rnd.choice([1, 1, 2, 4, 16])
                lba = self.rnd.randrange(0, self.nblocks - n + 1)
                self.stamp += 1
                data = b"".join(_block(self.stamp, b) for b in range(lba, lba + n))
                rec = [self.stamp, lba, n, time.monotonic_ns(), None]
                self.writes.append(rec)
                h.pwrite(data, lba * BS)
                rec[4] = time.monotonic_ns()
        except nbd.Error:
            pass  # the server was killed
        except Exception as e:  # pragma: no cover - reported by the test
            self.errors.append(f"writer: {e!r}")

    def snapper(self, existing: list[str]) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            if existing and i % 3 == 0:
                name = existing.pop(self.rnd.randrange(len(existing)))
                rec = self.deletes[name] = [time.monotonic_ns(), None, None]
                r = run_blockrep("snapshot", "delete", self.s.vol, name)
            else:
                name = f"r{self.round}-{i}"
                rec = self.creates[name] = [time.monotonic_ns(), None, None]
                r = run_blockrep("snapshot", "create", self.s.vol, "--name", name)
                if r.returncode == 0:
                    existing.append(name)
            rec[1], rec[2] = time.monotonic_ns(), r.returncode
            if r.returncode != 0 and not self.stop.is_set():
                self.errors.append(f"{name}: {r.stderr.strip()} (server still up)")
            time.sleep(self.rnd.uniform(0, 0.05))

    def check_snapshot(self, name: str, content: bytes, kill_ns: int) -> None:
        """A snapshot whose create returned success before the kill was taken by the running
        server, which applies requests one at a time: it must equal the region after some
        prefix of the round's writes, one that includes every write whose reply arrived before
        the create started and none that started after the create returned.

        A create that raced the kill may have run on the volume opened directly after the
        crash, i.e. on the recovered head. The contract (RELIABILITY.md) then only promises:
        every write durable before the crash is there (a snapshot create flushes, as did the
        round's base), and every other write is wholly present or wholly absent."""
        t0, t1, rc = self.creates[name]
        per_block: list[list[int]] = [[] for _ in range(self.nblocks)]
        for stamp, lba, n, _ts, _te in self.writes:
            for b in range(lba, lba + n):
                per_block[b].append(stamp)
        by_stamp = {w[0]: w for w in self.writes}
        base = self.writes[0][0]

        def ms(t):  # ms from the create's start
            return None if t is None else round((t - t0) / 1e6, 3)

        when = f"create ran {ms(t0)}..{ms(t1)} ms, rc {rc}, kill at {ms(kill_ns)} ms"
        stamps = []
        for b in range(self.nblocks):
            blk = content[b * BS:(b + 1) * BS]
            stamp, lba = struct.unpack_from("<QQ", blk)
            assert blk == _block(stamp, lba) and lba == b, \
                f"snapshot {name}: block {b} holds garbage or a torn block ({when})"
            if stamp < base:
                raise AssertionError(f"snapshot {name}: block {b} holds write {stamp} from before "
                                     f"the round's flushed base write {base}: a flushed write was lost ({when})")
            assert stamp in per_block[b], f"snapshot {name}: block {b} holds write {stamp}, which never touched it"
            stamps.append(stamp)

        if rc == 0 and t1 < kill_ns:
            lo = max(stamps)
            nexts = [next((x for x in per_block[b] if x > stamps[b]), 1 << 62) for b in range(self.nblocks)]
            hi = min(nexts) - 1
            if lo > hi:
                b_new, b_old = stamps.index(lo), nexts.index(hi + 1)
                raise AssertionError(
                    f"snapshot {name} is not a point in time: block {b_new} holds write {lo} "
                    f"{[ms(t) for t in by_stamp[lo][3:]]} but block {b_old} holds {stamps[b_old]} and "
                    f"misses the older write {hi + 1} {[ms(t) for t in by_stamp[hi + 1][3:]]} ({when})")
            must_have = max((w[0] for w in self.writes if w[4] is not None and w[4] < t0), default=0)
            may_have = max((w[0] for w in self.writes if w[3] < t1), default=0)
            assert max(lo, must_have) <= min(hi, may_have), (
                f"snapshot {name} holds the writes up to some point in [{lo}, {hi}], expected one in "
                f"[{must_have}, {may_have}] ({when})")
            return

        # durable before the kill: writes whose reply arrived before a create that succeeded began
        durable_t = max((c[0] for c in self.creates.values() if c[2] == 0 and c[1] < kill_ns),
                        default=0)
        for b in range(self.nblocks):
            must = max((x for x in per_block[b] if by_stamp[x][4] is not None and by_stamp[x][4] < durable_t),
                       default=base)
            assert stamps[b] >= must, (f"snapshot {name}: block {b} holds write {stamps[b]} but write "
                                       f"{must} to it was durable before the kill ({when})")
        for b in range(self.nblocks):  # request atomicity: a write seen anywhere is seen everywhere
            _, lba, n, _, _ = by_stamp[stamps[b]]
            for other in range(lba, lba + n):
                assert stamps[other] >= stamps[b], (
                    f"snapshot {name}: write {stamps[b]} is in block {b} but not in block {other} "
                    f"(holds {stamps[other]}): torn request ({when})")


def _snapshot_churn_under_sigkill(make_server, rounds: int, seed: int) -> None:
    rnd = random.Random(seed)
    s = make_server(size="16M", create_args=["--segment-size", "1M"])
    region = 512  # blocks: 2 MiB
    stamp = 0
    alive: list[str] = []          # names the snapshot thread believes exist
    digests: dict[str, str] = {}   # name -> sha256 of its region, fixed once verified
    gone: set[str] = set()         # deleted with success
    for rnd_no in range(rounds):
        churn = _Churn(s, region, rnd, stamp, rnd_no)
        h = connect(s.uri)
        churn.rewrite_region(h)
        tw = threading.Thread(target=churn.writer, args=(h,))
        ts = threading.Thread(target=churn.snapper, args=(alive,))
        tw.start()
        ts.start()
        time.sleep(rnd.uniform(0.3, 1.2))
        churn.stop.set()  # no new commands after the kill; the ones in flight race it
        kill_ns = time.monotonic_ns()
        s.kill()
        tw.join(30)
        ts.join(60)
        close(h)
        assert not tw.is_alive() and not ts.is_alive()
        assert not churn.errors, churn.errors
        stamp = churn.stamp
        s.start()

        listed = snapshot_list(s.vol)
        present = [x["name"] for x in listed]
        assert export_names(s) == {""} | {f"@{n}" for n in present}, "list and exports disagree"
        rec = info(s.vol)["recovery"]
        assert rec["corrupt_records"] == 0 and rec["skipped_bytes"] == 0, rec
        for name, (_t0, t1, rc) in churn.creates.items():
            if rc == 0 and t1 < kill_ns and name not in churn.deletes:
                assert name in present, f"snapshot {name} was created (exit 0) but is gone"
        for name, (_t0, t1, rc) in churn.deletes.items():
            if rc == 0 and t1 < kill_ns:
                gone.add(name)
        assert not gone & set(present), f"deleted snapshots came back: {gone & set(present)}"
        for name in present:
            content = read_export(snap_uri(s, name), region * BS)
            if name not in digests:
                assert name in churn.creates, f"unknown snapshot {name}"
                churn.check_snapshot(name, content, kill_ns)
                digests[name] = sha(content)
            else:
                assert sha(content) == digests[name], f"snapshot {name} changed (R12)"
            rest = read_export(snap_uri(s, name), 16 * MiB - region * BS, region * BS)
            assert rest == bytes(len(rest)), f"snapshot {name} has data outside the region"
        alive[:] = present  # in-flight commands resolved one way or the other
        generations = [x["generation"] for x in listed]
        assert generations == sorted(generations)
    s.stop()
    assert run_blockrep("check", s.vol).returncode == 0


def test_sigkill_during_snapshot_create_and_delete_leaves_whole_snapshots(make_server):
    _snapshot_churn_under_sigkill(make_server, rounds=4, seed=18)


@pytest.mark.slow
def test_sigkill_during_snapshot_create_and_delete_many_rounds(make_server):
    seed = int(os.environ.get("BLOCKREP_R18_SEED", "1818"))
    _snapshot_churn_under_sigkill(make_server, rounds=int(os.environ.get("BLOCKREP_R18_ROUNDS", "30")),
                                  seed=seed)


# ------------------------------------------------------------------------------------- space

@pytest.mark.lsfs_only("measures the lsfs collector's reclaimed space (used vs live bytes of the log)")
def test_deleting_a_snapshot_lets_the_collector_reclaim_its_space(make_server):
    s = make_server(size="128M")
    h = s.connect()
    rnd = random.Random(7)

    def fill():
        buf = rnd.randbytes(4 * MiB)
        for off in range(0, 64 * MiB, 4 * MiB):
            h.pwrite(buf, off)
        h.flush()

    fill()
    snapshot_create(s.vol, "big")
    fill()
    fill()
    # the collector reclaims the dead middle generation, and must stop at what the snapshot pins
    i = _wait_for_collector(s.vol, 1.2, timeout=20)
    assert i["used_bytes"] <= 1.2 * i["live_bytes"], f"the collector did not run: {i}"
    assert i["used_bytes"] > 2 * 64 * MiB, i
    assert i["live_bytes"] == 128 * MiB, i
    assert i["pinned_bytes"] == 64 * MiB, i

    run_blockrep("snapshot", "delete", s.vol, "big", check=True)
    i = _wait_for_collector(s.vol, 1.5, timeout=20)
    assert i["used_bytes"] <= 1.5 * 64 * MiB, i
    assert i["live_bytes"] == 64 * MiB and i["pinned_bytes"] == 0, i


# -------------------------------------------------------------------- M11: third-party backup

def test_backup_flow_snapshot_copy_delete(server, tmp_path):
    """create snapshot -> nbdcopy @NAME to a file (while the head keeps changing) -> delete
    snapshot: the file holds exactly what the head held when the snapshot was taken."""
    h = server.connect()
    rnd = random.Random(11)
    for _ in range(40):
        off = rnd.randrange(0, 64 * MiB - MiB)
        h.pwrite(rnd.randbytes(rnd.randrange(1, MiB)), off)
    h.trim(2 * MiB, 10 * MiB)
    at_snapshot = sha(read_export(server.uri))
    name = snapshot_create(server.vol)  # a default name, as a backup script would
    writer_stop = threading.Event()

    def keep_writing():
        wr = random.Random(12)
        w = connect(server.uri)
        try:
            while not writer_stop.is_set():
                w.pwrite(wr.randbytes(65536), wr.randrange(0, 64 * MiB - 65536))
        finally:
            close(w)

    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        backup = tmp_path / "backup.img"
        run("nbdcopy", snap_uri(server, name), backup)
    finally:
        writer_stop.set()
        t.join()
    run_blockrep("snapshot", "delete", server.vol, name, check=True)
    assert names(server.vol) == []
    assert backup.stat().st_size == 64 * MiB
    assert sha(backup.read_bytes()) == at_snapshot
    assert sha(read_export(server.uri)) != at_snapshot
