"""The fuzz targets: one function of a byte string per decoder, with its oracle.

A target decodes everything it does from its input (Reader), so an input replays exactly:
the saved bytes of a finding are its regression test. A target returns normally when the oracle
holds and raises Violation (with the reason) when it does not; any other exception escaping a
target is a finding too (an undocumented error class).

Targets (name -> function, in TARGETS):
  segments     mutate the segment files of a real volume (flip, truncate, insert, delete, splice,
               duplicate a record, rename/remove/add files, forge header fields with valid CRCs),
               then open it read-only and read-write, read every block of the head and of each
               snapshot, write, checkpoint and reopen.
  checkpoint   the same volume, mutating (and forging, CRC recomputed) the checkpoint file.
  volume_json  mutated volume.json (field values from a table of hostile values, or raw bytes):
               read_params, Volume.open, one write, close.
  control      one control-socket request (raw bytes or a structured JSON request) to a real
               ControlServer over a volume opened in this process.
  replication_json  mutated replication.json through state.load and every consumer of it
               (retention.protected, plan.for_plain, plan.resume_point, status, update).
  export_name  a DR command export name through protocol.parse (and build round trips).
  manifest     a DR manifest through protocol.decode_manifest.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import struct
import tempfile
import uuid as _uuid
from pathlib import Path

from engine.errors import BlockrepError

BS = 4096
MiB = 1 << 20
VOL_SIZE = 2 * MiB
NBLK = VOL_SIZE // BS
REC_HDR, SEG_HDR = 48, 64


class Violation(AssertionError):
    """The oracle does not hold for this input."""


# ---------------------------------------------------------------- input decoding

class Reader:
    """Consumes the fuzz input; past its end every read is 0 (so any input is a valid plan)."""

    def __init__(self, data: bytes):
        self.d = bytes(data)
        self.p = 0

    def left(self) -> int:
        return len(self.d) - self.p

    def int(self, nbytes: int = 4) -> int:
        b = self.d[self.p:self.p + nbytes]
        self.p += nbytes
        return int.from_bytes(b.ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        nb = 1 if n <= 256 else 2 if n <= 65536 else 4 if n <= 1 << 32 else 8
        return self.int(nb) % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, num: int, den: int) -> bool:
        return self.below(den) < num

    def bytes(self, n: int) -> bytes:
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def rest(self) -> bytes:
        b = self.d[self.p:]
        self.p = len(self.d)
        return b


INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17, 47, 48, 63, 64, 65, 95, 96, 111, 112, 113,
               NBLK - 1, NBLK, NBLK + 1, 1023, 1024, 1025, 4095, 4096, 4097, 1 << 16, (1 << 28) - 1,
               1 << 28, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 63, (1 << 64) - 1]


def interesting(r: Reader, orig: int, bits: int) -> int:
    k = r.below(6)
    if k == 0:
        v = r.choice(INTERESTING)
    elif k == 1:
        v = orig + r.choice([-2, -1, 1, 2])
    elif k == 2:
        v = orig ^ (1 << r.below(bits))
    elif k == 3:
        v = r.int(bits // 8)
    elif k == 4:
        v = orig * 2
    else:
        v = (1 << bits) - 1 - r.below(3)
    return v % (1 << bits)


def _crc():
    from engine import _native
    ffi, lib = _native.ffi, _native.lib

    def crc(data, start: int = 0) -> int:
        return lib.crc32c_extend(start, ffi.from_buffer(bytes(data)), len(data))
    return crc


crc32c = _crc()


# ---------------------------------------------------------------- the template volumes

def block_of(lba: int, ver: int) -> bytes:
    """Distinct, compressible content for every (block, version): any mix-up shows."""
    return f"<{lba:06x}:{ver:07x}>".encode() * 256  # 16 bytes x 256


def hblock(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=8).hexdigest()


ZERO_H = hblock(bytes(BS))


class Model:
    """What was written: every version of every block, and where the checkpoint and snapshots are."""

    def __init__(self):
        self.cur = bytearray(VOL_SIZE)
        self.versions: list[list[str]] = [[ZERO_H] for _ in range(NBLK)]
        self.ckpt: list[int] | None = None  # versions[b] index current at the checkpoint
        self.snaps: dict[str, tuple[list[int], bool]] = {}  # name -> (version index, before ckpt)

    def touch(self, off: int, n: int) -> None:
        for b in range(off // BS, (off + n - 1) // BS + 1):
            h = hblock(bytes(self.cur[b * BS:(b + 1) * BS]))
            if h != self.versions[b][-1]:
                self.versions[b].append(h)

    def now(self) -> list[int]:
        return [len(v) - 1 for v in self.versions]

    def to_json(self) -> dict:
        return {"versions": self.versions, "ckpt": self.ckpt, "snaps": self.snaps}

    @classmethod
    def from_json(cls, d: dict) -> Model:
        m = cls()
        m.versions, m.ckpt = d["versions"], d["ckpt"]
        m.snaps = {k: (v[0], v[1]) for k, v in d["snaps"].items()}
        return m


def make_template(path: Path, compress: str, seed: int) -> Model:
    """A short, deterministic workload: writes of 1..24 blocks, unaligned writes and zeroes,
    trims, snapshots (one deleted), a checkpoint in the middle and a replayed tail after it
    (flush, then a crash)."""
    from engine import volume
    from engine.volume import Volume
    rnd = random.Random(seed)
    volume.create(path, VOL_SIZE, compress=compress, segment_size=1 * MiB)
    meta = json.loads((path / "volume.json").read_text())
    meta["uuid"] = str(_uuid.UUID(int=0x5EED0000_0000_4000_8000_000000000000 + seed))  # byte-exact replays
    (path / "volume.json").write_text(json.dumps(meta))
    m = Model()
    ver = [0] * NBLK
    v = Volume.open(path)

    def write(n_ops):
        for _ in range(n_ops):
            k = rnd.random()
            if k < 0.75:
                n = rnd.choice([1, 1, 2, 3, 4, 8, 16, 17, 24])
                lba = rnd.randrange(0, NBLK - n)
                data = b"".join(block_of(lba + i, (ver.__setitem__(lba + i, ver[lba + i] + 1), ver[lba + i])[1])
                                for i in range(n))
                off, ln = lba * BS, n * BS
                if rnd.random() < 0.15:  # unaligned
                    off, data = off + 100, data[:-300]
                    ln = len(data)
                v.write(data, off)
                m.cur[off:off + ln] = data
                m.touch(off, ln)
            elif k < 0.88:
                off, ln = rnd.randrange(0, VOL_SIZE - 40 * BS), rnd.randrange(1, 40 * BS)
                if rnd.random() < 0.5:
                    off, ln = off // BS * BS, max(1, ln // BS) * BS
                v.zero(ln, off)
                m.cur[off:off + ln] = bytes(ln)
                m.touch(off, ln)
            else:
                lba, n = rnd.randrange(0, NBLK - 32), rnd.randrange(1, 32)
                v.trim(n * BS, lba * BS)
                m.cur[lba * BS:(lba + n) * BS] = bytes(n * BS)
                m.touch(lba * BS, n * BS)
            if rnd.random() < 0.2:
                v.flush()

    write(40)
    v.snapshot_create("s1", created_ns=1_700_000_000_000_000_000 + 1, uuid=str(_uuid.UUID(int=1 << 64 | seed)))
    m.snaps["s1"] = (m.now(), True)
    write(25)
    v.flush()
    v.checkpoint()
    m.ckpt = m.now()
    write(25)
    v.snapshot_create("s2", created_ns=1_700_000_000_000_000_000 + 2, uuid=str(_uuid.UUID(int=2 << 64 | seed)))
    m.snaps["s2"] = (m.now(), False)
    write(10)
    v.snapshot_create("s3", created_ns=1_700_000_000_000_000_000 + 3, uuid=str(_uuid.UUID(int=3 << 64 | seed)))
    m.snaps["s3"] = (m.now(), False)
    write(5)
    v.snapshot_delete("s3")
    write(10)
    v.flush()
    v.abandon()  # a crash after the flush: recovery replays the tail after the checkpoint
    return m


# ---------------------------------------------------------------- parsing the template files

def records(seg: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, type) of the valid-looking records of a segment, in order."""
    out = []
    pos = SEG_HDR
    while pos + REC_HDR <= len(seg):
        magic, _hcrc, typ, flags, _r, nblocks, plen = struct.unpack_from("<IIBBHII", seg, pos)
        if magic != 0x43525242:
            break
        if typ in (1, 4):
            ncrc = 1 if flags & 1 else nblocks
        elif typ in (6, 7):
            ncrc = 1
        else:
            ncrc = 0
        ln = REC_HDR + 4 * ncrc + plen
        out.append((pos, ln, typ))
        pos += ln
    return out


