"""R8: real ENOSPC. The volume lives on a 64 MiB tmpfs; a ballast file on the same filesystem is
the space we take away and give back.

Each cycle: write through libnbd until the filesystem is full and writes fail with ENOSPC (the
errno the client sees, not EIO); every read keeps working and returns what was written; delete
the ballast; writes and flushes succeed again. At least 5 cycles, then a clean restart and a final
check of every byte. A write that failed may have left its blocks old or new (NBD leaves them
unspecified), but only those two; the block is then pinned to what was read and must not change
afterwards without a new write.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess

import nbd
import pytest

pytestmark = pytest.mark.lsfs_only(
    "R8 puts VOL on a small filesystem; an image volume's change log lives elsewhere, and its "
    "full-image case is tests/test_image_faults.py"
)

MiB = 1 << 20
BS = 4096
FS_SIZE = 64 * MiB
VOL_SIZE = 128 * MiB  # thin: larger than the filesystem under it
REGION = 16 * MiB  # where the workload writes: live data stays well below the filesystem size


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", mnt],
                   check=True)
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", mnt], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)


def take_space(path, leave: int) -> int:
    """Grow the ballast file at path until the filesystem is full, then give `leave` bytes back,
    so that the volume's own writes use up the rest. Returns the ballast size."""
    chunk = os.urandom(256 * 1024)
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        size = max(0, (f.tell() - leave) // BS * BS)
        f.truncate(size)
    return size


class Model:
    def __init__(self, size):
        self.shadow = bytearray(size)
        self.uncertain: dict[int, list[bytes]] = {}  # lba -> other contents it may have

    def wrote(self, off, data):
        self.shadow[off:off + len(data)] = data
        for b in range(off // BS, (off + len(data)) // BS):
            self.uncertain.pop(b, None)

    def failed(self, off, data):
        for i, b in enumerate(range(off // BS, (off + len(data)) // BS)):
            self.uncertain.setdefault(b, []).append(bytes(data[i * BS:(i + 1) * BS]))

    def verify(self, h, where):
        size = len(self.shadow)
        for off in range(0, size, 8 * MiB):
            got = h.pread(8 * MiB, off)
            if got == self.shadow[off:off + 8 * MiB]:
                continue
            for b in range(off // BS, (off + 8 * MiB) // BS):
                g = bytes(got[(b * BS - off):(b * BS - off) + BS])
                want = bytes(self.shadow[b * BS:(b + 1) * BS])
                if g == want:
                    continue
                if g in self.uncertain.get(b, ()):
                    self.shadow[b * BS:(b + 1) * BS] = g  # pinned from now on
                    continue
                raise AssertionError(f"{where}: block {b} holds data that is neither what was "
                                     f"written nor what a failed write tried to write "
                                     f"(got {g[:8].hex()}…, expected {want[:8].hex()}…)")
        self.uncertain.clear()


def test_enospc_fill_free_cycles(small_fs, make_server):
    seed = int(os.environ.get("BLOCKREP_ENOSPC_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    s = make_server(base=small_fs, size=VOL_SIZE, create_args=["--segment-size", "1M"])
    model = Model(VOL_SIZE)
    ballast = small_fs / "ballast"
    h = s.connect()
    cycles = 6
    for cycle in range(cycles):
        ctx = f"seed={seed} cycle {cycle}"
        got = take_space(ballast, leave=rnd.randrange(0, 2 * MiB))
        assert got >= 8 * MiB, f"{ctx}: only {got} bytes of ballast fit"
        # 1. fill until ENOSPC
        enospc = 0
        other_errors = []
        for _ in range(2000):
            n = rnd.choice([BS, 16 * BS, 64 * BS, 256 * BS])
            off = rnd.randrange(0, REGION // BS - n // BS + 1) * BS
            data = rnd.randbytes(n)
            try:
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if rnd.random() < 0.05 else 0)
                model.wrote(off, data)
            except nbd.Error as e:
                model.failed(off, data)
                if e.errnum == errno.ENOSPC:
                    enospc += 1
                    if enospc >= 5:
                        break
                else:
                    other_errors.append(e.string)
        assert enospc >= 5, f"{ctx}: the filesystem never filled up"
        assert not other_errors, f"{ctx}: writes failed with errors other than ENOSPC: " \
            f"{other_errors[:3]}"
        assert os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize < 2 * MiB
        # a flush on a full filesystem fails with ENOSPC (or succeeds); never another error
        try:
            h.flush()
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, f"{ctx}: flush failed with {e.string}"
        # 2. reads keep working and return what was written
        model.verify(h, f"{ctx} while full")
        assert s.running
        # 3. give the space back: writes and flushes work again
        ballast.unlink()
        for i in range(8):
            n = rnd.choice([BS, 64 * BS])
            off = rnd.randrange(0, REGION // BS - n // BS + 1) * BS
            data = rnd.randbytes(n)
            try:
                h.pwrite(data, off)
            except nbd.Error as e:
                raise AssertionError(f"{ctx}: write {i} after freeing space failed: "
                                     f"{e.string}") from None
            model.wrote(off, data)
        h.zero(8 * BS, 0)
        model.wrote(0, bytes(8 * BS))
        h.flush()
        h.pwrite(b"fua" * 4096, 4096 * 100, nbd.CMD_FLAG_FUA)
        model.wrote(4096 * 100, b"fua" * 4096)
        model.verify(h, f"{ctx} after freeing space")
    # everything survives a clean restart
    s.stop()
    s.start()
    h = s.connect()
    model.verify(h, f"seed={seed} after restart")
    s.stop()
    info = s.info()
    assert info["recovery"]["corrupt_records"] == 0, info["recovery"]
    assert info["recovery"]["skipped_bytes"] == 0, info["recovery"]


def test_enospc_then_sigkill_keeps_flushed_data(small_fs, make_server):
    """Fill to ENOSPC, free space, flush, SIGKILL: everything acknowledged before the flush is
    there after recovery (the failed buffer write must have been completed, not lost)."""
    seed = int(os.environ.get("BLOCKREP_ENOSPC_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    s = make_server(base=small_fs, size=VOL_SIZE, create_args=["--segment-size", "1M"])
    model = Model(VOL_SIZE)
    ballast = small_fs / "ballast"
    take_space(ballast, leave=rnd.randrange(0, 2 * MiB))
    h = s.connect()
    failures = 0
    off = 0
    while failures < 3 and off < REGION:
        data = rnd.randbytes(256 * 1024)
        try:
            h.pwrite(data, off)
            model.wrote(off, data)
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, e.string
            model.failed(off, data)
            failures += 1
        off += len(data)
    assert failures == 3, f"seed={seed}: never ran out of space"
    model.verify(h, f"seed={seed} full")
    ballast.unlink()
    h.pwrite(b"after" * 1000, VOL_SIZE - 8192)
    model.wrote(VOL_SIZE - 8192, b"after" * 1000)
    h.flush()
    s.kill()
    s.start()
    h = s.connect()
    model.verify(h, f"seed={seed} after SIGKILL")
