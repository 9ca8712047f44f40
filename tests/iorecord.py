"""Receive every system call the engine makes through its I/O layer (csrc/io.h) in Python:
the recorder for crash-state tests (R4) and a way to pause a thread at an exact call.
One handler at a time; the handler runs on the calling thread (with the GIL)."""

from __future__ import annotations

from engine import _native

ffi, lib = _native.ffi, _native.lib
PWRITE, FDATASYNC, FSYNCDIR, OPENAT, RENAMEAT, UNLINKAT, FTRUNCATE, MKDIRAT, PUNCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_handler = None


@ffi.def_extern()
def _io_recorder(op, ino, dirino, name, name2, buf, length, off, result):
    h = _handler
    if h is None:
        return
    h(op, ino, dirino,
      ffi.string(name).decode() if name != ffi.NULL else None,
      ffi.string(name2).decode() if name2 != ffi.NULL else None,
      bytes(ffi.buffer(buf, length)) if op == PWRITE and buf != ffi.NULL else None,
      length, off, result)


def start(handler) -> None:
    global _handler
    _handler = handler
    lib.vol_io_record(lib._io_recorder)


def stop() -> None:
    global _handler
    lib.vol_io_record(ffi.NULL)
    _handler = None
