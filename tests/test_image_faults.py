"""The image backend's mover under disk faults (docs/IMAGE.md §3, RELIABILITY R7/R8): a full
image filesystem stops the mover, never a client, and moving resumes by itself once space
returns; a failed image punch or sync stops the mover until the volume is reopened (what
reached the image is unknown), and nothing acknowledged is lost either way."""

from __future__ import annotations

import os
import subprocess

import pytest

from engine import faults, volume
from engine.errors import BlockrepError
from engine.volume import Volume

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs for the volume (the image lives there); the change log stays outside."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _drain(v: Volume) -> None:
    while v.move(4 * MiB):
        pass


def test_a_full_image_filesystem_stops_the_mover_not_the_writes_and_moving_resumes(tmp_path, small_fs):
    volume.create(small_fs / "v", 64 * MiB, backend="image", journal=tmp_path / "j", segment_size=MiB)
    ballast = small_fs / "ballast"
    ballast.write_bytes(os.urandom(12 * MiB))  # leaves ~12 MiB for the image
    data = os.urandom(20 * MiB)
    with Volume.open(small_fs / "v") as v:
        v.write(data, 0)
        v.flush()
        with pytest.raises(BlockrepError, match="No space left"):
            _drain(v)
        info = v.info()
        assert info["image_error"] is None  # not sticky: the bytes were refused, nothing is unknown
        assert info["journal_pending_bytes"] > 0
        v.write(b"x" * 4096, 30 * MiB)  # clients go on writing into the log
        assert v.read(len(data), 0) == data  # and everything reads back, from the log or the image
        ballast.unlink()
        _drain(v)
        assert v.info()["journal_pending_bytes"] == 0 and v.info()["image_current"]
        assert v.read(len(data), 0) == data
    with open(small_fs / "v" / "image.raw", "rb") as f:
        assert f.read(len(data)) == data


def test_a_failed_image_punch_stops_the_mover_until_reopen_and_loses_nothing(tmp_path):
    volume.create(tmp_path / "v", 16 * MiB, backend="image", journal=tmp_path / "j", segment_size=MiB)
    data = bytearray(os.urandom(8 * MiB))
    with Volume.open(tmp_path / "v") as v:
        v.write(data, 0)
        _drain(v)
        v.trim(MiB, MiB)
        data[MiB:2 * MiB] = bytes(MiB)
        faults.inject(faults.OPS["punch"], 1, 5, persistent=True)  # EIO on every punch
        try:
            with pytest.raises(BlockrepError, match="punching the image"):
                _drain(v)
            assert v.info()["image_error"]  # sticky: the image's state is unknown
            v.write(b"y" * 4096, 12 * MiB, fua=True)  # the log still makes writes durable
            assert v.read(8 * MiB, 0) == bytes(data)
            with pytest.raises(BlockrepError, match="earlier write or sync of the image failed"):
                v.move()
        finally:
            faults.off()
        v.abandon()  # as a crash would: reopen is what clears it
    with Volume.open(tmp_path / "v") as v:
        assert v.info()["image_error"] is None
        assert v.read(8 * MiB, 0) == bytes(data)
        assert v.read(4096, 12 * MiB) == b"y" * 4096
        _drain(v)
        assert v.info()["image_current"]
    with open(tmp_path / "v" / "image.raw", "rb") as f:
        img = f.read()
    assert img[:8 * MiB] == bytes(data) and img[12 * MiB:12 * MiB + 4096] == b"y" * 4096


def test_a_compressed_change_log_moved_into_the_image_reads_back(tmp_path):
    """Regression (review of c6f2e50): a compressed entry's crc is its record's, so a moved
    block kept a crc the image block could never match: every moved block read EIO."""
    volume.create(tmp_path / "v", 4 * MiB, backend="image", journal=tmp_path / "j", compress="zstd")
    data = b"text-like data " * (MiB // 15) + b"x" * (MiB % 15)
    with Volume.open(tmp_path / "v") as v:
        v.write(data, 0)
        v.snapshot_create("s1")
        _drain(v)
        v.write(b"new!" * 1024, 0)  # over a moved block a snapshot maps: copy-before-write
        _drain(v)
        assert v.read(MiB, 0) == b"new!" * 1024 + data[4096:]
        assert v.snapshot_read(v.snapshot("s1")["id"], MiB, 0) == data
    with Volume.open(tmp_path / "v") as v:
        assert v.read(MiB, 0) == b"new!" * 1024 + data[4096:]
        assert v.snapshot_read(v.snapshot("s1")["id"], MiB, 0) == data
        assert v.recovery["corrupt_records"] == 0


def test_a_close_after_an_image_error_keeps_unflushed_writes(tmp_path):
    """Regression: a drain that failed made close skip its flush and checkpoint."""
    volume.create(tmp_path / "v", 4 * MiB, backend="image", journal=tmp_path / "j")
    v = Volume.open(tmp_path / "v")
    v.write(b"A" * 4096, 0)
    v.trim(4096, 0)
    faults.inject(faults.OPS["punch"], 1, 5)
    try:
        with pytest.raises(BlockrepError):
            _drain(v)
    finally:
        faults.off()
    v.write(b"B" * 4096, 8 * 4096)  # not flushed: the close must make it durable
    v.close()
    with Volume.open(tmp_path / "v", readonly=True) as v:
        assert v.read(4096, 8 * 4096) == b"B" * 4096


def test_an_image_replaced_by_a_symbolic_link_is_refused(tmp_path):
    volume.create(tmp_path / "v", 4 * MiB, backend="image", journal=tmp_path / "j")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * (4 * MiB // 8))
    (tmp_path / "v" / "image.raw").unlink()
    (tmp_path / "v" / "image.raw").symlink_to(victim)
    with pytest.raises(BlockrepError, match="not a regular file"):
        Volume.open(tmp_path / "v")
    assert victim.read_bytes()[:8] == b"precious"
