"""The engine without nbdkit: each test one behaviour of engine.volume.Volume / csrc/.

The `vol` fixture runs each test on both backends (the image backend with its change log in
tmp_path/j: its collector, checkpoints and snapshots are the lsfs log's); the tests that create
their own volume (sizes, old on-disk versions, compression) use the default backend."""

import errno
import json
import os
import struct
import uuid
from pathlib import Path

import pytest

from engine import volume
from engine.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    UnsupportedFormat,
    VolumeBusy,
)
from engine.volume import Volume

MiB = 1 << 20


def _open_new(tmp_path, backend):
    kw = {"backend": "image", "journal": tmp_path / "j"} if backend == "image" else {}
    volume.create(tmp_path / "v", 64 * MiB, segment_size=1 * MiB, **kw)
    return Volume.open(tmp_path / "v")


@pytest.fixture(params=["lsfs", "image"])
def vol(tmp_path, request):
    v = _open_new(tmp_path, request.param)
    yield v
    if not v.closed:
        v.close()


def log_dir(v):
    """Where the volume's log lives: VOL itself (lsfs), the change-log directory (image)."""
    return Path(v.params.journal) if v.params.backend == "image" else v.path


def reopen(v):
    path = v.path
    v.close()
    return Volume.open(path)


def test_new_volume_reads_zeroes_and_is_one_hole(vol):
    assert vol.read(64 * MiB, 0) == bytes(64 * MiB)
    assert vol.extents(64 * MiB, 0) == [(0, 64 * MiB, 3)]


def test_aligned_write_reads_back(vol):
    data = os.urandom(8192)
    vol.write(data, 4096)
    assert vol.read(8192, 4096) == data
    assert vol.read(4096, 0) == bytes(4096)


@pytest.mark.parametrize("offset,length", [(1, 1), (513, 512), (4095, 2), (4000, 10000), (12287, 4097)])
def test_unaligned_write_keeps_neighbouring_bytes(vol, offset, length):
    base = os.urandom(32768)
    vol.write(base, 0)
    data = os.urandom(length)
    vol.write(data, offset)
    expect = bytearray(base)
    expect[offset:offset + length] = data
    assert vol.read(32768, 0) == bytes(expect)


def test_unaligned_read_of_written_data(vol):
    data = os.urandom(3 * 4096)
    vol.write(data, 0)
    assert vol.read(5000, 3000) == data[3000:8000]


def test_write_larger_than_one_record_and_segment(vol):
    data = os.urandom(6 * MiB)  # > 1024-block records and > 1 MiB segments
    vol.write(data, 5 * MiB)
    assert vol.read(6 * MiB, 5 * MiB) == data
    v2 = reopen(vol)
    try:
        assert v2.read(6 * MiB, 5 * MiB) == data
    finally:
        v2.close()


def test_zero_makes_a_hole_and_reads_zeroes(vol):
    vol.write(os.urandom(1 * MiB), 0)
    vol.zero(512 * 1024, 256 * 1024)
    assert vol.read(512 * 1024, 256 * 1024) == bytes(512 * 1024)
    assert vol.extents(1 * MiB, 0) == [(0, 256 * 1024, 0), (256 * 1024, 512 * 1024, 3),
                                      (768 * 1024, 256 * 1024, 0)]


def test_unaligned_zero_zeroes_exactly_the_range(vol):
    data = os.urandom(16384)
    vol.write(data, 0)
    vol.zero(5000, 1000)
    expect = bytearray(data)
    expect[1000:6000] = bytes(5000)
    assert vol.read(16384, 0) == bytes(expect)


def test_trim_of_whole_blocks_reads_zeroes_partial_blocks_keep_data(vol):
    data = os.urandom(16384)
    vol.write(data, 0)
    vol.trim(10000, 1000)  # whole blocks 1 (4096..8191) only
    got = vol.read(16384, 0)
    assert got[4096:8192] == bytes(4096)
    assert got[:4096] == data[:4096] and got[8192:] == data[8192:]


def test_zero_of_never_written_range_allocates_nothing(vol):
    before = vol.stats()["map_bytes"]
    vol.zero(64 * MiB, 0)
    assert vol.stats()["map_bytes"] == before


def test_request_beyond_the_end_is_einval_and_changes_nothing(vol):
    with pytest.raises(InvalidArgument) as e:
        vol.write(b"x" * 4096, 64 * MiB)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(InvalidArgument):
        vol.read(4097, 64 * MiB - 4096)
    assert vol.extents(64 * MiB, 0) == [(0, 64 * MiB, 3)]


