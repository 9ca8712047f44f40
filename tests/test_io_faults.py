"""RELIABILITY R7: fail the Nth storage operation (pwrite, fdatasync, directory fsync, openat,
renameat, unlinkat, ftruncate) with EIO, then ENOSPC, N = 1, 2, … until the workload runs to its
end without meeting the fault; and once with every pwrite and sync failing from the Nth on (a
disk that dies). For every injection point:
- a request that met the fault raises (never a silent success), and what it changed is all or
  nothing: a read right after shows the range wholly old or wholly new;
- the volume keeps serving: once the fault is gone, a flush succeeds, except after a failed
  fdatasync or directory fsync: then what reached the disk is unknown (Linux reports a write-back
  error once and may drop the pages: "fsyncgate"), so every flush fails until the volume is
  reopened, and the reopened volume must hold everything made durable before the failure;
- a copy of the files at that moment (a process crash) opens and reads without EIO, and every
  block not written since the last successful flush holds its flushed data (no checkpoint ever
  references data that was not synced);
- after flush, close and reopen, the volume and every snapshot read exactly the model.
The same through a real nbdkit: tests/test_shutdown.py (io_fault=)."""

from __future__ import annotations

import errno
import random
import shutil

import pytest

from engine import faults, volume
from engine.errors import BlockrepError
from engine.volume import Volume

pytestmark = pytest.mark.lsfs_only(
    "R7 counts the storage calls of an lsfs volume to fail the Nth; the image mover's failures "
    "(not request failures: the log keeps every block) are tests/test_image_faults.py"
)

MiB = 1 << 20
BS = 4096
SIZE = 2 * MiB


@pytest.fixture(autouse=True)
def _no_faults_left():
    yield
    faults.off()


