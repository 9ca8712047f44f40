"""The image backend (issue 11; DESIGN.md M3, docs/IMAGE.md, RELIABILITY.md R1, R5, R10, R13).

A volume of this backend is a flat raw file, VOL/image.raw, plus a change log in another
directory (--journal DIR: lsfs segments, records as docs/FORMAT.md §3). Every write goes to the
log first and is acknowledged from there; the mover copies head blocks into the image in the
background, preserving first (copy-before-write, into the log) any image block a snapshot still
maps. A clean stop drains the log, so image.raw alone is then the volume.

What these tests hold the implementation to:
  1. create: the layout on disk, a sparse image that qemu-img reads as raw, the same-filesystem
     warning, the refusals (nothing created), a change log owned by another volume refused.
  2. served through nbdkit: after `stop` image.raw equals what was written (trimmed ranges are
     holes), `qemu-img convert` and `losetup -r` read the volume from the image alone.
  3. R10: the change log cut at every byte of its last records, and garbage appended: recovery
     stops at the last valid record, everything before it reads as written, the image then
     equals the model.
  4. snapshots keep their data while the mover overwrites the image under them, across clean
     restarts, crashes and I/O errors in the middle of a move; `@NAME` exports read the same.
  5. back-pressure: over --journal-size of unmoved data, writes wait (never fail) and the log
     stays bounded.
  6. SIGKILL while the mover runs: every flushed write reads back; the image then drains.
  7. replication from an image primary to an lsfs and an image DR site; verify.

Seeds are fixed (each test names its own); the crash test takes BLOCKREP_CRASH_SEED.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from conftest import run_blockrep, tree_state
from replhelp import (  # noqa: F401  (fixtures too)
    ERROR_PREFIX,
    connected,
    dr_snapshots,
    nbdcopy_to,
    replicate,
    sh,
    snapshot,
    uri,
)

from engine import faults, volume
from engine.errors import BlockrepError
from engine.volume import Volume

KiB = 1 << 10
MiB = 1 << 20
BS = 4096
WARNING_PREFIX = "blockrep: warning:"


# ------------------------------------------------------------------------------------ helpers

def image_args(journal, *more) -> list[str]:
    return ["--backend", "image", "--journal", str(journal), *map(str, more)]


def image_of(vol) -> Path:
    return Path(vol) / "image.raw"


def first_difference(a, b) -> int:
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def assert_same(got, want, what: str) -> None:
    if bytes(got) != bytes(want):
        if len(got) != len(want):
            raise AssertionError(f"{what}: {len(got)} bytes, expected {len(want)}")
        i = first_difference(got, want)
        raise AssertionError(f"{what}: differs first at byte {i} (block {i // BS}): "
                             f"{bytes(got[i:i + 8]).hex()} instead of {bytes(want[i:i + 8]).hex()}")


def assert_image_equals(vol, want, what: str = "image.raw") -> None:
    img = image_of(vol)
    assert img.stat().st_size == len(want), f"{what}: {img.stat().st_size} bytes, volume is {len(want)}"
    assert_same(img.read_bytes(), want, f"{what} of {vol}")


def has_data(path, offset: int, length: int) -> bool:
    """True when any byte of [offset, offset+length) of the file is allocated (SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            pos = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return False
        return pos < offset + length
    finally:
        os.close(fd)


def drain(v: Volume, limit: int = 100_000) -> int:
    """v.move() until it reports 0 bytes moved; returns the total."""
    total = 0
    for _ in range(limit):
        n = v.move(max_bytes=4 << 20)
        assert n >= 0, n
        if n == 0:
            return total
        total += n
    raise AssertionError(f"the mover still reports work after {limit} calls ({total} bytes)")


def info_json(vol) -> dict:
    return json.loads(run_blockrep("info", vol, "--json", check=True).stdout)


def wait_image_current(server, timeout: float = 30) -> dict:
    """Poll `blockrep info` of a served volume until the mover has caught up."""
    deadline = time.monotonic() + timeout
    while True:
        i = server.info()
        if i["image_current"] and i["journal_pending_bytes"] == 0:
            return i
        if time.monotonic() > deadline:
            keys = ("journal_pending_bytes", "image_current", "mover_bytes_per_second")
            raise AssertionError(f"the mover did not catch up within {timeout}s: { {k: i.get(k) for k in keys} }")
        time.sleep(0.1)


def read_export(u: str, size: int) -> bytes:
    with connected(u) as h:
        return b"".join(bytes(h.pread(min(8 * MiB, size - o), o)) for o in range(0, size, 8 * MiB))


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), r.stderr
    return lines[0]


@pytest.fixture
def other_fs(tmp_path):
    """A small tmpfs mounted under tmp_path: a filesystem other than the volume's (st_dev differs).
    Ask for it before make_server, so that the servers are stopped before it is unmounted."""
    d = tmp_path / "otherfs"
    d.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", d)
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ------------------------------------------------------------------------ 1. create and layout