REC_FIELDS = [  # (offset in header, size)
    (8, 1), (9, 1), (10, 2), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8)]
SNAP_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 4), (84, 4), (96, 8), (104, 8)]


def fix_record(seg: bytearray, pos: int, fix_data: bool) -> None:
    """Recompute a record's CRCs after its fields changed (as far as it lies inside the file)."""
    typ, flags = seg[pos + 8], seg[pos + 9]
    nblocks, plen = struct.unpack_from("<II", seg, pos + 12)
    ncrc = (1 if flags & 1 else nblocks) if typ in (1, 4) else 1 if typ in (6, 7) else 0
    ncrc = min(ncrc, 1 << 16)
    if pos + REC_HDR + 4 * ncrc > len(seg):
        return
    if fix_data:
        pl = pos + REC_HDR + 4 * ncrc
        if typ in (1, 4) and not flags & 1:
            for b in range(ncrc):
                blk = seg[pl + b * BS:pl + (b + 1) * BS]
                if len(blk) == BS:
                    struct.pack_into("<I", seg, pos + REC_HDR + 4 * b, crc32c(blk))
        elif ncrc == 1 and pl + plen <= len(seg):
            struct.pack_into("<I", seg, pos + REC_HDR, crc32c(seg[pl:pl + plen]))
    h = crc32c(seg[pos + 8:pos + REC_HDR + 4 * ncrc])
    struct.pack_into("<I", seg, pos + 4, h)


