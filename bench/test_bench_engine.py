"""In-process benchmarks of the engine and its C units (pytest-benchmark).

Run: .venv/bin/python -m pytest bench/test_bench_engine.py --benchmark-only
Each figure has its anchor measured in the same run (a bytearray for the per-request cost, the
volume's own live data for disk use, ...); bench/README.md says how each is made. Ratios are
printed and kept in the benchmark's extra_info.
"""

import os
import random

import pytest

from engine import volume
from engine.volume import Volume

MiB = 1 << 20
BS = 4096
N_OPS = 20000


@pytest.fixture
def vol(tmp_path):
    volume.create(tmp_path / "v", 1 << 30)
    v = Volume.open(tmp_path / "v")
    yield v
    v.close()


def _offsets(n, blocks=(1 << 30) // BS, seed=1):
    rnd = random.Random(seed)
    return [rnd.randrange(blocks) * BS for _ in range(n)]


def test_bench_4k_random_write_anchor_bytearray(benchmark):
    """Anchor: the per-request work of the Python-plugin ceiling (one slice copy)."""
    disk = bytearray(1 << 30)
    data = memoryview(os.urandom(BS))
    offs = _offsets(N_OPS)

    def run():
        for o in offs:
            disk[o:o + BS] = data
    benchmark(run)


def test_bench_4k_random_write_engine(benchmark, vol):
    """The plugin's pwrite body: one cffi call (crc32c, append to the window, map update)."""
    lib, ffi, h = vol._n.lib, vol._n.ffi, vol._v
    data = memoryview(bytearray(os.urandom(BS)))
    offs = _offsets(N_OPS)
    fb = ffi.from_buffer

    def run():
        for o in offs:
            lib.vol_write(h, fb(data), BS, o, 0)
    benchmark(run)


def test_bench_4k_random_read_engine(benchmark, vol):
    lib, ffi, h = vol._n.lib, vol._n.ffi, vol._v
    vol.write(os.urandom(64 * MiB), 0)
    buf = bytearray(BS)
    offs = _offsets(N_OPS, blocks=64 * MiB // BS)
    fb = ffi.from_buffer

    def run():
        for o in offs:
            lib.vol_read(h, fb(buf, require_writable=True), BS, o)
    benchmark(run)


def test_bench_crc32c_4k(benchmark):
    from engine import _native
    buf = _native.ffi.from_buffer(os.urandom(BS))
    f = _native.lib.crc32c_extend
    benchmark(lambda: [f(0, buf, BS) for _ in range(1000)])


def test_bench_extents_of_1_tib_volume(benchmark, tmp_path):
    """Block status over a whole 1 TiB volume with 10,000 scattered written blocks."""
    volume.create(tmp_path / "t", 1 << 40)
    with Volume.open(tmp_path / "t") as v:
        for o in _offsets(10000, blocks=(1 << 40) // BS):
            v.write(b"x" * BS, o)
        def run():
            pos, n = 0, 0
            while pos < v.size:
                ext = v.extents(v.size - pos, pos, 100000)
                n += len(ext)
                pos = ext[-1][0] + ext[-1][1]
            return n
        n = benchmark(run)
        assert n >= 10000


def test_bench_recovery_seconds_per_gib_of_log(benchmark, tmp_path, monkeypatch):
    """Open after a crash with 512 MiB of log since the last checkpoint (target <= 2 s/GiB)."""
    monkeypatch.setattr(volume, "REPLAY_CHECKPOINT", 1 << 62)  # measure replay, every round
    p = tmp_path / "r"
    volume.create(p, 2 << 30)
    v = Volume.open(p)
    chunk = os.urandom(MiB)
    for i in range(512):
        v.write(chunk, i * MiB)
    v.flush()
    v.abandon()
    log_bytes = sum(f.stat().st_size for f in (p / "segments").glob("*.seg"))

    def run():
        w = Volume.open(p)
        w.abandon()
    benchmark.pedantic(run, rounds=3, iterations=1)
    per_gib = benchmark.stats.stats.median / (log_bytes / (1 << 30))
    benchmark.extra_info["seconds_per_gib"] = per_gib
    print(f"\nrecovery: {per_gib:.2f} s per GiB of log (target <= 2)")


def test_bench_disk_use_after_overwrites(benchmark, tmp_path):
    """Overwrite 64 MiB of live data 8 times at random, collect: disk use / live data (<= 1.3)."""
    p = tmp_path / "o"
    volume.create(p, 256 * MiB)
    with Volume.open(p) as v:
        data = os.urandom(64 * 1024)
        rnd = random.Random(3)
        for _ in range(8 * 64 * MiB // len(data)):
            v.write(data, rnd.randrange(64 * MiB // len(data)) * len(data))
        benchmark.pedantic(v.collect, rounds=1, iterations=1)
        st = v.stats()
        ratio = st["used_bytes"] / (st["live_blocks"] * BS)
        benchmark.extra_info["disk_use_ratio"] = ratio
        print(f"\ndisk use after overwrites and collection: {ratio:.2f} x live data (target <= 1.3)")
        assert ratio < 2


def test_bench_memory_per_written_block(benchmark, tmp_path):
    p = tmp_path / "m"
    volume.create(p, 1 << 30)
    with Volume.open(p) as v:
        benchmark.pedantic(lambda: v.write(os.urandom(MiB) * 256, 0), rounds=1, iterations=1)
        per_block = v.stats()["map_bytes"] / (256 * MiB // BS)
        benchmark.extra_info["map_bytes_per_block"] = per_block
        print(f"\nblock map: {per_block:.1f} bytes per written 4 KiB block (target <= 16)")


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_bench_compression_write_speed_and_space(benchmark, tmp_path, compress):
    """1 MiB writes of text-like data: MB/s and bytes stored per byte written, with and without zstd."""
    p = tmp_path / compress
    volume.create(p, 1 << 30, compress=compress)
    words = [os.urandom(4).hex() for _ in range(2000)]
    rnd = random.Random(5)
    text = " ".join(rnd.choice(words) for _ in range(300000)).encode()[:MiB]
    with Volume.open(p) as v:
        state = {"i": 0}

        def run():
            v.write(text, (state["i"] % 256) * MiB)
            state["i"] += 1
        benchmark.pedantic(run, rounds=128, iterations=1)
        v.flush()
        st = v.stats()
        stored = st["stored_data_bytes"] / (st["live_blocks"] * BS)
        benchmark.extra_info["stored_per_written"] = stored
        print(f"\n{compress}: stored {stored:.2f} bytes per byte written, "
              f"{MiB / benchmark.stats.stats.median / 1e6:.0f} MB/s")


def test_bench_checkpoint_of_1_gib_written(benchmark, vol):
    vol.write(os.urandom(MiB) * 1024, 0)
    benchmark.pedantic(vol.checkpoint, rounds=3, iterations=1)


@pytest.mark.parametrize("written_mib", [32, 2048])
def test_bench_snapshot_create_vs_data_written(benchmark, tmp_path, written_mib):
    """Snapshot create after 32 MiB vs 2 GiB written (and flushed): must be flat (<= 1.5x)."""
    p = tmp_path / "s"
    volume.create(p, 4 << 30)
    with Volume.open(p) as v:
        chunk = os.urandom(MiB)
        for i in range(written_mib):
            v.write(chunk, i * MiB)
        v.flush()
        n = {"i": 0}

        def run():
            n["i"] += 1
            v.snapshot_create(f"s{n['i']}")
            v.write(b"x" * BS, n["i"] * BS)  # one change between snapshots, as in real use
        benchmark.pedantic(run, rounds=20, iterations=1)
        ms = benchmark.stats.stats.median * 1000
        benchmark.extra_info["median_ms"] = ms
        print(f"\nsnapshot create after {written_mib} MiB written: {ms:.2f} ms (median of 20)")


def test_bench_diff_of_1_tib_volume(benchmark, tmp_path):
    """Changed extents between two snapshots of a 1 TiB volume, 10,000 scattered 4 KiB writes
    before the first and 10,000 between them (target <= 50 ms)."""
    volume.create(tmp_path / "d", 1 << 40)
    with Volume.open(tmp_path / "d") as v:
        for o in _offsets(10000, blocks=(1 << 40) // BS, seed=1):
            v.write(b"a" * BS, o)
        a = v.snapshot_create("a")
        for o in _offsets(10000, blocks=(1 << 40) // BS, seed=2):
            v.write(b"b" * BS, o)
        b = v.snapshot_create("b")
        ext = benchmark(v.diff_ids, a["id"], b["id"])
        assert len(ext) >= 9000
        print(f"\ndiff on 1 TiB: {benchmark.stats.stats.median * 1000:.1f} ms for {len(ext)} extents (target <= 50)")


def test_bench_disk_use_after_snapshot_delete_and_overwrite(benchmark, tmp_path):
    """64 MiB written, snapshot, all of it overwritten, snapshot deleted, collector: disk use / live."""
    p = tmp_path / "g"
    volume.create(p, 256 * MiB)
    with Volume.open(p) as v:
        for i in range(64):
            v.write(os.urandom(MiB), i * MiB)
        v.snapshot_create("old")
        for i in range(64):
            v.write(os.urandom(MiB), i * MiB)
        held = v.stats()["used_bytes"]
        v.snapshot_delete("old")
        benchmark.pedantic(v.collect, rounds=1, iterations=1)
        st = v.stats()
        ratio = st["used_bytes"] / (st["live_blocks"] * BS)
        benchmark.extra_info["disk_use_ratio"] = ratio
        print(f"\nwith the snapshot: {held / MiB:.0f} MiB on disk; after delete + collector: "
              f"{ratio:.2f} x live data")
        assert ratio < 1.5