def test_create_lays_out_a_sparse_raw_image_and_the_change_log_elsewhere(other_fs, tmp_path):
    vol, j = tmp_path / "vol", other_fs / "journal"
    r = run_blockrep("create", vol, "--size", "64M", *image_args(j))
    assert r.returncode == 0, r.stderr
    assert WARNING_PREFIX not in r.stderr, f"the change log is on another filesystem: {r.stderr}"
    meta = json.loads((vol / "volume.json").read_text())
    assert meta["backend"] == "image"
    assert meta["journal"] == str(j.resolve()) and os.path.isabs(meta["journal"])

    img = image_of(vol)
    st = img.stat()
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 <= 64 * KiB, f"the image is not sparse: {st.st_blocks * 512} bytes allocated"
    qi = json.loads(sh("qemu-img", "info", "-f", "raw", "--output=json", img).stdout)
    assert qi["format"] == "raw" and qi["virtual-size"] == 64 * MiB, qi
    assert qi["actual-size"] <= 64 * KiB, qi

    assert (j / "segments").is_dir()
    assert (j / "owner").read_text().strip() == meta["uuid"]
    assert not (vol / "segments").exists(), "the log belongs in the journal directory, not beside the image"

    i = info_json(vol)
    assert i["backend"] == "image" and i["size"] == 64 * MiB
    assert i["journal"] == meta["journal"]
    assert i["journal_pending_bytes"] == 0
    assert i["journal_max_bytes"] == 1 << 30  # the default --journal-size
    assert i["image_current"] is True
    assert isinstance(i["mover_bytes_per_second"], (int, float)) and i["mover_bytes_per_second"] >= 0

    # the first open/close puts the checkpoint into the change log, never beside the image
    with Volume.open(vol) as v:
        v.write(b"\x5a" * BS, 8 * BS)
    assert (j / "checkpoint").is_file()
    assert not (vol / "checkpoint").exists() and not (vol / "segments").exists()
    assert img.read_bytes()[8 * BS:9 * BS] == b"\x5a" * BS
    assert {p.name for p in j.iterdir()} >= {"checkpoint", "owner", "segments"}


def test_create_journal_size_sets_the_back_pressure_limit(tmp_path):
    vol = tmp_path / "vol"
    run_blockrep("create", vol, "--size", "16M", *image_args(tmp_path / "j", "--journal-size", "32M"), check=True)
    i = info_json(vol)
    assert i["journal_max_bytes"] == 32 * MiB, i


def test_create_warns_when_the_change_log_shares_the_image_filesystem(tmp_path):
    vol, j = tmp_path / "vol", tmp_path / "journal"
    r = run_blockrep("create", vol, "--size", "16M", *image_args(j))
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith(WARNING_PREFIX)]
    assert len(warnings) == 1 and "same filesystem" in warnings[0], r.stderr
    assert ERROR_PREFIX not in r.stderr
    assert image_of(vol).stat().st_size == 16 * MiB and (j / "owner").is_file()
    assert info_json(vol)["backend"] == "image"


@pytest.mark.parametrize("args", [
    ["--journal", "{j}"],
    ["--backend", "lsfs", "--journal", "{j}"],
    ["--backend", "image"],
], ids=["journal-without-image-backend", "journal-with-lsfs", "image-without-journal"])
def test_create_refuses_a_backend_and_journal_that_do_not_go_together(tmp_path, args):
    work = tmp_path / "w"
    work.mkdir()
    before = tree_state(tmp_path)
    r = run_blockrep("create", work / "vol", "--size", "16M", *[a.format(j=work / "journal") for a in args])
    one_error_line(r)
    assert r.stdout == ""
    assert tree_state(tmp_path) == before, "a refused create left files behind"


def _two_image_volumes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    volume.create(a, 4 * MiB, backend="image", journal=tmp_path / "ja", segment_size=MiB)
    pb = volume.create(b, 4 * MiB, backend="image", journal=tmp_path / "jb", segment_size=MiB)
    with Volume.open(b) as v:
        v.write(b"B" * BS, 0)
    with Volume.open(a) as v:
        v.write(b"A" * BS, 0)
    return a, b, pb.uuid


@pytest.mark.parametrize("how", ["volume-json-names-the-other-log", "owner-file-names-another-volume"])
def test_a_change_log_owned_by_another_volume_is_refused(tmp_path, how):
    a, b, b_uuid = _two_image_volumes(tmp_path)
    if how == "volume-json-names-the-other-log":
        meta = json.loads((a / "volume.json").read_text())
        meta["journal"] = str((tmp_path / "jb").resolve())
        (a / "volume.json").write_text(json.dumps(meta, indent=2) + "\n")
    else:
        (tmp_path / "ja" / "owner").write_text(b_uuid + "\n")
    keep = {d: tree_state(tmp_path / d) for d in ("ja", "jb", "b")}
    image_a = image_of(a).read_bytes()
    for cmd in (["serve", a], ["info", a, "--json"], ["snapshot", "create", a, "--name", "x"]):
        r = run_blockrep(*cmd, timeout=60)
        one_error_line(r)
    with pytest.raises(BlockrepError):
        Volume.open(a)
    assert {d: tree_state(tmp_path / d) for d in keep} == keep, "a refused open changed a change log"
    assert image_of(a).read_bytes() == image_a
    # the rightful owner still opens its log and reads its data
    with Volume.open(b) as v:
        assert v.read(BS, 0) == b"B" * BS