def test_extents_are_contiguous_and_cover_the_request(vol):
    for i in range(0, 40, 3):
        vol.write(os.urandom(4096), i * 4096)
    ext = vol.extents(40 * 4096, 0)
    assert ext[0][0] == 0
    for (o1, n1, t1), (o2, _, t2) in zip(ext, ext[1:], strict=False):
        assert o1 + n1 == o2 and t1 != t2
    assert sum(n for _, n, _ in ext) == 40 * 4096


def test_extents_of_a_16_tib_sparse_volume_are_fast_to_list(tmp_path):
    volume.create(tmp_path / "big", 16 << 40)
    with Volume.open(tmp_path / "big") as v:
        v.write(b"a" * 4096, (8 << 40))
        ext = v.extents(16 << 40, 0)
        assert ext == [(0, 8 << 40, 3), (8 << 40, 4096, 0), ((8 << 40) + 4096, (8 << 40) - 4096, 3)]
        assert v.read(4096, 8 << 40) == b"a" * 4096


def test_data_survives_close_and_reopen(vol):
    data = os.urandom(1 * MiB)
    vol.write(data, 3 * MiB)
    vol.zero(4096, 3 * MiB)
    v2 = reopen(vol)
    try:
        assert v2.read(1 * MiB, 3 * MiB) == bytes(4096) + data[4096:]
    finally:
        v2.close()


def test_flushed_data_survives_a_crash(vol):
    data = os.urandom(256 * 1024)
    vol.write(data, 0)
    vol.flush()
    path = vol.path
    vol.abandon()
    with Volume.open(path) as v:
        assert v.read(256 * 1024, 0) == data


def test_fua_write_survives_a_crash(vol):
    data = os.urandom(4096)
    vol.write(data, 8192, fua=True)
    path = vol.path
    vol.abandon()
    with Volume.open(path) as v:
        assert v.read(4096, 8192) == data


def test_unflushed_write_is_wholly_present_or_absent_after_a_crash(vol):
    old = os.urandom(64 * 1024)
    vol.write(old, 0)
    vol.flush()
    new = os.urandom(64 * 1024)
    vol.write(new, 0)
    path = vol.path
    vol.abandon()
    with Volume.open(path) as v:
        assert v.read(64 * 1024, 0) in (old, new)


def test_collector_reclaims_overwritten_space(vol):
    data = os.urandom(4 * MiB)
    for _ in range(8):
        vol.write(data, 0)
    vol.flush()
    assert vol.stats()["used_bytes"] > 20 * MiB
    vol.collect()
    st = vol.stats()
    assert st["used_bytes"] <= 1.3 * st["live_blocks"] * 4096 + 2 * MiB
    assert vol.read(4 * MiB, 0) == data


def test_collector_keeps_data_across_reopen(vol):
    a, b = os.urandom(2 * MiB), os.urandom(2 * MiB)
    vol.write(a, 0)
    vol.write(b, 8 * MiB)
    for _ in range(4):
        vol.write(os.urandom(2 * MiB), 0)
    vol.write(a, 0)
    vol.collect()
    v2 = reopen(vol)
    try:
        assert v2.read(2 * MiB, 0) == a and v2.read(2 * MiB, 8 * MiB) == b
    finally:
        v2.close()


def test_compressed_volume_roundtrip_and_saves_space(tmp_path):
    volume.create(tmp_path / "c", 64 * MiB, compress="zstd")
    text = (b"blockrep compresses repetitive data well. " * 200)[: 1 * MiB]
    text = text + bytes(1 * MiB - len(text))
    with Volume.open(tmp_path / "c") as v:
        for i in range(8):
            v.write(text, i * MiB)
        v.write(b"z" * 100, 12345)
        v.flush()
        assert v.stats()["used_bytes"] < 2 * MiB
    with Volume.open(tmp_path / "c") as v:
        expect = bytearray(text)
        expect[12345:12445] = b"z" * 100
        assert v.read(1 * MiB, 0) == bytes(expect)
        assert v.read(1 * MiB, 7 * MiB) == text


def test_second_open_is_refused_while_owned(vol):
    with pytest.raises(VolumeBusy):
        Volume.open(vol.path)


def test_create_refuses_existing_nonempty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(AlreadyExists):
        volume.create(tmp_path / "x", MiB)
    assert (tmp_path / "x" / "file").read_text() == "keep me"


