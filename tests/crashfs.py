"""A model of what a power cut leaves of files, fed by the engine's I/O recorder (tests/iorecord.py).

Notes on the design (the rules of a POSIX filesystem after a crash, as LevelDB's
fault-injection env and CrashMonkey use them):
- A file's bytes are durable up to its last fdatasync/fsync; writes and truncations after it may
  each have reached the disk or not (any subset, in any order), and a write may be torn.
- A name (create, rename, unlink) is durable once its directory was fsynced; before that the
  directory may show the old or the new entry.
- Files are named by inode number (what the recorder reports), so renames keep contents.
`state(k)` replays the first k recorded calls; `image(...)` writes one possible crash image."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import iorecord as io


@dataclass
class Inode:
    dur: bytes = b""
    cur: bytearray = field(default_factory=bytearray)
    pending: list = field(default_factory=list)  # ("w", off, data) | ("t", length) since the last sync


def _apply(buf: bytearray, op) -> None:
    if op[0] == "w":
        _, off, data = op
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
    else:
        del buf[op[1]:]
        if len(buf) < op[1]:
            buf.extend(bytes(op[1] - len(buf)))


class CrashFS:
    """Tracks the directories given (by path) from their current, fully durable contents."""

    def __init__(self, dirs: list[Path]):
        self.paths = {os.stat(d).st_ino: Path(d) for d in dirs}
        self.log: list[tuple] = []
        self.initial_inodes: dict[int, bytes] = {}
        self.initial_dirs: dict[int, dict[str, int]] = {}
        for ino, d in self.paths.items():
            names = {}
            for f in d.iterdir():
                if f.is_file() and f.name != "lock":
                    st = f.stat()
                    names[f.name] = st.st_ino
                    self.initial_inodes[st.st_ino] = f.read_bytes()
            self.initial_dirs[ino] = names

    def record(self, op, ino, dirino, name, name2, data, length, off, result) -> None:
        if result < 0:
            return  # a failed call changed nothing
        if op in (io.OPENAT, io.RENAMEAT, io.UNLINKAT, io.MKDIRAT, io.FSYNCDIR) and \
                (dirino if op != io.FSYNCDIR else ino) not in self.paths:
            return
        self.log.append((op, ino, dirino, name, name2, data, length, off))

    def state(self, k: int):
        """(inodes, dirs) after the first k calls; inode numbers freed and reused by a new file get
        a new identity (a name still durable for the old file keeps the old contents)."""
        inodes = {i: Inode(dur=b, cur=bytearray(b)) for i, b in self.initial_inodes.items()}
        dirs = {i: (dict(n), dict(n)) for i, n in self.initial_dirs.items()}
        ident = {i: i for i in inodes}
        gen = [0]
        def cur_id(ino):
            return ident.setdefault(ino, ino)
        for op, ino, dirino, name, name2, data, length, off in self.log[:k]:
            if op == io.PWRITE:
                node = inodes.setdefault(cur_id(ino), Inode())
                w = ("w", off, data)
                _apply(node.cur, w)
                node.pending.append(w)
            elif op == io.PUNCH:  # a hole reads as zeros; unsynced, it may or may not be there
                node = inodes.setdefault(cur_id(ino), Inode())
                w = ("w", off, bytes(length))
                _apply(node.cur, w)
                node.pending.append(w)
            elif op == io.FTRUNCATE:
                node = inodes.setdefault(cur_id(ino), Inode())
                _apply(node.cur, ("t", length))
                node.pending.append(("t", length))
            elif op == io.FDATASYNC:
                node = inodes.setdefault(cur_id(ino), Inode())
                node.dur = bytes(node.cur)
                node.pending = []
            elif op == io.FSYNCDIR:
                dur, cur = dirs[ino]
                dur.clear()
                dur.update(cur)
            elif op == io.OPENAT:
                c = dirs[dirino][1]
                if c.get(name) is None or c.get(name) != ident.get(ino):
                    gen[0] += 1  # a new file (perhaps a reused inode number)
                    ident[ino] = ("new", ino, gen[0])
                    inodes[ident[ino]] = Inode()
                node = inodes.setdefault(cur_id(ino), Inode())
                if length:  # O_TRUNC
                    _apply(node.cur, ("t", 0))
                    node.pending.append(("t", 0))
                c[name] = cur_id(ino)
            elif op == io.RENAMEAT:
                cur = dirs[dirino][1]
                if name in cur:
                    cur[name2] = cur.pop(name)
            elif op == io.UNLINKAT:
                dirs[dirino][1].pop(name, None)
        return inodes, dirs

    def image(self, k: int, dst: Path, mode: str, rnd: random.Random, meta: dict[str, bytes]) -> None:
        """Write one crash image of state k under dst (the volume dir and its segments/).
        mode: "durable" (only synced bytes and names), "cache" (everything, as a process kill
        leaves it), "random" (a random subset of what was not synced, the last write maybe torn)."""
        inodes, dirs = self.state(k)
        for dino, path in self.paths.items():
            rel = Path(*path.parts[len(self._root().parts):]) if path != self._root() else Path(".")
            out = dst / rel
            out.mkdir(parents=True, exist_ok=True)
            dur, cur = dirs[dino]
            if mode == "durable":
                names = dur
            elif mode == "cache":
                names = cur
            else:
                names = {}
                for n in set(dur) | set(cur):
                    pick = rnd.choice([dur, cur])
                    if n in pick:
                        names[n] = pick[n]
            for n, ino in names.items():
                node = inodes.get(ino, Inode())
                if mode == "durable":
                    data = node.dur
                elif mode == "cache":
                    data = bytes(node.cur)
                else:
                    buf = bytearray(node.dur)
                    chosen = [p for p in node.pending if rnd.random() < 0.5]
                    for i, p in enumerate(chosen):
                        if i == len(chosen) - 1 and p[0] == "w" and rnd.random() < 0.5:
                            cut = rnd.randrange(0, len(p[2]) + 1) // 512 * 512
                            p = ("w", p[1], p[2][:cut])
                        _apply(buf, p)
                    data = bytes(buf)
                (out / n).write_bytes(data)
        for name, data in meta.items():  # written once, durable before the workload
            if not (dst / name).exists():
                (dst / name).write_bytes(data)

    def _root(self) -> Path:
        return min(self.paths.values(), key=lambda p: len(p.parts))