def test_info_after_a_crash_shows_the_image_lagging_the_change_log(tmp_path):
    vol = tmp_path / "vol"
    volume.create(vol, 8 * MiB, backend="image", journal=tmp_path / "j", segment_size=MiB)
    data = random.Random(11).randbytes(MiB)
    v = Volume.open(vol)
    v.write(data, 2 * MiB)
    v.flush()
    v.abandon()  # crash: nothing moved, nothing checkpointed
    i = info_json(vol)
    assert i["image_current"] is False, i
    assert i["journal_pending_bytes"] == MiB, i
    with Volume.open(vol) as v:  # recovery, then a clean close drains
        assert v.read(MiB, 2 * MiB) == data
    i = info_json(vol)
    assert i["image_current"] is True and i["journal_pending_bytes"] == 0, i
    assert_image_equals(vol, bytes(2 * MiB) + data + bytes(5 * MiB))


# --------------------------------------------------------------------- 2. served through nbdkit

def test_served_writes_are_in_the_image_after_a_clean_stop(other_fs, make_server, tmp_path):
    size = 32 * MiB
    s = make_server(size="32M", create_args=image_args(other_fs / "journal", "--segment-size", "1M"))
    rnd = random.Random(2)
    shadow = bytearray(size)
    h = s.connect()

    def write(off, data):
        h.pwrite(data, off)
        shadow[off:off + len(data)] = data

    def trim(off, n):
        h.trim(n, off)
        a, b = -(-off // BS) * BS, (off + n) // BS * BS
        if a < b:
            shadow[a:b] = bytes(b - a)

    write(0, rnd.randbytes(4 * MiB))
    write(8 * MiB + 123, rnd.randbytes(70001))
    write(20 * MiB, rnd.randbytes(2 * MiB))
    write(31 * MiB, rnd.randbytes(MiB))
    h.flush()
    wait_image_current(s)  # the mover has put all of it into the image while served
    # now trim and zero blocks that are in the image: a drain must punch / zero them there
    trim(MiB, MiB)
    h.zero(256 * KiB, 20 * MiB + 64 * KiB)
    shadow[20 * MiB + 64 * KiB:20 * MiB + 320 * KiB] = bytes(256 * KiB)
    trim(3 * MiB + 100, 10000)  # partial: only its whole block goes
    write(2 * MiB - 5, b"edge!!!!!!")  # unaligned, across the end of the trimmed range
    h.flush()
    assert_same(read_export(s.uri, size), shadow, "the export")
    s.stop()

    assert_image_equals(s.vol, shadow, "image.raw after stop")
    assert not has_data(image_of(s.vol), MiB, MiB - BS), "the trimmed range is still allocated in the image"
    want = tmp_path / "want.raw"
    want.write_bytes(shadow)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", image_of(s.vol), want)
    i = s.info()
    assert i["image_current"] is True and i["journal_pending_bytes"] == 0 and not i["served"], i

    # restart: the export reads the same; change more (trim blocks that live in the image)
    s.start()
    assert_same(read_export(s.uri, size), shadow, "the export after restart")
    h = s.connect()
    write(5 * MiB, rnd.randbytes(MiB))
    trim(20 * MiB, 2 * MiB)
    write(9 * MiB + 7, rnd.randbytes(3 * BS))
    h.flush()
    content = read_export(s.uri, size)
    assert_same(content, shadow, "the export after more writes")
    s.stop()

    img = image_of(s.vol)
    assert not has_data(img, 20 * MiB, 2 * MiB), "the trimmed range is still allocated in the image"
    out = tmp_path / "converted.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", img, out)
    assert_same(out.read_bytes(), content, "qemu-img convert of image.raw")
    loop = sh("losetup", "-r", "-f", "--show", img).stdout.strip()
    try:
        with open(loop, "rb") as f:
            assert_same(f.read(size), content, f"losetup -r {loop} of image.raw")
    finally:
        sh("losetup", "-d", loop, check=False)


# ------------------------------------------------------------ 3. R10: torn and garbage log tails

REC_MAGIC = 0x43525242
T_WRITE, T_ZERO, T_TRIM, T_RELOC, T_FLUSH, T_SNAP, T_SNAPDEL = range(1, 8)
F_COMPRESSED = 1
HDR = struct.Struct("<IIBBHIIIQQ8s")  # docs/FORMAT.md §3: 48 bytes
assert HDR.size == 48


def crc32c(data: bytes, start: int = 0) -> int:
    from engine import _native
    return _native.lib.crc32c_extend(start, _native.ffi.from_buffer(data), len(data))


@dataclass
class Record:
    start: int
    end: int
    type: int
    flags: int
    nblocks: int
    lba: int
    seq: int
    ncrc: int


def parse_segment(data: bytes) -> list[Record]:
    """The valid records of a segment file (docs/FORMAT.md §2-3), up to the first that is not."""
    recs: list[Record] = []
    pos = 64
    while pos + HDR.size <= len(data):
        magic, hcrc, typ, flags, _res, nblocks, plen, _gen, seq, lba, _u8 = HDR.unpack_from(data, pos)
        if magic != REC_MAGIC:
            break
        if typ in (T_WRITE, T_RELOC):
            k = 1 if flags & F_COMPRESSED else nblocks
        elif typ in (T_SNAP, T_SNAPDEL):
            k = 1
        else:
            k = 0
        end = pos + HDR.size + 4 * k + plen
        if end > len(data) or crc32c(data[pos + 8:pos + HDR.size + 4 * k]) != hcrc:
            break
        if recs and seq != recs[-1].seq + 1:
            break
        recs.append(Record(pos, end, typ, flags, nblocks, lba, seq, k))
        pos = end
    return recs


