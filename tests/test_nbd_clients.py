"""Real NBD clients against a real `blockrep serve` (nbdkit + the Python plugin + the C engine).

Clients: nbdinfo, qemu-io, qemu-img, nbdcopy (command line) and libnbd's Python module `nbd`.
Covers M1 of DESIGN.md, R6 (fsx-style random I/O with a shadow buffer, unaligned offsets, odd
lengths, restarts along the way), R11 (flush/FUA survive SIGKILL; multi-conn visibility) and the
"clean error, server survives" part of R16 for out-of-range requests.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time

import nbd
import pytest
from conftest import backend_create_args, pid_alive

MiB = 1 << 20
BS = 4096
HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def run(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def qemu_io(uri, *commands, check=True):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = run(*args, uri, check=check)
    if check:
        assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def nbdinfo_json(*args):
    return json.loads(run("nbdinfo", "--json", *args).stdout)


def nbd_map(uri):
    """nbdinfo --map as [(offset, length, type)]."""
    return [(e["offset"], e["length"], e["type"])
            for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout)]


def type_at(extents, offset):
    for o, n, t in extents:
        if o <= offset < o + n:
            return t
    raise AssertionError(f"offset {offset} not covered by {extents}")


def read_all(h, size, chunk=8 * MiB) -> bytearray:
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return out


def first_difference(a, b) -> int:
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def block_status(h, count, offset) -> list[tuple[int, int, int]]:
    """base:allocation extents from offset as [(offset, length, flags)]."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb)
    return out