@pytest.mark.parametrize("size", [0, -4096, 1000, (16 << 40) + 4096])
def test_create_refuses_bad_sizes(tmp_path, size):
    with pytest.raises(InvalidArgument):
        volume.create(tmp_path / "x", size)
    assert not (tmp_path / "x").exists()


def test_open_refuses_unknown_format_version(tmp_path):
    volume.create(tmp_path / "v", MiB)
    meta = tmp_path / "v" / "volume.json"
    raw = json.loads(meta.read_text())
    raw["format_version"] = 99
    meta.write_text(json.dumps(raw))
    with pytest.raises(UnsupportedFormat, match="format version 99"):
        Volume.open(tmp_path / "v")


def test_open_of_missing_volume_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        Volume.open(tmp_path / "nothing")


def test_map_memory_is_at_most_16_bytes_per_written_block_plus_constant(tmp_path):
    volume.create(tmp_path / "m", 1 << 30)
    with Volume.open(tmp_path / "m") as v:
        v.write(os.urandom(MiB) * 64, 0)  # 64 MiB = 16384 blocks, written densely
        st = v.stats()
        blocks = 64 * MiB // 4096
        assert st["map_bytes"] <= 16 * blocks + 64 * 1024


def test_collector_keeps_blocks_only_a_snapshot_references(vol):
    old = os.urandom(2 * MiB)
    vol.write(old, 0)
    snap = vol.snapshot_create("keep")
    for _ in range(4):
        vol.write(os.urandom(2 * MiB), 0)
    vol.collect(ratio=1.0)
    assert vol.snapshot_read(snap["id"], 2 * MiB, 0) == old
    v2 = reopen(vol)
    try:
        assert v2.snapshot_read(snap["id"], 2 * MiB, 0) == old
    finally:
        v2.close()


def test_deleting_a_snapshot_lets_the_collector_reclaim_its_data(vol):
    vol.write(os.urandom(4 * MiB), 0)
    vol.snapshot_create("old")
    vol.write(os.urandom(4 * MiB), 0)
    vol.collect()
    held = vol.stats()["used_bytes"]
    assert held > 8 * MiB
    vol.snapshot_delete("old")
    vol.collect()
    assert vol.stats()["used_bytes"] < held - 3 * MiB


def test_checkpoint_keeps_leaves_shared_between_snapshots_and_head(tmp_path):
    volume.create(tmp_path / "s", 256 * MiB)
    with Volume.open(tmp_path / "s") as v:
        v.write(os.urandom(MiB) * 64, 0)
        for i in range(10):
            v.snapshot_create(f"s{i}")
        v.write(b"z" * 4096, 0)  # copies one leaf
        before = v.stats()["map_bytes"]
    with Volume.open(tmp_path / "s") as v:
        assert len(v.snapshots()) == 10
        assert v.stats()["map_bytes"] == before
        assert (tmp_path / "s" / "checkpoint").stat().st_size < 3 * 64 * MiB // 4096 * 16


def test_snapshots_taken_after_the_checkpoint_come_back_after_a_crash(vol):
    a = os.urandom(64 * 1024)
    vol.write(a, 0)
    vol.checkpoint()
    snap = vol.snapshot_create("after-ckpt")
    vol.write(os.urandom(64 * 1024), 0)
    path = vol.path
    vol.abandon()
    with Volume.open(path) as v:
        assert [s["name"] for s in v.snapshots()] == ["after-ckpt"]
        assert v.snapshot_read(snap["id"], 64 * 1024, 0) == a


def test_diff_since_creation_and_between_snapshots(vol):
    vol.write(b"a" * 4096, 0)
    a = vol.snapshot_create("a")
    vol.write(b"b" * 8192, 1 * MiB)
    vol.trim(4096, 0)
    vol.zero(4096, 5 * MiB)  # never written: no change
    b = vol.snapshot_create("b")
    assert vol.diff_ids(None, a["id"]) == [(0, 4096)]
    assert vol.diff("a", "b") == [(0, 4096), (1 * MiB, 8192)]
    assert vol.diff_ids(b["id"], 0) == []