def forged_record(template: bytes, *, seq: int, lba: int | None = None, fix_hcrc: bool,
                  damage_payload: bool = False, cut: int = 0) -> bytes:
    """A copy of an uncompressed 1-block WRITE record with a new seq (and lba); fix_hcrc: a header
    CRC that matches (else the template's, now wrong); damage_payload: one payload byte flipped
    (its block CRC then fails); cut: bytes removed from the end (a record torn short)."""
    rec = bytearray(template)
    struct.pack_into("<Q", rec, 24, seq)
    if lba is not None:
        struct.pack_into("<Q", rec, 32, lba)
    if fix_hcrc:
        struct.pack_into("<I", rec, 4, crc32c(bytes(rec[8:HDR.size + 4])))
    if damage_payload:
        rec[HDR.size + 4 + 100] ^= 0x40
    return bytes(rec[:len(rec) - cut])


R10_BLOCKS = 64  # a 256 KiB volume: reading all of it after every cut is cheap
R10_NEW_LBA = 60  # written after recovery, to check that the log goes on correctly


class R10Log:
    """A crashed image volume whose last records exist only in the change log, and the means to
    put its journal back as it was after each experiment (recovery truncates, checkpoints, and
    a close drains and deletes segments)."""

    def __init__(self, tmp_path: Path):
        self.vol, self.j = tmp_path / "vol", tmp_path / "journal"
        volume.create(self.vol, R10_BLOCKS * BS, backend="image", journal=self.j, segment_size=MiB)
        rnd = random.Random(1010)
        self.base = bytearray(R10_BLOCKS * BS)
        v = Volume.open(self.vol)
        try:
            for lba in range(24):  # phase 1: moved into the image and checkpointed
                blk = rnd.randbytes(BS)
                v.write(blk, lba * BS)
                self.base[lba * BS:(lba + 1) * BS] = blk
            v.flush()
            assert drain(v) >= 24 * BS
            v.checkpoint()
            assert_same(image_of(self.vol).read_bytes(), self.base, "image after phase 1")
            # phase 2: only in the log. The last four records: WRITE, ZERO, TRIM, WRITE.
            self.ops: list[tuple[int, int, int, bytes]] = []  # (type, lba, nblocks, content)
            for typ, lba, n in [(T_WRITE, 3, 1), (T_WRITE, 40, 1), (T_WRITE, 10, 1), (T_ZERO, 5, 2),
                                (T_TRIM, 8, 1), (T_WRITE, 3, 1)]:
                if typ == T_WRITE:
                    data = rnd.randbytes(n * BS)
                    v.write(data, lba * BS)
                elif typ == T_ZERO:
                    data = bytes(n * BS)
                    v.zero(n * BS, lba * BS)
                else:
                    data = bytes(n * BS)
                    v.trim(n * BS, lba * BS)
                self.ops.append((typ, lba, n, data))
            v.flush()
        finally:
            v.abandon()  # crash: phase 2 is in the log only
        self.segdir = self.j / "segments"
        segs = sorted(self.segdir.glob("*.seg"))
        assert segs, f"no segment file in {self.segdir}"
        self.newest = segs[-1]
        self.data = self.newest.read_bytes()
        self.recs = parse_segment(self.data)
        data_recs = [r for r in self.recs if r.type in (T_WRITE, T_ZERO, T_TRIM)]
        self.window = 4
        tail = data_recs[-self.window:]
        want = [(t, lba, n) for t, lba, n, _ in self.ops[-self.window:]]
        assert [(r.type, r.lba, r.nblocks) for r in tail] == want, (
            f"the newest segment {self.newest.name} does not end with the last four requests as "
            f"single records: {[(r.type, r.lba, r.nblocks, r.seq) for r in data_recs[-8:]]}")
        self.tail = tail
        self.valid_end = self.recs[-1].end
        self.last_write = self.data[tail[-1].start:tail[-1].end]
        assert len(self.last_write) == HDR.size + 4 + BS
        # the journal and the image as the crash left them
        self.pristine = {p.relative_to(self.j): p.read_bytes() for p in self.j.rglob("*") if p.is_file()}
        self.image = image_of(self.vol).read_bytes()
        self.image_mtime = image_of(self.vol).stat().st_mtime_ns

    def expected(self, t: int) -> bytearray:
        """The volume when the newest segment is cut at byte t: the requests before the window,
        then each request of the window whose record lies wholly before t."""
        state = bytearray(self.base)
        for i, (_typ, lba, n, content) in enumerate(self.ops):
            k = i - (len(self.ops) - self.window)
            if k >= 0 and self.tail[k].end > t:
                break
            state[lba * BS:(lba + n) * BS] = content
        return state

    def last_complete_end(self, t: int) -> int:
        return max([64] + [r.end for r in self.recs if r.end <= t])

    def reset(self, newest: bytes) -> None:
        """The journal as the crash left it, except the newest segment, which gets `newest`."""
        keep = set(self.pristine)
        for p in list(self.j.rglob("*")):
            if p.is_file() and p.relative_to(self.j) not in keep:
                p.unlink()
        for rel, content in self.pristine.items():
            p = self.j / rel
            if p == self.newest:
                continue
            if not p.exists() or p.stat().st_size != len(content) or rel.name == "checkpoint":
                p.write_bytes(content)
        with open(self.newest, "wb") as f:
            f.write(newest)
        img = image_of(self.vol)
        if img.stat().st_mtime_ns != self.image_mtime:
            img.write_bytes(self.image)
            self.image_mtime = img.stat().st_mtime_ns

    def check(self, newest: bytes, want: bytes, what: str, torn: int | None = None) -> None:
        """Open (recover) with `newest` as the newest segment: reads equal `want`, no corruption
        reported, torn-tail bytes as given."""
        self.reset(newest)
        v = Volume.open(self.vol)
        try:
            got = v.read(R10_BLOCKS * BS, 0)
            rec = v.recovery
        finally:
            v.abandon()
        assert_same(got, want, f"{what}: the volume after recovery")
        assert rec["corrupt_records"] == 0 and rec["skipped_bytes"] == 0, f"{what}: {rec}"
        if torn is not None:
            assert rec["torn_bytes_dropped"] == torn, f"{what}: torn tail of {torn} bytes, report {rec}"

    def check_fully(self, newest: bytes, want: bytes, what: str) -> None:
        """As check, then: a new write after recovery survives a second crash, and a clean close
        leaves an image equal to the model."""
        self.check(newest, want, what)
        want = bytearray(want)
        new = bytes([0xA5]) * BS
        want[R10_NEW_LBA * BS:(R10_NEW_LBA + 1) * BS] = new
        v = Volume.open(self.vol)
        try:
            v.write(new, R10_NEW_LBA * BS)
            v.flush()
        finally:
            v.abandon()
        v = Volume.open(self.vol)
        assert_same(v.read(R10_BLOCKS * BS, 0), want, f"{what}: after a write and a second crash")
        v.close()  # drains
        assert_same(image_of(self.vol).read_bytes(), want, f"{what}: image.raw after a clean close")
        v = Volume.open(self.vol, readonly=True)
        try:
            i = v.info()
        finally:
            v.abandon()
        assert i["image_current"] and i["journal_pending_bytes"] == 0, f"{what}: {i}"


