"""The owner's lock (docs/FORMAT.md §6): one process owns an open volume, by an exclusive flock
on VOL/lock held until close; a second opener gets VolumeBusy at once."""

from __future__ import annotations

import errno as _errno
import fcntl
import os
from pathlib import Path

from ..errors import VolumeBusy, from_errno


class Lock:
    """Exclusive ownership of a volume (flock on VOL/lock); released when the process dies."""

    def __init__(self, path: Path):
        self.path = path / "lock"
        self.fd = -1

    def acquire(self, write_pid: bool = True) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise from_errno(e.errno or _errno.EIO, f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise VolumeBusy(f"volume {self.path.parent} is in use by another process "
                             "(is it being served? run 'blockrep stop' first)") from None
        if write_pid:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def held(path: Path) -> bool:
        """True when some process owns the volume."""
        try:
            fd = os.open(path / "lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