def test_crash_after_the_collector_moved_a_block_only_a_snapshot_holds_keeps_the_head(tmp_path):
    """Regression: replaying the collector's RELOC record of a block that only a snapshot still
    held put the snapshot's old bytes into the head (and into later snapshots)."""
    volume.create(tmp_path / "r", 16 * MiB, segment_size=1 * MiB)
    v = Volume.open(tmp_path / "r")
    v.write(b"A" * 4096, 0)
    v.write(b"X" * (MiB - 4096), 4096)
    v.write(b"Y" * (MiB - 4096), 4096)  # the first segment becomes mostly dead
    s1 = v.snapshot_create("s1")
    v.write(b"B" * 4096, 0)
    v.flush()
    active = v.stats()["active_segment"]
    for seg in sorted(int(p.stem, 16) for p in (v.path / "segments").glob("*.seg")):
        if seg < active:  # relocate every sealed segment, and crash before any checkpoint
            assert v._n.lib.vol_gc_segment(v._v, seg) == 0
    s2 = v.snapshot_create("s2")
    path = v.path
    v.abandon()
    with Volume.open(path) as v:
        assert v.read(4096, 0) == b"B" * 4096
        assert v.snapshot_read(s2["id"], 4096, 0) == b"B" * 4096
        assert v.snapshot_read(s1["id"], 4096, 0) == b"A" * 4096


# ------------------------------------------------- snapshot identity: uuid and flags (FORMAT.md §8)

def _crc32c(data: bytes) -> int:
    from engine import _native
    return _native.lib.crc32c_extend(0, _native.ffi.from_buffer(data), len(data))


def _identity(v) -> list[tuple]:
    return [(s["id"], s["name"], s["uuid"], s["flags"]) for s in v.snapshots()]


def test_snapshot_uuid_and_flags_survive_close_and_reopen(vol):
    given = "C0FFEE00-1234-4ABC-8DEF-0123456789AB"
    vol.write(b"a" * 4096, 0)
    a = vol.snapshot_create("a")
    b = vol.snapshot_create("b", uuid=given, flags=0xDEADBEEF)
    assert b["uuid"] == given.lower() and b["flags"] == 0xDEADBEEF
    assert a["flags"] == 0 and uuid.UUID(a["uuid"]).version == 4
    before = _identity(vol)
    v2 = reopen(vol)  # close writes a checkpoint (version 3): the maps come from it, no replay
    try:
        assert (log_dir(v2) / "checkpoint").read_bytes()[4:8] == struct.pack("<I", 3)
        assert v2.recovery["records_replayed"] == 0
        assert _identity(v2) == before
        assert v2.snapshot_by_uuid(given)["name"] == "b"
        assert v2.snapshot_read(a["id"], 4096, 0) == b"a" * 4096
    finally:
        v2.close()


def test_snapshot_uuid_and_flags_survive_a_crash_before_any_checkpoint(tmp_path):
    volume.create(tmp_path / "c", 16 * MiB, segment_size=1 * MiB)
    v = Volume.open(tmp_path / "c")
    v.write(b"x" * 8192, 0)
    v.snapshot_create("one", flags=1)
    v.snapshot_create("two", uuid=str(uuid.uuid4()), flags=0xFFFFFFFF)
    v.write(b"y" * 4096, 0)
    before = _identity(v)
    v.abandon()  # a crash: no checkpoint was ever written, the SNAP records are replayed
    assert not (tmp_path / "c" / "checkpoint").exists()
    with Volume.open(tmp_path / "c") as v:
        assert v.recovery["records_replayed"] > 0
        assert _identity(v) == before
    with Volume.open(tmp_path / "c") as v:  # and once more, now from the checkpoint
        assert _identity(v) == before


def test_snapshot_uuids_are_random_version_4_and_unique(tmp_path):
    seen = set()
    for name in ("p", "q"):
        volume.create(tmp_path / name, 16 * MiB)
        with Volume.open(tmp_path / name) as v:
            for i in range(20):
                u = uuid.UUID(v.snapshot_create(f"s{i}")["uuid"])
                assert u.version == 4 and u.variant == uuid.RFC_4122, u
                assert str(u) not in seen
                seen.add(str(u))
    assert len(seen) == 40


def test_given_snapshot_uuid_is_kept_and_found(vol):
    u = uuid.uuid4()
    s = vol.snapshot_create("mine", uuid=str(u).upper(), flags=5)
    assert s["uuid"] == str(u)  # canonical: lowercase, hyphenated
    assert vol.snapshot_by_uuid(str(u)) == s
    assert vol.snapshot_by_uuid("{" + str(u).upper() + "}") == s
    with pytest.raises(NotFound, match="no snapshot with uuid"):
        vol.snapshot_by_uuid(str(uuid.uuid4()))
    with pytest.raises(InvalidArgument, match="invalid snapshot uuid"):
        vol.snapshot_by_uuid("not-a-uuid")