def _ops(seed: int) -> list[tuple]:
    rnd = random.Random(seed)
    ops: list[tuple] = []
    for i in range(36):
        r = rnd.random()
        off = rnd.randrange(0, SIZE - 1)
        n = min(rnd.choice([BS, 3 * BS + 17, 64 * 1024, 300 * 1024]), SIZE - off)
        if r < 0.45:
            ops.append(("write", off, rnd.randbytes(n), rnd.random() < 0.2))
        elif r < 0.55:
            ops.append(("zero", off, n))
        elif r < 0.6:
            ops.append(("trim", off // BS * BS, n // BS * BS or BS))
        elif r < 0.72:
            ops.append(("flush",))
        elif r < 0.8:
            ops.append(("snap", f"s{i}"))
        elif r < 0.86:
            ops.append(("unsnap",))
        elif r < 0.93:
            ops.append(("checkpoint",))
        else:
            ops.append(("collect",))
    return ops


class Run:
    """One workload against one volume, with its model."""

    def __init__(self, path):
        self.v = Volume.open(path)
        self.model = bytearray(SIZE)
        self.durable = bytearray(SIZE)
        self.dirty: set[int] = set()  # blocks written since the last successful flush
        self.snaps: dict[str, bytes] = {}
        self.durable_snaps: dict[str, bytes] = {}
        self.ever: dict[str, bytes] = {}  # every snapshot ever made, with its content
        self.uncertain: set[str] = set()  # snapshots whose create or delete raised
        self.errors = 0

    def _range(self, off, n):
        return range(off // BS, (off + n - 1) // BS + 1)

    def _settle(self, off, n, new: bytes):
        """After a failed change of [off, off+n): it is wholly old or wholly new; learn which."""
        got = self.v.read(n, off)
        old = bytes(self.model[off:off + n])
        assert got in (old, new), f"a failed change at {off} left a mix of old and new data"
        self.model[off:off + n] = got
        self.dirty.update(self._range(off, n))

    def step(self, op) -> None:
        v, kind = self.v, op[0]
        try:
            if kind == "write":
                _, off, data, fua = op
                self.dirty.update(self._range(off, len(data)))
                v.write(data, off, fua=fua)
                self.model[off:off + len(data)] = data
            elif kind in ("zero", "trim"):
                _, off, n = op
                self.dirty.update(self._range(off, n))
                (v.zero if kind == "zero" else v.trim)(n, off)
                self.model[off:off + n] = v.read(n, off) if kind == "trim" else bytes(n)
                if kind == "trim":  # whole blocks read as zeroes after a trim
                    assert self.model[off:off + n] == bytes(n)
            elif kind == "flush":
                v.flush()
                self._durable()
            elif kind == "snap":
                self.ever[op[1]] = bytes(self.model)
                v.snapshot_create(op[1])
                self.snaps[op[1]] = bytes(self.model)
                self._durable()
            elif kind == "unsnap":
                if self.snaps:
                    name = sorted(self.snaps)[0]
                    self._deleting = name
                    v.snapshot_delete(name)
                    del self.snaps[name]
                    self._durable()
            elif kind == "checkpoint":
                v.checkpoint()
            elif kind == "collect":
                v.collect(ratio=1.0, max_segments=4)
        except BlockrepError:
            self.errors += 1
            if kind == "write":
                self._settle(op[1], len(op[2]), op[2])
            elif kind == "zero":
                self._settle(op[1], op[2], bytes(op[2]))
            elif kind == "trim":
                self._settle(op[1], op[2], bytes(op[2]))
            elif kind in ("snap", "unsnap"):  # made or not, deleted or not: memory says which
                self.uncertain.add(op[1] if kind == "snap" else self._deleting)
                have = {s["name"] for s in v.snapshots()}
                if kind == "snap" and op[1] in have:
                    self.snaps[op[1]] = bytes(self.model)
                for name in list(self.snaps):
                    if name not in have:
                        del self.snaps[name]

    def _durable(self):
        self.durable[:] = self.model
        self.dirty.clear()
        self.durable_snaps = dict(self.snaps)


def _check_crash_copy(run: Run, src, dst) -> None:
    """The files as a process kill would leave them: opens, reads, flushed blocks intact."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    with Volume.open(dst) as c:
        got = c.read(SIZE, 0)  # a CorruptionError here means a checkpoint referenced unsynced data
    for b in range(SIZE // BS):
        if b not in run.dirty:
            assert got[b * BS:(b + 1) * BS] == run.durable[b * BS:(b + 1) * BS], f"flushed block {b} lost"


def _check_reopened_after_a_failed_sync(run: Run, p) -> None:
    """Everything made durable before the failed sync is there; nothing else is invented."""
    with Volume.open(p) as v:
        got = v.read(SIZE, 0)
        for b in range(SIZE // BS):
            if b not in run.dirty:
                assert got[b * BS:(b + 1) * BS] == run.durable[b * BS:(b + 1) * BS], f"durable block {b} lost"
        have = {s["name"]: s["id"] for s in v.snapshots()}
        for name in run.durable_snaps:
            assert name in have or name in run.uncertain, f"durable snapshot {name} lost"
        for name, sid in have.items():
            assert name in run.ever, f"snapshot {name} was never made"
            assert v.snapshot_read(sid, SIZE, 0) == run.ever[name], f"snapshot {name} changed"


def _one(tmp_path, ops, mask, nth, err, persistent, compress="none") -> tuple[bool, int]:
    """Run the workload with the fault armed; returns (the fault was met, errors raised)."""
    p = tmp_path / "vol"
    shutil.rmtree(p, ignore_errors=True)
    volume.create(p, SIZE, segment_size=MiB, compress=compress)
    run = Run(p)
    faults.inject(mask, nth, err, persistent)
    for op in ops:
        run.step(op)
    met = faults.failures() > 0
    faults.off()
    if met:
        assert run.errors > 0, "a storage operation failed but no request reported an error"
        _check_crash_copy(run, p, tmp_path / "crash")
    try:
        run.v.flush()  # service resumes once the disk does
    except BlockrepError as e:  # after a failed sync: nothing is durable until the volume is reopened
        assert met and mask & (faults.OPS["fdatasync"] | faults.OPS["fsyncdir"]), e
        assert "until the volume is reopened" in str(e), e
        run.v.abandon()
        _check_reopened_after_a_failed_sync(run, p)
        return met, run.errors
    run._durable()
    snaps = dict(run.snaps)
    run.v.close()
    with Volume.open(p) as v:
        assert v.read(SIZE, 0) == bytes(run.model), "the volume differs from the model after reopen"
        assert {s["name"] for s in v.snapshots()} == set(snaps)
        for name, data in snaps.items():
            assert v.snapshot_read(v.snapshot(name)["id"], SIZE, 0) == data, f"snapshot {name} changed"
    return met, run.errors


@pytest.mark.parametrize("op", ["pwrite", "fdatasync", "fsyncdir", "openat", "renameat", "unlinkat", "ftruncate"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_the_nth_storage_operation_fails_and_nothing_is_lost(tmp_path, op, err):
    ops = _ops(7)
    points = 0
    for nth in range(1, 500):
        met, _ = _one(tmp_path, ops, faults.OPS[op], nth, err, False)
        if not met:
            break
        points += 1
    else:
        pytest.fail("the workload never ran past the fault")
    assert points >= 1 or op in ("unlinkat", "renameat"), f"the workload makes no {op} call"
    print(f"R7 {op} {errno.errorcode[err]}: {points} injection points, 0 false acks")


@pytest.mark.parametrize("op", ["pwrite", "fdatasync"])
def test_the_nth_storage_operation_fails_on_a_compressed_volume(tmp_path, op):
    """zstd stores 16 blocks per record, so most requests are several records: a fault between
    two of them must not leave the request half applied."""
    ops = _ops(9)
    points = 0
    for nth in range(1, 500):
        met, _ = _one(tmp_path, ops, faults.OPS[op], nth, errno.ENOSPC, False, compress="zstd")
        if not met:
            break
        points += 1
    print(f"R7 zstd {op} ENOSPC: {points} injection points, 0 false acks")
    assert points >= 1


@pytest.mark.slow
def test_a_dying_disk_fails_every_request_and_recovers_when_it_comes_back(tmp_path):
    """From the Nth pwrite or sync on, every one fails (persistent), for every N."""
    ops = _ops(11)
    points = 0
    for nth in range(1, 500):
        met, errors = _one(tmp_path, ops, faults.OPS["pwrite"] | faults.OPS["fdatasync"], nth, errno.EIO, True)
        if not met:
            break
        points += 1
    print(f"R7 persistent EIO: {points} injection points")
    assert points > 10
