"""Regression tests for the engine defects of issue 8: paths the crash and model tests never
reached (a checkpoint beside the collector, unchecked system calls, a snapshot whose sync fails,
planted files), each driven through the engine's fault layer (engine/faults.py) or real files."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import iorecord
import pytest

from engine import faults, volume
from engine.errors import BlockrepError, CorruptionError, DiskError, NoSpace
from engine.volume import Volume

pytestmark = pytest.mark.lsfs_only(
    "plants, truncates and fails the lsfs log's own files and calls; the image backend's are "
    "tests/test_image_faults.py"
)

MiB = 1 << 20
BS = 4096


@pytest.fixture(autouse=True)
def _no_faults_left():
    yield
    faults.off()


def _vol(tmp_path, size=16 * MiB, **kw) -> Volume:
    p = tmp_path / "vol"
    volume.create(p, size, segment_size=MiB, **kw)
    return Volume.open(p)


def _check(v: Volume, model: bytearray, what: str = "") -> None:
    got = v.read(len(model), 0)
    if got != bytes(model):
        bad = next(i for i in range(0, len(model), BS) if got[i:i + BS] != model[i:i + BS])
        raise AssertionError(f"{what}: block {bad // BS} differs from the model")


def test_a_move_by_the_collector_waits_for_the_checkpoint_that_serialises_its_leaf(tmp_path):
    """The collector edits shared leaves in place; a checkpoint serialising them without the lock
    recorded a move whose RELOC record was still only in the window, and a crash (the window
    lost) then left map entries past the end of a file and the moved-from segment deleted as
    unreferenced. Here the checkpoint is paused (through the I/O recorder) just before it
    serialises, a collection runs meanwhile, then the process crashes: every block reads back."""
    rnd = random.Random(8)
    size = 4 * MiB
    v = _vol(tmp_path, size=size)
    model = bytearray(size)
    for _ in range(3):  # overwrite everything: sealed segments full of dead blocks
        for off in range(0, size, 256 * 1024):
            data = rnd.randbytes(256 * 1024)
            v.write(data, off)
            model[off:off + len(data)] = data
    v.checkpoint()
    victim = v._n.lib.vol_gc_pick(v._v, 1.0)
    assert victim > 0
    paused, moved = threading.Event(), threading.Event()
    ckpt = threading.Thread(target=v.checkpoint)

    def pause_before_serialising(op, *_):
        if op == iorecord.FSYNCDIR and threading.current_thread() is ckpt and not paused.is_set():
            paused.set()
            moved.wait(2)  # with the fix the collector cannot move until this checkpoint ends

    iorecord.start(pause_before_serialising)
    try:
        ckpt.start()
        assert paused.wait(10)
        gc = threading.Thread(target=lambda: v._n.lib.vol_gc_segment(v._v, victim) or moved.set())
        gc.start()
        ckpt.join()
        gc.join()
    finally:
        iorecord.stop()
    assert moved.is_set()
    v.abandon()  # a crash: the window, with the RELOC records in it, is gone
    with Volume.open(v.path) as v2:
        _check(v2, model, "after the crash")


def test_a_rotation_whose_ftruncate_fails_fails_the_write_and_loses_nothing(tmp_path):
    v = _vol(tmp_path)
    model = bytearray(v.size)
    faults.inject(faults.OPS["ftruncate"], 1, errno.EIO)
    failed = 0
    for off in range(0, 4 * MiB, 256 * 1024):  # crosses a 1 MiB segment boundary: a rotation
        data = os.urandom(256 * 1024)
        try:
            v.write(data, off)
            model[off:off + len(data)] = data
        except DiskError as e:
            assert "truncating segment" in str(e)
            failed += 1
            model[off:off + len(data)] = v.read(len(data), off)  # whatever it holds now, wholly
            assert bytes(model[off:off + len(data)]) in (bytes(len(data)), data)
    assert failed == 1 and faults.failures() == 1
    faults.off()
    v.flush()
    v.close()
    with Volume.open(v.path) as v2:
        _check(v2, model)


def test_a_planted_symlink_segment_is_refused_and_its_target_untouched(tmp_path):
    v = _vol(tmp_path)
    v.write(b"x" * BS, 0)
    v.close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    segs = sorted((v.path / "segments").iterdir())
    nxt = int(segs[-1].name[:16], 16) + 1
    (v.path / "segments" / f"{nxt:016x}.seg").symlink_to(victim)
    with pytest.raises(BlockrepError, match="symbolic link"):
        Volume.open(v.path)
    assert victim.read_bytes() == b"precious" * 1000


def test_a_segment_id_beyond_28_bits_is_refused(tmp_path):
    v = _vol(tmp_path)
    v.close()
    (v.path / "segments" / f"{1 << 28:016x}.seg").write_bytes(b"\0" * 64)
    with pytest.raises(CorruptionError, match="id out of range"):
        Volume.open(v.path)


@pytest.mark.parametrize("nth", [1, 2])
def test_a_snapshot_whose_write_out_fails_is_not_made_and_stays_unmade(tmp_path, nth):
    """ENOSPC while flushing earlier writes (1st pwrite) or writing the snapshot record itself
    (2nd: the record is taken back from the window): nothing changed, in memory or on disk."""
    v = _vol(tmp_path)
    v.write(b"a" * BS, 0)
    v.flush()
    faults.inject(faults.OPS["pwrite"], nth, errno.ENOSPC)
    with pytest.raises(NoSpace, match="not made" if nth == 2 else "No space"):
        v.snapshot_create("s1")
    assert v.snapshots() == []
    faults.off()
    v.write(b"b" * BS, BS)
    s = v.snapshot_create("s2")  # the id and generation the failed one would have had
    v.close()
    with Volume.open(v.path) as v2:
        assert [x["name"] for x in v2.snapshots()] == ["s2"]
        assert v2.snapshots()[0]["id"] == s["id"]


def test_a_snapshot_whose_fdatasync_fails_is_not_listed_and_nothing_is_durable_until_reopen(tmp_path):
    """EIO from fdatasync after the record reached the file: it cannot be taken back, so a
    deletion record follows it in memory. What reached the disk is unknown after a failed
    fdatasync, so the failure is sticky: every later flush fails until the volume is reopened,
    and the reopened volume holds what was durable before (the snapshot may or may not be there:
    the error said so)."""
    v = _vol(tmp_path)
    v.write(b"a" * BS, 0)
    v.flush()
    faults.inject(faults.OPS["fdatasync"], 2, errno.EIO)  # 1st: the flush of the buffered marker
    with pytest.raises(DiskError, match="after a crash the snapshot may be there"):
        v.snapshot_create("s1")
    assert v.snapshots() == []
    faults.off()
    v.write(b"b" * BS, BS)
    with pytest.raises(DiskError, match="until the volume is reopened"):
        v.flush()
    with pytest.raises(DiskError, match="until the volume is reopened"):
        v.snapshot_create("s2")
    with pytest.raises(DiskError, match="until the volume is reopened"):
        v.checkpoint()
    assert v.read(2 * BS, 0) == b"a" * BS + b"b" * BS  # reads go on
    v.abandon()
    with Volume.open(v.path) as v2:
        assert v2.read(BS, 0) == b"a" * BS
        names = [s["name"] for s in v2.snapshots()]
        assert names in ([], ["s1"])
        if names:
            assert v2.snapshot_read(v2.snapshot("s1")["id"], BS, 0) == b"a" * BS
        v2.write(b"c" * BS, 0)
        v2.flush()  # a reopened volume makes things durable again


def test_a_snapshot_delete_whose_write_out_fails_keeps_the_snapshot(tmp_path):
    v = _vol(tmp_path)
    v.write(b"a" * BS, 0)
    v.snapshot_create("keep")
    faults.inject(faults.OPS["pwrite"], 2, errno.ENOSPC)  # 1st: the create's buffered marker
    with pytest.raises(NoSpace, match="not deleted"):
        v.snapshot_delete("keep")
    assert [s["name"] for s in v.snapshots()] == ["keep"]
    faults.off()
    v.write(b"b" * BS, 0)
    assert v.snapshot_read(v.snapshot("keep")["id"], BS, 0) == b"a" * BS
    v.close()
    with Volume.open(v.path) as v2:
        assert [s["name"] for s in v2.snapshots()] == ["keep"]


def test_eio_from_the_disk_is_a_disk_error_and_a_bad_checksum_is_corruption(tmp_path):
    v = _vol(tmp_path)
    v.write(b"a" * BS, 0)
    faults.inject(faults.OPS["pwrite"], 1, errno.EIO)
    with pytest.raises(DiskError) as ei:
        v.flush()
    assert not isinstance(ei.value, CorruptionError) and ei.value.errno == errno.EIO
    faults.off()
    v.flush()
    v.close()
    seg = sorted((v.path / "segments").iterdir())[0]
    data = bytearray(seg.read_bytes())
    i = data.find(b"a" * BS)
    data[i] ^= 1
    seg.write_bytes(bytes(data))
    with Volume.open(v.path) as v2:
        with pytest.raises(CorruptionError) as ei:
            v2.read(BS, 0)
        assert ei.value.errno == errno.EIO  # what an NBD client is told


def test_a_checkpoint_that_cannot_sync_commits_nothing(tmp_path):
    v = _vol(tmp_path)
    v.write(b"a" * BS, 0)
    v.checkpoint()
    before = (v.path / "checkpoint").read_bytes()
    v.write(b"b" * BS, BS)
    faults.inject(faults.OPS["fdatasync"], 1, errno.EIO)
    with pytest.raises(DiskError, match="checkpoint"):
        v.checkpoint()
    assert (v.path / "checkpoint").read_bytes() == before
    assert not (v.path / "checkpoint.tmp").exists()
    faults.off()
    with pytest.raises(DiskError, match="until the volume is reopened"):  # it shares the error
        v.flush()
    v.abandon()
    with Volume.open(v.path) as v2:
        assert v2.read(BS, 0) == b"a" * BS
        assert v2.read(BS, BS) in (b"b" * BS, bytes(BS))  # never flushed: either


def test_a_header_page_lost_in_a_power_cut_ends_the_log_there(tmp_path):
    """A segment never synced whose first page did not reach the disk (write-back in any
    order), with records of it after: nothing from there was ever synced, so recovery cuts the
    log there and the volume opens with its flushed data (it used to refuse to open)."""
    import shutil
    v = Volume.open(_mk(tmp_path), wbuf_size=64 << 10)
    flushed = os.urandom(1000 << 10)
    v.write(flushed, 0, fua=True)  # durable, fills segment 1
    for i in range(160):  # not flushed: rotates into segment 2 and 3
        v.write(os.urandom(8192), (2 << 20) + i * 8192)
    crash = tmp_path / "crash"
    shutil.copytree(v.path, crash, ignore=shutil.ignore_patterns("lock"))
    v.abandon()
    second = sorted((crash / "segments").iterdir())[1]
    with open(second, "r+b") as f:
        f.write(bytes(4096))
    with Volume.open(crash) as c:
        assert c.read(len(flushed), 0) == flushed
        assert c.recovery["torn_bytes_dropped"] > 0


def _mk(tmp_path):
    p = tmp_path / "hdr"
    volume.create(p, 8 * MiB, segment_size=MiB)
    return p


def test_the_io_fault_spec_is_checked():
    assert faults.parse("pwrite+fdatasync:3:ENOSPC:persistent") == (3, 3, errno.ENOSPC, True)
    for bad in ("nope:1", "pwrite", "pwrite:x", "pwrite:1:ENOTANERRNO", "pwrite:-1"):
        with pytest.raises(BlockrepError):
            faults.parse(bad)


def test_a_checkpoint_that_cannot_get_a_descriptor_to_sync_a_segment_fails(tmp_path):
    """A failed dup() (EMFILE) used to skip that segment's fdatasync while the checkpoint still
    committed. In a child process with exactly one free descriptor, two segments need a sync:
    the checkpoint must fail, and the old checkpoint stays."""
    import subprocess
    import sys
    import textwrap
    p = tmp_path / "vol"
    volume.create(p, 8 * MiB, segment_size=MiB)
    script = textwrap.dedent(f"""
        import os, resource, sys
        sys.path.insert(0, {str(Path(volume.__file__).resolve().parent.parent.parent)!r})
        from engine.volume import Volume
        from engine.errors import BlockrepError
        v = Volume.open({str(p)!r})
        v.checkpoint()
        before = open({str(p / 'checkpoint')!r}, 'rb').read()
        for off in range(0, 3 << 20, 256 << 10):   # 3 MiB, no flush: segments 1..3 need a sync
            v.write(os.urandom(256 << 10), off)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        held = []
        try:
            while True:
                held.append(os.open('/dev/null', os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop())          # one free descriptor
        try:
            v.checkpoint()
            print('committed')
        except BlockrepError as e:
            print('refused', e)
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print('same' if open({str(p / 'checkpoint')!r}, 'rb').read() == before else 'changed')
        v.close()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[0].startswith("refused") and "Too many open files" in out[0], r.stdout
    assert out[1] == "same", r.stdout