def test_r10_change_log_cut_at_every_byte_of_its_last_records(tmp_path):
    log = R10Log(tmp_path)
    start = log.tail[0].start
    offsets = range(start, log.valid_end + 1)
    t0 = time.monotonic()
    for t in offsets:
        log.check(log.data[:t], log.expected(t), f"cut at byte {t} of {log.newest.name}",
                  torn=t - log.last_complete_end(t))
    elapsed = time.monotonic() - t0
    # the whole story (a new write, a second crash, drain into the image) at every record edge
    # and at a few cuts inside records
    rnd = random.Random(10)
    edges = {e + d for r in log.tail for e in (r.start, r.end) for d in (-1, 0, 1, HDR.size)}
    edges |= set(rnd.sample(list(offsets), 12))
    for t in sorted(e for e in edges if start <= e <= log.valid_end):
        log.check_fully(log.data[:t], log.expected(t), f"cut at byte {t} (full check)")
    print(f"\nR10: {len(offsets)} cuts of {log.newest.name} checked in {elapsed:.1f}s "
          f"(+{len(edges)} with a second crash and drain), 0 failures")


def test_r10_garbage_after_the_last_record_is_ignored(tmp_path):
    log = R10Log(tmp_path)
    full = log.expected(log.valid_end)
    valid = log.data[:log.valid_end]
    rnd = random.Random(1011)
    nxt = log.recs[-1].seq + 1
    first = log.data[log.tail[0].start:log.tail[0].end]
    tails = {
        "1 random byte": rnd.randbytes(1),
        "47 random bytes": rnd.randbytes(47),
        "48 random bytes": rnd.randbytes(48),
        "a record's worth of random bytes": rnd.randbytes(len(log.last_write)),
        "64 KiB of random bytes": rnd.randbytes(64 * KiB),
        "64 KiB of zeroes": bytes(64 * KiB),
        "the magic then random bytes": struct.pack("<I", REC_MAGIC) + rnd.randbytes(5000),
        "a copy of the last record with a bad header crc": forged_record(log.last_write, seq=nxt, fix_hcrc=False),
        "a copy of the last record, its old sequence number": log.last_write,
        "a copy of an older record": first,
        "a valid header whose block crc fails": forged_record(log.last_write, seq=nxt, lba=40, fix_hcrc=True,
                                                              damage_payload=True),
        "a valid header, record cut short": forged_record(log.last_write, seq=nxt, lba=40, fix_hcrc=True,
                                                          cut=1000),
        "a valid header only": forged_record(log.last_write, seq=nxt, lba=40, fix_hcrc=True,
                                             cut=BS),
        "a bad-crc record then random bytes": forged_record(log.last_write, seq=nxt, fix_hcrc=False)
                                              + rnd.randbytes(3000),
    }
    for what, tail in tails.items():
        log.check_fully(valid + tail, full, f"{what} after the last record")