def test_duplicate_snapshot_uuid_is_refused_and_nothing_changes(vol):
    u = str(uuid.uuid4())
    vol.write(b"a" * 4096, 0)
    vol.snapshot_create("first", uuid=u, flags=3)
    vol.write(b"b" * 4096, 0)
    vol.flush()
    snaps, st = vol.snapshots(), vol.stats()
    segs = {p.name: p.stat().st_size for p in (log_dir(vol) / "segments").iterdir()}
    with pytest.raises(AlreadyExists, match=f"uuid {u} already exists \\(named first\\)"):
        vol.snapshot_create("second", uuid=u.upper())
    with pytest.raises(AlreadyExists, match="named first already exists"):
        vol.snapshot_create("first", uuid=str(uuid.uuid4()))
    assert vol.snapshots() == snaps
    after = vol.stats()
    assert (after["gen"], after["next_seq"]) == (st["gen"], st["next_seq"])
    assert {p.name: p.stat().st_size for p in (log_dir(vol) / "segments").iterdir()} == segs
    v2 = reopen(vol)
    try:
        assert v2.snapshots() == snaps
        assert v2.read(4096, 0) == b"b" * 4096
    finally:
        v2.close()


@pytest.mark.parametrize("kwargs,match", [
    ({"uuid": "00000000-0000-0000-0000-000000000000"}, "nil uuid"),
    ({"uuid": "1234"}, "invalid snapshot uuid"),
    ({"uuid": 12}, "invalid snapshot uuid"),
    ({"flags": -1}, "flags"),
    ({"flags": 1 << 32}, "flags"),
    ({"flags": "1"}, "flags"),
    ({"created_ns": -1}, "creation time"),
], ids=["nil", "short", "int", "negative-flags", "wide-flags", "str-flags", "negative-time"])
def test_bad_snapshot_uuid_or_flags_are_refused_and_change_nothing(vol, kwargs, match):
    st = vol.stats()
    with pytest.raises(InvalidArgument, match=match):
        vol.snapshot_create("s", **kwargs)
    assert vol.snapshots() == []
    assert vol.stats()["next_seq"] == st["next_seq"]


def _legacy_uuid(v, s, created_ns: int) -> str:
    return str(uuid.uuid5(uuid.UUID(v.params.uuid), f"snapshot-{s['id']}-{created_ns}"))


def _checkpoint_to_v2(path) -> None:
    """Rewrite a version 3 checkpoint as version 2 (96-byte map headers), per FORMAT.md §4."""
    d = path.read_bytes()
    assert d[:8] == struct.pack("<II", 0x4B435242, 3)
    nmaps, nsegs = struct.unpack_from("<II", d, 52)
    pos = 64 + 16 * nsegs
    pos += 8 + struct.unpack_from("<Q", d, pos)[0] * (8 + 512 * 16)
    out = bytearray(d[:pos])
    struct.pack_into("<I", out, 4, 2)
    for _ in range(nmaps):
        nleaves = struct.unpack_from("<Q", d, pos + 88)[0]
        out += d[pos:pos + 84] + bytes(4) + d[pos + 88:pos + 96] + d[pos + 112:pos + 112 + 4 * nleaves]
        pos += 112 + 4 * nleaves
    assert pos == len(d) - 4
    out += struct.pack("<I", _crc32c(bytes(out)))
    path.write_bytes(bytes(out))


def _snap_records_to_96(segdir) -> int:
    """Rewrite every 112-byte SNAP record as the older 96-byte one (FORMAT.md §3); returns how many."""
    n = 0
    for seg in sorted(segdir.glob("*.seg")):
        d = seg.read_bytes()
        out, pos = bytearray(d[:64]), 64
        while pos + 48 <= len(d) and d[pos:pos + 4] == struct.pack("<I", 0x43525242):
            typ, fl = d[pos + 8], d[pos + 9]
            nblocks, plen = struct.unpack_from("<II", d, pos + 12)
            k = (1 if fl & 1 else nblocks) if typ in (1, 4) else 1 if typ in (6, 7) else 0
            rec = d[pos:pos + 48 + 4 * k + plen]
            if typ == 6 and plen == 112:
                payload = rec[52:52 + 84] + bytes(12)  # no flags, no uuid
                hdr = bytearray(rec[:48])
                struct.pack_into("<I", hdr, 16, 96)
                crc = struct.pack("<I", _crc32c(payload))
                struct.pack_into("<I", hdr, 4, _crc32c(bytes(hdr[8:]) + crc))
                rec = bytes(hdr) + crc + payload
                n += 1
            out += rec
            pos += 48 + 4 * k + plen
        seg.write_bytes(bytes(out))  # the records after a rewritten one move up 16 bytes
    return n