def ckpt_fields(d: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the checkpoint's fields worth forging (v3 layout, FORMAT.md §4)."""
    f = [(4, 4), (24, 8), (32, 8), (40, 8), (48, 4), (52, 4), (56, 4), (60, 4)]
    try:
        nsegs = struct.unpack_from("<I", d, 56)[0]
        pos = 64
        for i in range(min(nsegs, 64)):
            f += [(pos + 16 * i, 8), (pos + 16 * i + 8, 8)]
        pos += 16 * nsegs
        f.append((pos, 8))
        nl = struct.unpack_from("<Q", d, pos)[0]
        pos += 8
        for i in range(min(nl, 8)):
            lp = pos + 8200 * i
            f.append((lp, 8))
            for e in (0, 1, 7, 100, 511):
                f += [(lp + 8 + 16 * e, 8), (lp + 8 + 16 * e + 8, 4), (lp + 8 + 16 * e + 12, 4),
                      (lp + 8 + 16 * e + 7, 1), (lp + 8 + 16 * e + 3, 1)]
        pos += 8200 * nl
        nmaps = struct.unpack_from("<I", d, 52)[0]
        for _ in range(min(nmaps, 8)):
            f += [(pos, 4), (pos + 4, 4), (pos + 8, 8), (pos + 16, 4), (pos + 20, 1), (pos + 84, 4),
                  (pos + 88, 8), (pos + 96, 8), (pos + 104, 8)]
            if AVOID_KNOWN:  # known finding F4: a non-UTF-8 name byte
                f.remove((pos + 20, 1))
            cnt = struct.unpack_from("<Q", d, pos + 88)[0]
            pos += 112
            for k in range(min(cnt, 4)):
                f.append((pos + 4 * k, 4))
            pos += 4 * cnt
    except (struct.error, OverflowError):  # counts already forged beyond the file
        pass
    return [x for x in f if x[0] + x[1] <= len(d) - 4]


def put(buf: bytearray, off: int, size: int, value: int) -> None:
    buf[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


# ---------------------------------------------------------------- volume state and the oracle

def is_enomem(e: BaseException) -> bool:
    return getattr(e, "errno", None) == _errno.ENOMEM or "out of memory" in str(e)


def check_error(e: BaseException, what: str) -> None:
    """An error a decoder may raise: a BlockrepError subclass with a message, not ENOMEM."""
    if not isinstance(e, BlockrepError):
        raise Violation(f"{what}: undocumented error class {type(e).__name__}: {e!r}") from e
    if not str(e).strip():
        raise Violation(f"{what}: {type(e).__name__} without a message") from e
    if is_enomem(e):
        raise Violation(f"{what}: memory not bounded by the input ({e})") from e


def read_state(v) -> dict:
    """Every block of the head and of each snapshot: its content hash, or None for EIO."""
    from engine.errors import CorruptionError

    def blocks(reader) -> list[str | None]:
        try:
            data = reader(0, VOL_SIZE)
            return [hblock(data[i * BS:(i + 1) * BS]) for i in range(NBLK)]
        except CorruptionError:
            pass
        out: list[str | None] = []
        for b in range(NBLK):
            try:
                out.append(hblock(reader(b * BS, BS)))
            except CorruptionError:
                out.append(None)
        return out

    snaps = v.snapshots()
    st = {"head": blocks(lambda o, n: v.read(n, o)), "snaps": {}}
    for s in snaps:
        key = f"{s['name']}#{s['id']}"
        st["snaps"][key] = blocks(lambda o, n, sid=s["id"]: v.snapshot_read(sid, n, o))
    v.extents(VOL_SIZE, 0)
    v.info()
    return st


def check_model(st: dict, m: Model, ckpt_ok: bool) -> None:
    """Every block reads as a version the workload wrote there (or EIO): never other data.
    With the checkpoint intact, blocks it covers read exactly as then or later."""
    for b, h in enumerate(st["head"]):
        lo = m.ckpt[b] if ckpt_ok and m.ckpt else 0
        if h is not None and h not in m.versions[b][lo:]:
            raise Violation(f"head block {b} reads data never written there (hash {h})")
    for key, blocks in st["snaps"].items():
        name = key.split("#")[0]
        if name not in m.snaps:
            raise Violation(f"snapshot {key!r} appeared that the workload never made")
        idx, before = m.snaps[name]
        for b, h in enumerate(blocks):
            if before and ckpt_ok:
                allowed = m.versions[b][idx[b]:idx[b] + 1]
            else:
                allowed = m.versions[b][:idx[b] + 1]
            if h is not None and h not in allowed:
                raise Violation(f"snapshot {name} block {b} reads data it never held (hash {h})")


def exercise(work: Path, m: Model | None, ckpt_ok: bool) -> str:
    """Open read-only, then read-write; compare; write, checkpoint, reopen, compare. Returns
    'refused' or 'opened'."""
    from engine.volume import Volume
    ro_state = ro_err = None
    try:
        with Volume.open(work, readonly=True) as v:
            ro_state = read_state(v)
    except Exception as e:
        check_error(e, "read-only open")
        ro_err = e
    try:
        v = Volume.open(work)
    except Exception as e:
        check_error(e, "open")
        # the one allowed difference: a file named with the last segment id leaves the log no id
        # to append with (read-only needs none)
        if ro_state is not None and "segment id" not in str(e):
            raise Violation(f"opens read-only but read-write refuses: {e}") from e
        return "refused"
    try:
        st = read_state(v)
        if ro_err is not None:
            raise Violation(f"opens read-write but read-only refused: {ro_err}")
        if st != ro_state:
            raise Violation("read-only and read-write recovery see different volumes: "
                            + diff_states(ro_state, st))
        if m is not None:
            check_model(st, m, ckpt_ok)
        v.write(block_of(0, 0xfffff), 0)
        v.flush()
        v.checkpoint()
        v.close()
    except Exception as e:
        if isinstance(e, Violation):
            raise
        check_error(e, "use after open")
        return "opened"
    finally:
        if not v.closed:
            v.abandon()
    st["head"][0] = hblock(block_of(0, 0xfffff))
    try:
        with Volume.open(work) as v2:
            st2 = read_state(v2)
    except Exception as e:
        check_error(e, "reopen")
        raise Violation(f"opened, wrote and checkpointed, then refuses to reopen: {e}") from e
    if st2 != st:
        raise Violation("the volume changed across checkpoint and reopen: " + diff_states(st, st2))
    return "opened"


def diff_states(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return "one side missing"
    if set(a["snaps"]) != set(b["snaps"]):
        return f"snapshots {sorted(a['snaps'])} vs {sorted(b['snaps'])}"
    for k in ["head", *a["snaps"]]:
        x = a["head"] if k == "head" else a["snaps"][k]
        y = b["head"] if k == "head" else b["snaps"][k]
        bad = [i for i in range(NBLK) if x[i] != y[i]]
        if bad:
            return f"{k}: blocks {bad[:8]} differ ({x[bad[0]]} vs {y[bad[0]]})"
    return "?"


# ---------------------------------------------------------------- per-process fixtures

class _Fixtures:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="blockrep-fuzz-"))
        self._templates: dict[str, tuple[Path, Model]] = {}
        self.n = 0

    def template(self, compress: str) -> tuple[Path, Model]:
        """Made by a subprocess: this process's heap never holds the workload's bytes (a read
        of uninitialised memory would otherwise return them by luck), and replays are exact."""
        if compress not in self._templates:
            import subprocess
            import sys
            p = self.root / f"template-{compress}"
            code = ("import json, sys; from pathlib import Path; from tests.fuzz.targets import make_template; "
                    "m = make_template(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])); "
                    "Path(sys.argv[1] + '.model.json').write_text(json.dumps(m.to_json()))")
            repo = Path(__file__).resolve().parents[2]
            subprocess.run([sys.executable, "-c", code, str(p), compress, "1" if compress == "none" else "2"],
                           cwd=repo, check=True, env=dict(os.environ, PYTHONPATH=str(repo)))
            m = Model.from_json(json.loads(Path(str(p) + ".model.json").read_text()))
            self._templates[compress] = (p, m)
        return self._templates[compress]

    def scratch(self) -> Path:
        self.n += 1
        w = self.root / f"work{self.n % 2}"
        shutil.rmtree(w, ignore_errors=True)
        return w


_fx: _Fixtures | None = None


def fx() -> _Fixtures:
    global _fx
    if _fx is None:
        _fx = _Fixtures()
    return _fx


# ---------------------------------------------------------------- target: segments

# Known finding F2: when the newest segment a checkpoint references is lost (removed, renamed),
# vol_open gives its id to the new active segment; unless BLOCKREP_FUZZ_ALL=1 the plans do not
# remove or rename the newest segment file.
# Segment ids far beyond the log (a file name is a decoder input too). Known finding F1: such a
# name makes vol_open allocate and fill a segment table of id entries (unbounded memory; ids from
# 2^63 loop for ever), so unless BLOCKREP_FUZZ_ALL=1 the plans keep ids small and the regression
# tests (tests/test_fuzz_decoders.py, xfail) hold the finding.
AVOID_KNOWN = os.environ.get("BLOCKREP_FUZZ_AVOID_KNOWN") == "1"  # F1, F2, F4 are fixed: full plans
SEG_NAMES_HUGE = [0, 0xff, 0x3ff] if AVOID_KNOWN else \
    [0, 0x0fffffff, 0x10000000, 0x10000001, 0xffffffff, 0x100000001, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
STRAY_NAMES = ["0000000000000009.seg", "0000000000000001.free", "zzzzzzzzzzzzzzzz.seg", "00000000000000001.seg",
               "0000000000000002.seg", "00000000000003ff.seg"] + \
    ([] if AVOID_KNOWN else ["ffffffffffffffff.seg", "000000000fffffff.seg"])


def _segfiles(work: Path) -> list[Path]:
    return sorted((work / "segments").glob("*.seg"))


def mutate_segments(r: Reader, work: Path) -> dict:
    """Apply 1..4 mutations decoded from r; returns flags (forged, ckpt_dropped)."""
    flags = {"forged": False, "ckpt_ok": True, "ops": []}
    for _ in range(1 + r.below(4)):
        segs = _segfiles(work)
        if not segs:
            break
        f = r.choice(segs)
        op = r.below(15)
        if AVOID_KNOWN and op in (9, 10) and f == segs[-1]:
            op = 0  # known finding F2: losing the newest segment lets its id be reused
        d = bytearray(f.read_bytes())
        recs = records(d)
        flags["ops"].append(op)

        def offset(bias_header=True, recs=recs, d=d) -> int:
            if recs and bias_header and r.chance(2, 3):
                pos, ln, _t = r.choice(recs)
                return pos + r.below(min(ln, REC_HDR + 8) if r.chance(3, 4) else ln)
            return r.below(len(d) + 1)

        if op == 0:  # bit flip
            o = offset()
            if o < len(d):
                d[o] ^= 1 << r.below(8)
        elif op == 1:  # byte set
            o = offset()
            if o < len(d):
                d[o] = r.int(1)
        elif op == 2:  # truncate (often at or near a record boundary)
            if recs and r.chance(1, 2):
                pos, ln, _t = r.choice(recs)
                o = pos + r.choice([0, 1, REC_HDR - 1, REC_HDR, ln - 1, ln, ln + 1])
            else:
                o = offset(False)
            del d[o:]
        elif op == 3:  # insert bytes
            o = offset()
            d[o:o] = r.bytes(1 + r.below(64)) or b"\0"
        elif op == 4:  # delete a range
            o = offset()
            del d[o:o + 1 + r.below(5000)]
        elif op == 5:  # splice from another (or the same) segment
            src = bytearray(r.choice(segs).read_bytes())
            a = r.below(len(src) + 1)
            n = 1 + r.below(9000)
            o = offset()
            d[o:o + n] = src[a:a + n]
        elif op == 6:  # duplicate a whole record (same seq twice), here or at the end of another
            if recs:
                pos, ln, _t = r.choice(recs)
                chunk = d[pos:pos + ln]
                if r.chance(1, 2):
                    d[pos + ln:pos + ln] = chunk
                else:
                    g = r.choice(segs)
                    if g != f:
                        g.write_bytes(g.read_bytes() + chunk)
        elif op == 7:  # forge header (or SNAP payload) fields, CRCs recomputed
            if recs:
                pos, ln, typ = r.choice(recs)
                for _ in range(1 + r.below(3)):
                    if typ == 6 and r.chance(1, 2):
                        fo, fs = r.choice(SNAP_FIELDS)
                        fo += REC_HDR + 4
                    else:
                        fo, fs = r.choice(REC_FIELDS)
                    if pos + fo + fs <= len(d):
                        old = int.from_bytes(d[pos + fo:pos + fo + fs], "little")
                        put(d, pos + fo, fs, interesting(r, old, 8 * fs))
                fix_record(d, pos, fix_data=r.chance(3, 4))
                flags["forged"] = True
        elif op == 8:  # lose the checkpoint: full replay
            (work / "checkpoint").unlink(missing_ok=True)
            flags["ckpt_ok"] = False
        elif op == 9:  # rename a segment file (swapped, or to a huge id)
            new = r.choice(SEG_NAMES_HUGE) if r.chance(1, 2) else int(f.stem, 16) + r.choice([-1, 1, 2, 5])
            f.write_bytes(d)
            f.rename(f.with_name(f"{new % (1 << 64):016x}.seg"))
            flags["ckpt_ok"] = False
            continue
        elif op == 10:  # remove a segment file
            f.unlink()
            flags["ckpt_ok"] = False
            continue
        elif op == 11:  # add a stray file
            name = r.choice(STRAY_NAMES)
            p = work / "segments" / name
            if not p.exists():
                p.write_bytes(r.bytes(r.below(300)) if r.chance(1, 2) else d[:r.below(len(d) + 1)])
                if name.endswith(".seg") and len(name) == 20:
                    flags["ckpt_ok"] = False
        elif op == 12:  # swap two segments' contents
            g = r.choice(segs)
            if g != f:
                gd = g.read_bytes()
                g.write_bytes(bytes(d))
                d = bytearray(gd)
                flags["ckpt_ok"] = False
        elif op == 13:  # zero a range
            o = offset(False)
            n = 1 + r.below(BS * 2)
            d[o:o + n] = bytes(len(d[o:o + n]))
        else:  # append garbage or a copy of a record
            if recs and r.chance(1, 2):
                pos, ln, _t = r.choice(recs)
                d += d[pos:pos + ln]
            else:
                d += r.bytes(1 + r.below(200)) or b"\xff"
        f.write_bytes(d)
    return flags


def target_segments(data: bytes) -> str:
    r = Reader(data)
    tpl, m = fx().template(r.choice(["none", "zstd"]))
    work = fx().scratch()
    shutil.copytree(tpl, work)
    flags = mutate_segments(r, work)
    return exercise(work, None if flags["forged"] else m, flags["ckpt_ok"])


# ---------------------------------------------------------------- target: checkpoint

def target_checkpoint(data: bytes) -> str:
    r = Reader(data)
    tpl, m = fx().template(r.choice(["none", "zstd"]))
    work = fx().scratch()
    shutil.copytree(tpl, work)
    cp = work / "checkpoint"
    orig = cp.read_bytes()
    d = bytearray(orig)
    forged = False
    for _ in range(1 + r.below(4)):
        op = r.below(7)
        if op == 0:
            o = r.below(len(d) + 1)
            if o < len(d):
                d[o] ^= 1 << r.below(8)
        elif op == 1:
            del d[r.below(len(d) + 1):]
        elif op == 2:
            o = r.below(len(d) + 1)
            d[o:o] = r.bytes(1 + r.below(64)) or b"\0"
        elif op == 3:
            o = r.below(len(d) + 1)
            del d[o:o + 1 + r.below(9000)]
        else:  # forge fields, CRC recomputed
            fields = ckpt_fields(bytes(d))
            if fields:
                for _ in range(1 + r.below(3)):
                    fo, fs = r.choice(fields)
                    put(d, fo, fs, interesting(r, int.from_bytes(d[fo:fo + fs], "little"), 8 * fs))
                if len(d) >= 4:
                    struct.pack_into("<I", d, len(d) - 4, crc32c(d[:-4]))
                forged = True
    cp.write_bytes(d)
    outcome = exercise(work, None if forged else m, True)
    if not forged and bytes(d) != orig and outcome == "opened":
        raise Violation("a damaged checkpoint (CRC not recomputed) was accepted")
    return outcome


# ---------------------------------------------------------------- target: volume.json

HOSTILE = [None, True, False, 0, 1, -1, 2, 4095, 4096, 4097, 8192, 1 << 20, (1 << 20) - 1, 256 << 20,
           (256 << 20) + 1, 1 << 30, (1 << 30) + 1, 1 << 31, 1 << 32, 1 << 40, 16 << 40, (16 << 40) + 4096,
           1 << 63, 1 << 64, 10 ** 30, -4096, 4096.0, 1.5, 1e308, float("inf"), float("nan"), "", "x",
           "4096", "lsfs", "image", "zstd", "none", "blockrep-volume", "00000000-0000-0000-0000-000000000000",
           "not-a-uuid", "{12345678-1234-5678-1234-567812345678}", "12345678123456781234567812345678",
           [], {}, [1], {"a": 1}, "\x00", "\udcff", "é" * 10, "2026-01-01T00:00:00+00:00"]
VJ_KEYS = ["format", "format_version", "uuid", "size", "backend", "block_size", "granularity",
           "compress", "segment_size", "created", "extra"]


def target_volume_json(data: bytes) -> str:
    from engine import volume
    from engine.volume import Volume, read_params
    r = Reader(data)
    f = fx()
    base = f.root / "vj-template"
    if not base.exists():
        volume.create(base, 1 * MiB, segment_size=1 * MiB)
        with Volume.open(base) as v:
            v.write(block_of(3, 1), 3 * BS)
    work = f.scratch()
    shutil.copytree(base, work)
    meta = work / "volume.json"
    if r.chance(1, 8):
        meta.write_bytes(r.rest())
    else:
        doc = json.loads(meta.read_text())
        for _ in range(1 + r.below(4)):
            k = r.choice(VJ_KEYS)
            if r.chance(1, 6):
                doc.pop(k, None)
            else:
                doc[k] = r.choice(HOSTILE)
        if r.chance(1, 10):
            doc = r.choice([[], "x", 1, None, [doc]])
        try:
            text = json.dumps(doc)
        except (ValueError, UnicodeEncodeError):
            text = "{}"
        meta.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        read_params(work)
    except Exception as e:
        check_error(e, "read_params")
    try:
        v = Volume.open(work)
    except Exception as e:
        check_error(e, "open")
        return "refused"
    try:
        v.read(BS, 0)
        v.write(block_of(0, 1), 0)
        v.read(BS, v.size - BS)
        v.flush()
        v.close()
    except Exception as e:
        check_error(e, "use after open")
    finally:
        if not v.closed:
            v.abandon()
    return "opened"


# ---------------------------------------------------------------- target: control socket

CTL_ARGS = ["name", "tag", "force", "keep", "only_tagged", "from_name", "to_name", "since", "vol",
            "self", "x", ""]


class _Ctl:
    """A volume opened here and a real ControlServer over it (engine/control.py)."""

    def __init__(self):
        from engine import control, volume
        from engine.volume import Volume
        root = fx().root / "ctl"
        volume.create(root, 1 * MiB, segment_size=1 * MiB)
        self.vol = Volume.open(root)
        self.vol.write(block_of(1, 1), BS)
        self.vol.snapshot_create("base")
        self.path = root / "ctl.sock"
        self.srv = control.ControlServer(self.vol, self.path)
        self.srv.start()
        self.failures: list[str] = []
        outer = self

        class H(logging.Handler):
            def emit(self, rec):
                if rec.levelno >= logging.ERROR:
                    outer.failures.append(self.format(rec))
        logging.getLogger("blockrep.control").addHandler(H())


_ctl: _Ctl | None = None


def _ctl_request(r: Reader) -> bytes:
    from engine import ops
    if r.chance(1, 6):
        return r.rest()
    cmds = sorted(ops.COMMANDS) + ["", "nope", "__init__", "COMMANDS"]
    req: object = {"cmd": r.choice(cmds)}
    if r.chance(1, 10):
        req = {"cmd": r.choice(HOSTILE)}
    args: object = {}
    for _ in range(r.below(4)):
        k = r.choice(CTL_ARGS)
        val = r.choice(HOSTILE + ["base", "s-new", "../x", "a" * 65, None])
        args[k] = val  # type: ignore[index]
    if r.chance(1, 10):
        args = r.choice(HOSTILE)
    if r.chance(9, 10):
        req["args"] = args  # type: ignore[index]
    if r.chance(1, 12):
        req = r.choice([[req], "cmd", 1, None, True])
    text = json.dumps(req)
    if r.chance(1, 8):  # a damaged request
        b = bytearray(text.encode())
        if b:
            b[r.below(len(b))] = r.int(1)
        return bytes(b)
    return text.encode("utf-8", "surrogatepass")


def target_control(data: bytes) -> str:
    global _ctl
    if _ctl is None:
        _ctl = _Ctl()
    c = _ctl
    r = Reader(data)
    req = _ctl_request(r)
    if not req:
        return "probe"  # connect, send nothing, close: the server's readiness probe, no answer
    c.failures.clear()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect(str(c.path))
        s.sendall(req)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    try:
        reply = json.loads(out)
    except ValueError:
        raise Violation(f"no JSON answer to {req[:200]!r}: {out[:200]!r}; server log: "
                        f"{c.failures[-1:] or '-'}") from None
    if c.failures:
        raise Violation(f"the server logged an unhandled error for {req[:200]!r}: {c.failures[-1][-600:]}")
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise Violation(f"malformed answer {reply!r}")
    if not reply["ok"]:
        if not isinstance(reply.get("error"), str) or not reply["error"].strip() or \
                not isinstance(reply.get("errno"), int):
            raise Violation(f"error answer without message or errno: {reply!r}")
    c.vol.read(BS, BS)  # the volume still serves
    if len(c.vol.snapshots()) > 40:  # keep the fixture small
        for sn in c.vol.snapshots()[1:]:
            c.vol.snapshot_delete(sn["name"])
    return "ok" if reply["ok"] else "error"


# ---------------------------------------------------------------- target: replication.json

RJ_FIELDS = ["kind", "snapshot", "snapshot_uuid", "head_uuid", "replicated_at", "in_progress",
             "last_success", "last_failure", "last_error", "runs", "fingerprint", "dr_volume"]
RJ_SUB = {"in_progress": ["snapshot", "snapshot_uuid", "base_uuid", "mode", "token", "done_upto",
                          "extents_sha256", "dr_dirty"],
          "last_success": ["at", "rate", "result", "bytes_sent"],
          "last_failure": ["at", "result", "error"],
          "fingerprint": ["size", "target_size", "chunks"]}


class _Rj:
    def __init__(self):
        from engine import volume
        from engine.volume import Volume
        self.root = fx().root / "rj"
        volume.create(self.root, 1 * MiB, segment_size=1 * MiB)
        with Volume.open(self.root) as v:
            v.write(block_of(1, 1), BS)
            self.snaps = [v.snapshot_create("a"), v.snapshot_create("b", flags=1)]
        self.uuids = [s["uuid"] for s in self.snaps]


_rj: _Rj | None = None


def _rj_value(r: Reader, f: _Rj, depth: int = 0):
    k = r.below(8)
    if k < 3:
        return r.choice(HOSTILE)
    if k == 3:
        return r.choice(f.uuids + ["2026-01-01T00:00:00Z", "seed", "incremental", "ok", "0" * 32])
    if k == 4 and depth < 2:
        return [_rj_value(r, f, depth + 1) for _ in range(r.below(3))]
    if k == 5 and depth < 2:
        return {r.choice(["at", "snapshot_uuid", "chunks", "x"]): _rj_value(r, f, depth + 1)
                for _ in range(r.below(3))}
    return r.choice([0, [[0, "00"]], [[1, "zz"]], [[0, 1]], [[0, 4096]], "2026-13-45T99:00:00Z"])


def _rj_doc(r: Reader, f: _Rj):
    if r.chance(1, 10):
        return None, r.rest()
    targets: dict = {}
    for _ in range(1 + r.below(3)):
        uri = r.choice(["nbd://h/x", "nbd+unix:///?socket=/s", "", "\udcff"])
        t: dict = {}
        for _ in range(r.below(7)):
            key = r.choice(RJ_FIELDS)
            if key in RJ_SUB and r.chance(2, 3):
                sub = {}
                for _ in range(r.below(5)):
                    sub[r.choice(RJ_SUB[key])] = _rj_value(r, f)
                t[key] = sub
            elif key == "runs" and r.chance(1, 2):
                t[key] = [{"at": _rj_value(r, f), "result": _rj_value(r, f)} for _ in range(r.below(3))]
            else:
                t[key] = _rj_value(r, f)
        targets[uri] = t if r.chance(7, 8) else _rj_value(r, f)
    k = r.below(6)
    if k == 0:
        doc: object = targets  # version 1: {uri: {...}}
    elif k == 1:
        doc = {"version": r.choice(HOSTILE), "targets": targets}
    elif k == 2:
        doc = {"version": 2, "targets": r.choice(HOSTILE)}
    else:
        doc = {"version": 2, "targets": targets}
    return doc, None


def target_replication_json(data: bytes) -> str:
    global _rj
    from engine.replication import plan, retention, state, status
    if _rj is None:
        _rj = _Rj()
    f = _rj
    r = Reader(data)
    doc, raw = _rj_doc(r, f)
    path = f.root / state.FILE
    if raw is None:
        try:
            raw = json.dumps(doc).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError):
            raw = b"{}"
    path.write_bytes(raw)
    try:
        st = state.load(f.root)
    except Exception as e:
        check_error(e, "state.load")
        return "refused"
    try:
        targets = st["targets"]
        retention.protected(f.snaps, targets)
        for uri in list(targets):
            rec = state.target(f.root, uri)
            plan.for_plain(f.snaps, f.snaps[-1], rec, True)
            plan.resume_point(rec.get("in_progress"), f.uuids[-1], f.uuids[0], "incremental", [(0, 4096)])
        status.status(str(f.root))
        state.record_run(f.root, "nbd://fuzz/x", {"result": "ok", "at": state.now()})
        state.load(f.root)
    except Exception as e:
        check_error(e, "using the loaded replication records")
    return "loaded"


# ---------------------------------------------------------------- target: DR export names

def _export_name(r: Reader) -> str:
    from engine.replication import protocol as P
    k = r.below(8)
    if k == 0:
        return r.rest().decode("utf-8", "surrogateescape")
    if k == 1:
        return "!" + r.rest().decode("latin-1")
    if k == 2:
        return f"!sums:{r.choice(['16', '20', '0', '99', '016', '', '1٦', '-1', '+16'])}@" + \
            r.choice(["", "a", "a" * 64, "a" * 65, "..", "é", "a b", "@", "a@b"])
    if k == 3:
        return "!changes@" + r.choice(["", "a", "a" * 64, "a" * 65, "x/y", "\x00"])
    verb = r.choice(sorted(P.ARGS) + ["hello", "sums", "nope", ""])
    spec = list(P.ARGS.get(verb, {"token": None}))
    parts = []
    for _ in range(r.below(len(spec) + 3)):
        key = r.choice(spec + ["", "x", "token"])
        val = r.choice(["", "none", "0", "1", "2", "-1", "00", "1" * 21, "9" * 20, "16", "20", "65536",
                        "1048577", "0" * 32, "A" * 32, "0" * 31, "12345678-1234-5678-1234-567812345678",
                        "12345678-1234-5678-1234-56781234567G", "a" * 64, "a" * 65, "a=b", "١", "²",
                        str(1 << 20), str((1 << 30) // 24), str((1 << 30) // 24 + 1), "\x00"])
        parts.append(key + r.choice(["=", "=", "", "=="]) + val)
    return "!" + verb + r.choice(["?", "?", "", "??", "?&"]) + "&".join(parts)


def target_export_name(data: bytes) -> str:
    from engine.errors import InvalidArgument
    from engine.replication import protocol as P
    r = Reader(data)
    name = _export_name(r)
    try:
        cmd = P.parse(name)
    except InvalidArgument as e:
        check_error(e, f"parse({name[:80]!r})")
        return "refused"
    except Exception as e:
        raise Violation(f"parse({name[:200]!r}) raised {type(e).__name__}: {e}") from e
    if not isinstance(cmd, P.Command):
        raise Violation(f"parse({name!r}) returned {cmd!r}")
    if cmd.verb in P.ARGS:  # what parse accepts, build writes back the same
        again = P.parse(P.build(cmd.verb, **cmd.args))
        if again != cmd:
            raise Violation(f"parse/build round trip differs for {name!r}: {cmd} vs {again}")
    return "parsed"


def target_manifest(data: bytes) -> str:
    from engine.errors import InvalidArgument
    from engine.replication import protocol as P
    r = Reader(data)
    nchunk = r.choice([0, 1, 2, 16, 1 << 20, 1 << 64])
    body = r.rest()
    try:
        out = P.decode_manifest(body, nchunk)
    except InvalidArgument as e:
        check_error(e, "decode_manifest")
        return "refused"
    except Exception as e:
        raise Violation(f"decode_manifest raised {type(e).__name__}: {e}") from e
    if P.encode_manifest(sorted(out.items())) != body:
        raise Violation("decode/encode round trip differs")
    return "decoded"


# ---------------------------------------------------------------- registry

TARGETS = {
    "segments": target_segments,
    "checkpoint": target_checkpoint,
    "volume_json": target_volume_json,
    "control": target_control,
    "replication_json": target_replication_json,
    "export_name": target_export_name,
    "manifest": target_manifest,
}
# targets whose input reaches the C engine: run in a worker subprocess (a crash is caught)
NATIVE = {"segments", "checkpoint", "volume_json", "control"}