# --------------------------------------------------------- 4. the mover and snapshots together

def _snap(v: Volume, name: str) -> bytes:
    return v.snapshot_read(v.snapshot(name)["id"], v.size, 0)


@pytest.mark.parametrize("reopen", ["restart", "crash"])
def test_snapshot_keeps_its_data_when_the_mover_overwrites_the_image(tmp_path, reopen):
    size = 8 * MiB
    vol = tmp_path / "vol"
    volume.create(vol, size, backend="image", journal=tmp_path / "journal", segment_size=MiB)
    rnd = random.Random(4)
    a = bytearray(size)
    a[:4 * MiB] = rnd.randbytes(4 * MiB)

    def again(v: Volume) -> Volume:
        if reopen == "restart":
            v.close()
        else:
            v.abandon()
        return Volume.open(vol)

    v = Volume.open(vol)
    try:
        v.write(a[:4 * MiB], 0)
        assert drain(v) >= 4 * MiB
        assert_same(image_of(vol).read_bytes(), a, "image after moving A")
        assert v.info()["image_current"] is True
        v.snapshot_create("s1")  # s1 maps the image: the next move must preserve what it overwrites

        # B: 3 of every 4 blocks overwritten, a range zeroed, one trimmed, new ground written
        b = bytearray(a)
        for lba in range(1024):
            if lba % 4:
                blk = rnd.randbytes(BS)
                v.write(blk, lba * BS)
                b[lba * BS:(lba + 1) * BS] = blk
        v.zero(64 * KiB, MiB)
        b[MiB:MiB + 64 * KiB] = bytes(64 * KiB)
        v.trim(128 * KiB, 2 * MiB)
        b[2 * MiB:2 * MiB + 128 * KiB] = bytes(128 * KiB)
        v.write(b"\x77" * MiB, 6 * MiB)
        b[6 * MiB:7 * MiB] = b"\x77" * MiB
        assert drain(v) > 0
        assert v.stats()["image_cbw_blocks"] > 0, "no copy-before-write happened: the test proves nothing"
        i = v.info()
        assert i["image_current"] is True and i["journal_pending_bytes"] == 0, i
        assert_same(image_of(vol).read_bytes(), b, "image after moving B (image_current says it is the head)")
        assert_same(_snap(v, "s1"), a, "s1 after the mover overwrote its image blocks")
        assert_same(v.read(size, 0), b, "head after moving B")

        v = again(v)
        assert_same(_snap(v, "s1"), a, f"s1 after {reopen}")
        assert_same(v.read(size, 0), b, f"head after {reopen}")

        # the preserved copies survive the collector and a checkpoint, then another crash
        v.collect(ratio=1.0)
        v.checkpoint()
        assert_same(_snap(v, "s1"), a, "s1 after collect")
        v.abandon()
        v = Volume.open(vol)
        assert_same(_snap(v, "s1"), a, "s1 after collect and a crash")
        assert_same(v.read(size, 0), b, "head after collect and a crash")

        # a second generation: s2 = B, the head becomes C, moved, then reopened again
        v.snapshot_create("s2")
        c = bytearray(rnd.randbytes(size))
        v.write(c, 0)
        assert drain(v) > 0
        v = again(v)
        assert_same(_snap(v, "s1"), a, f"s1 after C moved and {reopen}")
        assert_same(_snap(v, "s2"), b, f"s2 after C moved and {reopen}")
        assert_same(v.read(size, 0), c, f"head after C moved and {reopen}")

        # deleting the snapshots lets the collector drop the preserved copies; a close drains
        v.snapshot_delete("s1")
        v.snapshot_delete("s2")
        v.collect(ratio=1.0)
        assert_same(v.read(size, 0), c, "head after deleting the snapshots")
    finally:
        v.close()
    assert_image_equals(vol, c, "image after the last close")


def test_mover_failing_at_each_io_step_loses_no_snapshot_or_head_data(tmp_path):
    """Fail the Nth system call of a move (any kind: pwrite, fdatasync, punch, ...) for N = 1, 2, ...
    until a move completes without failing; after each failure, crash and recover: the snapshot
    still reads A and the head B, and a clean close leaves an image equal to B."""
    size = MiB
    vol, j = tmp_path / "vol", tmp_path / "journal"
    volume.create(vol, size, backend="image", journal=j, segment_size=MiB)
    rnd = random.Random(44)
    a = rnd.randbytes(size)
    with Volume.open(vol) as v:
        v.write(a, 0)  # the close drains A into the image and checkpoints the IMAGE entries
    v = Volume.open(vol)
    v.snapshot_create("s1")  # maps the image
    b = bytearray(a)
    for lba in range(0, 64, 4):  # scattered blocks, a run, a trim: all over blocks only the image has
        blk = rnd.randbytes(BS)
        v.write(blk, lba * BS)
        b[lba * BS:(lba + 1) * BS] = blk
    run = rnd.randbytes(32 * BS)
    v.write(run, 128 * BS)
    b[128 * BS:160 * BS] = run
    v.trim(16 * BS, 64 * BS)
    b[64 * BS:80 * BS] = bytes(16 * BS)
    v.flush()
    v.abandon()  # B is in the change log only (a close would drain it)
    saved = tmp_path / "saved"
    shutil.copytree(vol, saved / "vol")
    shutil.copytree(j, saved / "journal")

    completed = False
    for nth in range(1, 200):
        for src, dst in ((saved / "vol", vol), (saved / "journal", j)):
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        v = Volume.open(vol)
        failed = False
        try:
            faults.inject(faults.ALL, nth)
            try:
                drain(v)
            except BlockrepError:
                failed = True
            finally:
                calls = faults.calls()
                faults.off()
            if not failed:
                completed = calls < nth
                assert v.stats()["image_cbw_blocks"] > 0, "no copy-before-write happened: the test proves nothing"
        finally:
            v.abandon()
        with Volume.open(vol) as v:
            assert_same(_snap(v, "s1"), a, f"s1 after the move failed at I/O call {nth} and a crash")
            assert_same(v.read(size, 0), b, f"head after the move failed at I/O call {nth} and a crash")
        assert_image_equals(vol, b, f"image after recovery and a clean close (failure at call {nth})")
        if completed:
            break
    assert completed, "the move never completed within 200 injected failures"