def test_volume_with_a_version_2_checkpoint_still_opens(tmp_path):
    volume.create(tmp_path / "old", 16 * MiB, segment_size=1 * MiB)
    with Volume.open(tmp_path / "old") as v:
        v.write(b"1" * 4096, 0)
        a = v.snapshot_create("a", created_ns=1)
        v.write(b"2" * 4096, 0)
        b = v.snapshot_create("b", created_ns=(1 << 64) - 1, flags=9)
        v.write(b"3" * 4096, 0)
    _checkpoint_to_v2(tmp_path / "old" / "checkpoint")
    with Volume.open(tmp_path / "old") as v:
        want = [(a["id"], "a", _legacy_uuid(v, a, 1), 0), (b["id"], "b", _legacy_uuid(v, b, (1 << 64) - 1), 0)]
        assert _identity(v) == want  # version 2 has no uuid or flags: derived, 0
        assert v.snapshot_read(a["id"], 4096, 0) == b"1" * 4096
        assert v.snapshot_read(b["id"], 4096, 0) == b"2" * 4096
        assert v.read(4096, 0) == b"3" * 4096
        with pytest.raises(AlreadyExists, match="uuid"):  # a derived uuid is an identity too
            v.snapshot_create("c", uuid=want[0][2])
    assert (tmp_path / "old" / "checkpoint").read_bytes()[4:8] == struct.pack("<I", 3)
    with Volume.open(tmp_path / "old") as v:  # now stored in a version 3 checkpoint
        assert _identity(v) == want


def test_volume_with_96_byte_snap_records_still_opens(tmp_path):
    volume.create(tmp_path / "old", 16 * MiB, segment_size=1 * MiB)
    v = Volume.open(tmp_path / "old")
    v.write(b"1" * 4096, 0)
    a = v.snapshot_create("a", created_ns=1_700_000_000_123_456_789, flags=4)
    v.write(b"2" * 4096, 0)
    b = v.snapshot_create("b", created_ns=5)
    v.write(b"3" * 4096, 0)
    v.flush()
    v.abandon()  # no checkpoint: everything is replayed from the log
    assert _snap_records_to_96(tmp_path / "old" / "segments") == 2
    with Volume.open(tmp_path / "old") as v:
        assert v.recovery["torn_bytes_dropped"] == 0 and v.recovery["skipped_bytes"] == 0
        want = [(a["id"], "a", _legacy_uuid(v, a, 1_700_000_000_123_456_789), 0),
                (b["id"], "b", _legacy_uuid(v, b, 5), 0)]
        assert _identity(v) == want
        assert v.snapshot_read(a["id"], 4096, 0) == b"1" * 4096
        assert v.snapshot_read(b["id"], 4096, 0) == b"2" * 4096
        assert v.read(4096, 0) == b"3" * 4096
    with Volume.open(tmp_path / "old") as v:  # the checkpoint written at close keeps them
        assert _identity(v) == want


def test_two_checkpoints_at_once_take_turns_and_the_volume_reopens(tmp_path):
    """The maintain thread and a control-socket flush may checkpoint at the same moment; both
    write checkpoint.tmp with the lock dropped: they must not interleave in one file (issue 8)."""
    import threading

    p = tmp_path / "v"
    volume.create(p, 64 << 20, segment_size=1 << 20)
    expect = {}
    with Volume.open(p) as v:
        for i in range(64):
            v.snapshot_create(f"s{i}") if i % 8 == 0 else None
            data = bytes([i + 1]) * 65536
            v.write(data, i * 65536 * 3)
            expect[i * 65536 * 3] = data
        stop = threading.Event()
        errors: list[BaseException] = []

        def checkpointer():
            try:
                while not stop.is_set():
                    v.checkpoint()
            except BaseException as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=checkpointer) for _ in range(3)]
        for t in threads:
            t.start()
        for k in range(200):  # writes between the checkpoints keep the maps changing
            v.write(bytes([k % 251 + 1]) * 4096, (64 << 20) - 4096 * (k % 64 + 1))
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        for k in range(64):
            expect[(64 << 20) - 4096 * (k + 1)] = v.read(4096, (64 << 20) - 4096 * (k + 1))
        v.abandon()  # a crash right after: the last checkpoint must be whole
    with Volume.open(p, readonly=True) as v:
        for off, data in expect.items():
            assert v.read(len(data), off) == data, off
        assert len(v.snapshots()) == 8