def connect(uri, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


# ------------------------------------------------------------------------------------- nbdinfo

def test_nbdinfo_reports_size_and_capabilities(make_server):
    s = make_server(size="48M")
    info = nbdinfo_json(s.uri)
    (exp,) = info["exports"]
    assert exp["export-size"] == 48 * MiB
    assert exp["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn"):
        assert exp[flag] is True, flag
    assert "base:allocation" in exp["contexts"]
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_maximum"] >= 32 * MiB


def test_nbdinfo_list_shows_live_export_with_volume_uuid(server):
    uuid = server.info()["uuid"]
    info = nbdinfo_json("--list", server.uri)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert "" in exports, exports.keys()
    assert uuid in exports[""]["description"]
    assert exports[""]["export-size"] == 64 * MiB


def test_unknown_export_name_is_refused_and_server_survives(server):
    r = run("nbdinfo", f"nbd+unix:///no-such-export?socket={server.sock}", check=False)
    assert r.returncode != 0
    assert server.running
    assert nbdinfo_json(server.uri)["exports"][0]["export-size"] == 64 * MiB


def test_nbdinfo_map_shows_holes_and_data(server):
    uri = server.uri
    assert nbd_map(uri) == [(0, 64 * MiB, HOLE)], "a new volume is one hole"
    h = server.connect()
    h.pwrite(os.urandom(256 * 1024), 4 * MiB)
    m = nbd_map(uri)
    assert type_at(m, 4 * MiB) == 0 and type_at(m, 4 * MiB + 256 * 1024 - 1) == 0
    assert type_at(m, 4 * MiB - 1) == HOLE and type_at(m, 4 * MiB + 256 * 1024) == HOLE
    assert type_at(m, 0) == HOLE and type_at(m, 64 * MiB - 1) == HOLE
    # trim the first 64K, zero the next 64K: both read as holes; the rest stays data
    h.trim(64 * 1024, 4 * MiB)
    h.zero(64 * 1024, 4 * MiB + 64 * 1024)
    m = nbd_map(uri)
    assert type_at(m, 4 * MiB) == HOLE and type_at(m, 4 * MiB + 100 * 1024) == HOLE
    assert type_at(m, 4 * MiB + 128 * 1024) == 0
    assert h.pread(128 * 1024, 4 * MiB) == bytes(128 * 1024)
    # extents are contiguous, ascending and cover the whole export
    pos = 0
    for o, n, _t in m:
        assert o == pos and n > 0
        pos += n
    assert pos == 64 * MiB


# -------------------------------------------------------------------------------------- qemu-io

def test_qemu_io_unaligned_and_odd_length_writes(server):
    uri = server.uri
    cases = [  # (pattern, offset, length)
        (0x11, 513, 512), (0x22, 1025, 1), (0x33, 4095, 2), (0x44, 8191, 4097),
        (0x55, 12289, 3), (0x66, 65535, 65537), (0x77, 1, 1), (0x88, 64 * MiB - 1, 1),
        (0x99, 64 * MiB - 4097, 4095), (0xAA, 1 * MiB + 7, 333333),
    ]
    shadow = bytearray(64 * MiB)
    cmds = []
    for pat, off, n in cases:
        cmds.append(f"write -P {pat:#x} {off} {n}")
        shadow[off:off + n] = bytes([pat]) * n
    qemu_io(uri, *cmds)
    # re-read with qemu-io patterns (each case not overwritten by a later one)
    checks = []
    for i, (pat, off, n) in enumerate(cases):
        if all(off + n <= o2 or o2 + n2 <= off for _p, o2, n2 in cases[i + 1:]):
            checks.append(f"read -P {pat:#x} {off} {n}")
    qemu_io(uri, *checks)
    # and byte for byte with libnbd, including every neighbour byte that must be untouched
    h = server.connect()
    got = read_all(h, 64 * MiB)
    assert got == shadow, f"first difference at {first_difference(got, shadow)}"


def test_qemu_io_zero_and_discard(server):
    uri = server.uri
    qemu_io(uri, "write -P 0xcd 0 1M", "write -z 1000 3000", "write -z 65536 131072",
            "discard 262144 262144", "write -z -u 524288 65536")
    qemu_io(uri, "read -P 0xcd 0 1000", "read -P 0 1000 3000", "read -P 0xcd 4000 61536",
            "read -P 0 65536 131072", "read -P 0xcd 196608 65536",
            "read -P 0 262144 262144",  # blockrep reads trimmed blocks as zeroes
            "read -P 0 524288 65536", "read -P 0xcd 589824 458752")
    m = nbd_map(uri)
    assert type_at(m, 65536) == HOLE and type_at(m, 262144) == HOLE
    assert type_at(m, 0) == 0 and type_at(m, 196608) == 0


def test_qemu_io_fua_write_survives_sigkill(server):
    qemu_io(server.uri, "write -f -P 0x5f 12345 54321")
    server.kill()
    server.start()
    qemu_io(server.uri, "read -P 0x5f 12345 54321", "read -P 0 0 12345")


def test_qemu_io_flush_makes_writes_survive_sigkill(server):
    qemu_io(server.uri, "write -P 0x61 0 1M", "write -P 0x62 3M 5", "write -z 4096 4096",
            "aio_write -P 0x63 5M 64k", "aio_flush", "flush")
    server.kill()
    server.start()
    qemu_io(server.uri, "read -P 0x61 0 4096", "read -P 0 4096 4096",
            "read -P 0x61 8192 1040384", "read -P 0x62 3M 5", "read -P 0x63 5M 64k")


def test_unaligned_zero_and_trim_survive_sigkill(server):
    """Unaligned write-zeroes are stored as partial-block writes plus tombstones: after a kill
    (no clean close), recovery must replay all of them, exactly."""
    h = server.connect()
    rnd = random.Random(8)
    shadow = bytearray(rnd.randbytes(4 * MiB))
    h.pwrite(shadow, 0)
    h.flush()
    for off, n, flags in [(1234, 300000, nbd.CMD_FLAG_FUA), (1 * MiB + 4095, 4098, 0),
                          (2 * MiB + 1, 1, nbd.CMD_FLAG_FUA), (3 * MiB - 100, 200 * 1024, 0)]:
        h.zero(n, off, flags)
        shadow[off:off + n] = bytes(n)
    h.trim(10000, 3 * MiB + 500000)  # covers blocks 855..857 whole; partial edges keep data
    a, b = -(-(3 * MiB + 500000) // BS) * BS, (3 * MiB + 510000) // BS * BS
    shadow[a:b] = bytes(b - a)
    h.flush()
    assert h.pread(4 * MiB, 0) == shadow
    server.kill()
    server.start()
    got = server.connect().pread(4 * MiB, 0)
    assert got == shadow, f"first difference at {first_difference(got, shadow)}"


def test_clean_stop_keeps_unflushed_writes(server):
    qemu_io(server.uri, "write -P 0x71 777 7777")  # no flush: a clean stop must write it
    server.stop()
    server.start()
    qemu_io(server.uri, "read -P 0x71 777 7777")


# ---------------------------------------------------------------------------- qemu-img, nbdcopy

def _sparse_random_image(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(24):
            off = rnd.randrange(0, size - 300000)
            f.seek(off)
            f.write(rnd.randbytes(rnd.randrange(1, 300000)))
        f.seek(size - 1)
        f.write(b"\x01")


def test_qemu_img_convert_and_compare(server, tmp_path):
    src = tmp_path / "src.raw"
    _sparse_random_image(src, 64 * MiB, seed=1)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert out.read_bytes() == src.read_bytes()
    # compare must notice a one-byte difference (so the check above means something)
    h = server.connect()
    h.pwrite(b"\xee", 40 * MiB + 3)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri, check=False)
    assert r.returncode == 1 and "mismatch" in r.stdout, r.stdout + r.stderr
    where = int(r.stdout.split("offset")[1].strip(" !\n"))
    assert 40 * MiB <= where <= 40 * MiB + 3, r.stdout  # qemu-img may round down to a sector


def test_nbdcopy_in_and_out(server, tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(2).randbytes(64 * MiB))
    run("nbdcopy", "--flush", src, server.uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", server.uri, out)
    run("cmp", src, out)
    # again from a sparse image: holes must come back as zeroes, not old data
    _sparse_random_image(src, 64 * MiB, seed=3)
    run("nbdcopy", src, server.uri)
    out.unlink()
    server.restart()
    run("nbdcopy", server.uri, out)
    run("cmp", src, out)


# --------------------------------------------------------------------------------------- libnbd

def test_libnbd_commands(server):
    h = connect(server.uri)
    try:
        size = h.get_size()
        assert size == 64 * MiB
        assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
        assert h.can_multi_conn() and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        data = random.Random(4).randbytes(3 * MiB + 123)
        h.pwrite(data, 5 * MiB + 7)
        assert h.pread(len(data), 5 * MiB + 7) == data
        h.pwrite(b"fua" * 1000, 9 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        h.trim(1 * MiB, 6 * MiB)
        h.zero(4096 * 3, 7 * MiB + 4096, nbd.CMD_FLAG_FUA)
        expect = bytearray(data)
        expect[6 * MiB - 5 * MiB - 7: 7 * MiB - 5 * MiB - 7] = bytes(MiB)
        expect[7 * MiB + 4096 - 5 * MiB - 7: 7 * MiB + 4 * 4096 - 5 * MiB - 7] = bytes(3 * 4096)
        assert h.pread(len(data), 5 * MiB + 7) == expect
        assert h.pread(3000, 9 * MiB) == b"fua" * 1000
        ext = block_status(h, 4 * MiB, 5 * MiB)
        assert ext and ext[0][0] == 5 * MiB
        def flags_at(off):
            for o, n, f in ext:
                if o <= off < o + n:
                    return f
            raise AssertionError(off)
        assert flags_at(5 * MiB) == 0 and flags_at(6 * MiB) & nbd.STATE_HOLE
        assert flags_at(7 * MiB + 4096) & nbd.STATE_ZERO and flags_at(8 * MiB) == 0
        # fast zero is supported and does what zero does
        h.zero(8192, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(8192, 8 * MiB) == bytes(8192)
        # cache is not advertised: libnbd refuses, nothing sent
        assert not h.can_cache()
    finally:
        h.shutdown()


def test_libnbd_32MiB_requests(make_server):
    s = make_server(size="96M")
    h = s.connect()
    big = random.Random(5).randbytes(32 * MiB)
    h.pwrite(big, 17)  # unaligned too
    assert h.pread(32 * MiB, 17) == big
    h.zero(32 * MiB, 40 * MiB)
    h.trim(32 * MiB, 17)
    assert h.pread(32 * MiB, 40 * MiB) == bytes(32 * MiB)
    got = h.pread(32 * MiB, 17)
    # trim keeps partial blocks (advisory), full blocks read as zero
    assert got[:4096 - 17] == big[:4096 - 17]
    assert got[4096 - 17:32 * MiB - 4096] == bytes(32 * MiB - 4096 - (4096 - 17))
    ext = block_status(h, 96 * MiB, 0)
    assert sum(n for _o, n, _f in ext) <= 96 * MiB and ext[0][0] == 0


def _errnum(fn):
    with pytest.raises(nbd.Error) as ei:
        fn()
    return ei.value.errnum


def test_out_of_range_requests_fail_cleanly_and_server_survives(server):
    pid = server.pid
    h = server.connect()
    h.pwrite(b"keep" * 1024, 0)
    h.set_strict_mode(0)  # let the bad requests reach the server
    size = 64 * MiB
    assert _errnum(lambda: h.pread(4096, size)) == errno.EINVAL
    assert _errnum(lambda: h.pread(8192, size - 4096)) == errno.EINVAL
    assert _errnum(lambda: h.pread(1, size)) == errno.EINVAL
    assert _errnum(lambda: h.pread(4096, (1 << 64) - 4096)) == errno.EINVAL
    assert _errnum(lambda: h.pwrite(b"x" * 8192, size - 4096)) in (errno.EINVAL, errno.ENOSPC)
    assert _errnum(lambda: h.trim(4096, size)) in (errno.EINVAL, errno.ENOSPC)
    assert _errnum(lambda: h.zero(4096, 1 << 40)) in (errno.EINVAL, errno.ENOSPC)
    assert _errnum(lambda: h.block_status(4096, size, lambda *a: 0)) == errno.EINVAL
    # the same connection still works, the server is the same process, nothing was damaged
    assert h.pread(4096, 0) == b"keep" * 1024
    assert h.pread(4096, size - 4096) == bytes(4096)
    assert server.pid == pid and pid_alive(pid)
    assert server.connect().pread(4096, 0) == b"keep" * 1024


def test_multi_conn_flush_on_one_connection_is_seen_on_another(server):
    a, b, c = server.connect(), server.connect(), server.connect()
    assert a.can_multi_conn()
    rnd = random.Random(6)
    for i in range(50):
        off = rnd.randrange(0, 64 * MiB - 70000)
        data = rnd.randbytes(rnd.randrange(1, 70000))
        writer, reader = rnd.sample([a, b, c], 2)
        writer.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
        writer.flush()
        assert reader.pread(len(data), off) == data, f"round {i}"
    # a flush on a *different* connection covers writes completed on the first
    a.pwrite(b"A" * 4096, 0)
    b.flush()
    server.kill()
    server.start()
    assert server.connect().pread(4096, 0) == b"A" * 4096


# ------------------------------------------------------------------------------- fsx (R6)

class Fsx:
    """fsx-style random I/O through libnbd against a shadow bytearray.

    Every read (and a full-volume check every `check_every` ops and after each restart) must equal
    the shadow. Trim follows blockrep's documented behaviour: fully covered 4 KiB blocks read as
    zeroes, partial blocks keep their data. Block status must never call a range with non-zero
    shadow bytes a hole."""

    def __init__(self, server, seed, size, compressible=False):
        self.server = server
        self.seed = seed
        self.size = size
        self.rnd = random.Random(seed)
        self.shadow = bytearray(size)
        self.compressible = compressible
        self.h = None
        self.ops = 0
        self.log: list[str] = []

    def connect(self):
        if self.h is not None:
            self.h.shutdown()
        self.h = connect(self.server.uri)

    def fail(self, msg):
        recent = "\n  ".join(self.log[-15:])
        raise AssertionError(f"fsx seed={self.seed} op#{self.ops}: {msg}\n  last ops:\n  {recent}")

    def _length(self):
        r = self.rnd.random()
        if r < 0.15:
            return self.rnd.randint(1, 16)
        if r < 0.55:
            return self.rnd.randint(1, 4096 + 1)
        if r < 0.9:
            return self.rnd.randint(1, 65536 + 7)
        return self.rnd.randint(1, 1 * MiB + 13)

    def _range(self):
        n = min(self._length(), self.size)
        off = self.rnd.randrange(0, self.size - n + 1)
        if self.rnd.random() < 0.3:  # sometimes block aligned (whole-block trims, fast paths)
            off = off // BS * BS
            n = max(BS, n // BS * BS)
            n = min(n, self.size - off)
        return off, n

    def _data(self, n):
        if self.compressible and self.rnd.random() < 0.6:
            unit = self.rnd.randbytes(self.rnd.randint(1, 64))
            return (unit * (n // len(unit) + 1))[:n]
        return self.rnd.randbytes(n)

    def check_range(self, off, n):
        got = self.h.pread(n, off)
        if got != self.shadow[off:off + n]:
            i = first_difference(got, self.shadow[off:off + n])
            self.fail(f"read {n}@{off}: byte {off + i} is {got[i]:#x}, "
                      f"shadow has {self.shadow[off + i]:#x}")

    def check_all(self):
        for off in range(0, self.size, 8 * MiB):
            self.check_range(off, min(8 * MiB, self.size - off))

    def check_block_status(self, off, n):
        for o, length, flags in block_status(self.h, n, off):
            if flags & nbd.STATE_ZERO:
                if any(self.shadow[o:o + length]):
                    self.fail(f"block status says {length}@{o} reads as zero; it does not")

    def step(self):
        self.ops += 1
        r = self.rnd.random()
        off, n = self._range()
        h = self.h
        if r < 0.40:
            data = self._data(n)
            fua = self.rnd.random() < 0.1
            self.log.append(f"write{' fua' if fua else ''} {n}@{off}")
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            self.shadow[off:off + n] = data
        elif r < 0.70:
            self.log.append(f"read {n}@{off}")
            self.check_range(off, n)
        elif r < 0.78:
            self.log.append(f"trim {n}@{off}")
            h.trim(n, off)
            a, b = -(-off // BS) * BS, (off + n) // BS * BS
            if a < b:
                self.shadow[a:b] = bytes(b - a)
        elif r < 0.88:
            flags = self.rnd.choice([0, nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE])
            self.log.append(f"zero flags={flags} {n}@{off}")
            h.zero(n, off, flags)
            self.shadow[off:off + n] = bytes(n)
        elif r < 0.93:
            self.log.append("flush")
            h.flush()
        else:
            self.log.append(f"block_status {n}@{off}")
            self.check_block_status(off, n)

    def run(self, nops, restarts=(), check_every=2000):
        """restarts: {op number: "stop" | "kill"}; "kill" is preceded by a flush (so nothing
        acknowledged may be lost)."""
        self.connect()
        for i in range(1, nops + 1):
            self.step()
            if i % check_every == 0:
                self.log.append("check all")
                self.check_all()
            how = restarts.get(i)
            if how:
                self.log.append(f"restart ({how})")
                if how == "kill":
                    self.h.flush()
                    self.server.kill()
                    self.h = None
                    self.server.start()
                else:
                    self.h.shutdown()
                    self.h = None
                    self.server.restart()
                self.connect()
                self.check_all()
        self.check_all()
        self.h.shutdown()
        self.h = None


def _seed(default):
    return int(os.environ.get("BLOCKREP_FSX_SEED", default))


@pytest.mark.parametrize("backend", ["lsfs", "image"])
def test_fsx_quick(make_server, tmp_path, backend):
    seed = _seed(1001)
    s = make_server(size="16M", create_args=["--segment-size", "1M", *backend_create_args(backend, tmp_path)])
    t0 = time.monotonic()
    f = Fsx(s, seed, 16 * MiB)
    f.run(5000, restarts={2000: "stop", 3500: "kill"}, check_every=1000)
    assert time.monotonic() - t0 < 120
    if backend == "image":  # a clean stop drains the change log: image.raw alone is the volume
        s.stop()
        assert (s.vol / "image.raw").read_bytes() == f.shadow


def test_fsx_compressed_volume(make_server):
    seed = _seed(2002)
    s = make_server(size="16M", create_args=["--compress", "zstd", "--segment-size", "1M"])
    f = Fsx(s, seed, 16 * MiB, compressible=True)
    f.run(3000, restarts={1500: "stop", 2500: "kill"}, check_every=1000)
    info = s.info()
    assert info["compress"] == "zstd"


def test_compressed_volume_stores_compressible_data_smaller(make_server):
    plain = make_server("plain", size="64M")
    comp = make_server("comp", size="64M", create_args=["--compress", "zstd"])
    data = (b"blockrep " * 1000)[:8192] * (16 * MiB // 8192)
    for s in (plain, comp):
        h = s.connect()
        h.pwrite(data, 0)
        h.flush()
        assert h.pread(len(data), 0) == data
        s.stop()
    assert comp.info()["used_bytes"] * 4 < plain.info()["used_bytes"]


@pytest.mark.slow
def test_fsx_100k_ops(make_server):
    seed = _seed(3003)
    s = make_server(size="32M", create_args=["--segment-size", "1M"])
    restarts = {n: ("kill" if k % 2 else "stop") for k, n in enumerate(range(15000, 100000, 15000))}
    f = Fsx(s, seed, 32 * MiB)
    f.run(100_000, restarts=restarts, check_every=10_000)
    assert f.ops == 100_000


@pytest.mark.slow
def test_fsx_compressed_30k_ops(make_server):
    seed = _seed(4004)
    s = make_server(size="16M", create_args=["--compress", "zstd", "--segment-size", "1M"])
    Fsx(s, seed, 16 * MiB, compressible=True).run(
        30_000, restarts={10_000: "kill", 20_000: "stop"}, check_every=5000)