def test_snapshot_export_reads_old_data_after_the_mover_overwrote_the_image(make_server, tmp_path):
    size = 16 * MiB
    s = make_server(size="16M", create_args=image_args(tmp_path / "journal", "--segment-size", "1M"))
    rnd = random.Random(41)
    a = rnd.randbytes(4 * MiB) + bytes(size - 4 * MiB)
    h = s.connect()
    h.pwrite(a[:4 * MiB], 0)
    h.flush()
    wait_image_current(s)
    snapshot(s.vol, "s1")  # maps the image: the mover must preserve its blocks before overwriting them
    b = bytearray(a)
    b[:3 * MiB] = rnd.randbytes(3 * MiB)
    b[8 * MiB:9 * MiB] = b"\x33" * MiB
    h.pwrite(b[:3 * MiB], 0)
    h.pwrite(b[8 * MiB:9 * MiB], 8 * MiB)
    h.trim(512 * KiB, 3 * MiB)
    b[3 * MiB:3 * MiB + 512 * KiB] = bytes(512 * KiB)
    h.flush()
    wait_image_current(s)
    snap = uri(s.sock, "@s1")
    assert_same(read_export(snap, size), a, "@s1 once the mover overwrote its blocks in the image")
    assert_same(read_export(s.uri, size), b, "the head")
    s.stop()
    assert_image_equals(s.vol, b)
    s.start()
    assert_same(read_export(snap, size), a, "@s1 after stop/serve")
    h = s.connect()
    h.pwrite(rnd.randbytes(MiB), 0)  # unflushed when the kill comes
    s.kill()
    s.start()
    assert_same(read_export(snap, size), a, "@s1 after SIGKILL")
    head = read_export(s.uri, size)
    assert head[MiB:] == bytes(b[MiB:]), "the head beyond the unflushed write changed"


# ----------------------------------------------------------------------------- 5. back-pressure

def test_writes_beyond_the_journal_size_wait_for_the_mover_and_never_fail(tmp_path):
    """The engine alone (no background mover): the writer itself moves a batch when the change
    log holds journal_size of unmoved head data; pending never grows past it (+ one batch)."""
    size, limit = 64 * MiB, 8 * MiB
    vol = tmp_path / "vol"
    volume.create(vol, size, backend="image", journal=tmp_path / "journal", journal_size=limit,
                  segment_size=MiB)
    data = random.Random(5).randbytes(size)
    with Volume.open(vol) as v:
        assert v.info()["journal_max_bytes"] == limit
        peak = 0
        for off in range(0, size, 256 * KiB):
            v.write(data[off:off + 256 * KiB], off)
            pending = v.info()["journal_pending_bytes"]
            peak = max(peak, pending)
            assert pending <= limit + 8 * MiB, f"{pending} bytes pending after writing {off + 256 * KiB}"
        assert peak >= limit // 2, f"the change log never filled ({peak} bytes at most): nothing was tested"
        v.flush()
        assert_same(v.read(size, 0), data, "the volume after 64 MiB through an 8 MiB change log")
    assert_image_equals(vol, data)


def test_served_back_pressure_keeps_the_change_log_bounded(make_server, tmp_path):
    size, limit = 64 * MiB, 8 * MiB
    s = make_server(size="64M", create_args=image_args(tmp_path / "journal", "--journal-size", "8M"))
    rnd = random.Random(55)
    data = rnd.randbytes(size)
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with contextlib.suppress(Exception):
                samples.append(s.info()["journal_pending_bytes"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        h = s.connect()
        for off in range(0, size, MiB):
            h.pwrite(data[off:off + MiB], off)  # an error reply raises: writes must never fail
            if (off + MiB) % (8 * MiB) == 0:
                samples.append(s.info()["journal_pending_bytes"])
        h.flush()
    finally:
        stop.set()
        sampler.join(timeout=60)
    assert len(samples) >= 8, samples
    assert max(samples) <= limit + 8 * MiB, f"pending exceeded the journal size: {max(samples)} ({samples})"
    assert_same(read_export(s.uri, size), data, "the export after 64 MiB through an 8 MiB change log")

    # many requests in flight (nbdcopy) while the log is full: still no error
    src = tmp_path / "second.raw"
    second = rnd.randbytes(size)
    src.write_bytes(second)
    sh("nbdcopy", "--requests=16", src, s.uri, timeout=300)
    i = s.info()
    assert i["journal_pending_bytes"] <= limit + 8 * MiB, i
    assert_same(read_export(s.uri, size), second, "the export after nbdcopy")
    s.stop()
    assert_image_equals(s.vol, second)


# ------------------------------------------------------------------ 6. SIGKILL while the mover runs

def test_sigkill_while_the_mover_runs_keeps_every_flushed_write(make_server, tmp_path):
    from test_crash import CrashOracle, Workload, read_volume

    seed = int(os.environ.get("BLOCKREP_CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    size = 32 * MiB
    s = make_server(size="32M", create_args=image_args(tmp_path / "journal", "--segment-size", "1M",
                                                       "--journal-size", "16M"))
    oracle = CrashOracle(size // BS, seed)
    wl = Workload(oracle, rnd, depth=8, max_blocks=128, big_every=0.01)
    kills = 10
    for k in range(kills):
        h = nbd.NBD()
        h.connect_uri(s.uri)
        wl.run(h, rnd.randint(50, 400))
        # kill at once, while the mover works through a backlog, or after it sealed (1 s idle)
        time.sleep(rnd.choice([0, 0.02, 0.2, 0.6, 1.3]))
        s.kill()
        wl.drain_after_kill(h)
        del h
        s.start()
        h = nbd.NBD()
        h.connect_uri(s.uri)
        data = read_volume(h, size)
        oracle.verify(data, f"image backend, after kill {k + 1}/{kills} ({wl.issued} ops issued)")
        h.flush()
        oracle.recovered(data)
        h.shutdown()
        del h
    content = read_export(s.uri, size)
    s.stop()
    assert_image_equals(s.vol, content, f"seed={seed}: image.raw after the last clean stop")
    rec = s.info()["recovery"]
    assert rec["corrupt_records"] == 0 and rec["skipped_bytes"] == 0, f"seed={seed} {rec}"


# ------------------------------------------------------------------------------ 7. replication

@pytest.mark.parametrize("dr_backend", ["lsfs", "image"])
def test_image_primary_replicates_seed_and_incremental_and_verifies(make_server, tmp_path, dr_backend):
    size = 64 * MiB
    rnd = random.Random(7)
    p = make_server("primary", create_args=image_args(tmp_path / "primary.journal", "--segment-size", "1M"))
    dr_args = image_args(tmp_path / "dr.journal") if dr_backend == "image" else []
    dr = make_server("dr", create_args=dr_args)
    work = tmp_path / "work"
    work.mkdir()

    with connected(p.uri) as h:
        h.pwrite(rnd.randbytes(4 * MiB), 0)
        for _ in range(40):
            h.pwrite(rnd.randbytes(BS), rnd.randrange(0, size // BS) * BS)
        h.zero(256 * KiB, 50 * MiB)
        h.flush()
    wait_image_current(p)
    snapshot(p.vol, "s1")
    s1 = read_export(uri(p.sock, "@s1"), size)
    # the head moves on and the mover overwrites s1's blocks in the image before s1 is shipped
    with connected(p.uri) as h:
        h.pwrite(rnd.randbytes(2 * MiB), MiB)
        h.trim(MiB, 3 * MiB)
        h.flush()
    wait_image_current(p)
    r1 = replicate(p.vol, dr.uri, "--snapshot", "s1", timeout=120)
    assert r1["snapshot"] == "s1" and r1["full"] is True, r1
    assert dr_snapshots(dr) == ["s1"]
    assert_same(read_export(uri(dr.sock, "@s1"), size), s1, f"{dr_backend} DR @s1")
    run_blockrep("verify", p.vol, "s1", "--against", uri(dr.sock, "@s1"), check=True)

    # incremental: more writes, the mover catches up, a second snapshot
    with connected(p.uri) as h:
        for _ in range(30):
            h.pwrite(rnd.randbytes(BS), rnd.randrange(0, size // BS) * BS)
        h.pwrite(rnd.randbytes(MiB), 40 * MiB)
        h.flush()
    wait_image_current(p)
    snapshot(p.vol, "s2")
    s2 = read_export(uri(p.sock, "@s2"), size)
    r2 = replicate(p.vol, dr.uri, "--snapshot", "s2", timeout=120)
    assert r2["base"] == "s1" and r2["full"] is False, r2
    assert r2["bytes_sent"] <= 4 * MiB, f"an incremental shipped {r2['bytes_sent']} bytes"
    assert dr_snapshots(dr) == ["s1", "s2"]
    assert_same(read_export(uri(dr.sock, "@s2"), size), s2, f"{dr_backend} DR @s2")
    assert_same(read_export(uri(dr.sock, "@s1"), size), s1, f"{dr_backend} DR @s1 after the incremental")
    for name in ("s1", "s2"):
        run_blockrep("verify", p.vol, name, "--against", uri(dr.sock, f"@{name}"), check=True)

    if dr_backend == "image":  # the DR's image alone is its head once it stops
        dr_head = read_export(dr.uri, size)
        assert_same(dr_head, s2, "the DR head after the incremental")
        dr.stop()
        assert_image_equals(dr.vol, dr_head, "the DR's image.raw after stop")
