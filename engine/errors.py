"""The error tree. Each class says what the caller should do; the CLI maps them to one
``blockrep: error: …`` line and exit code 1, the nbdkit plugin maps them to one errno."""

import errno as _errno


class BlockrepError(Exception):
    """Base of every error blockrep reports to a user. Not worth retrying unless a subclass says so."""

    errno = _errno.EIO


class InvalidArgument(BlockrepError):
    """Bad input from the user (size, name, flag). Fix the command; nothing was changed."""

    errno = _errno.EINVAL


class NotFound(BlockrepError):
    """The volume (or snapshot) does not exist."""

    errno = _errno.ENOENT


class AlreadyExists(BlockrepError):
    """Refusing to overwrite something that exists."""

    errno = _errno.EEXIST


class VolumeBusy(BlockrepError):
    """Another process owns the volume (it is being served). Stop it or go through the server."""

    errno = _errno.EBUSY


class UnsupportedFormat(BlockrepError):
    """The on-disk format version is not one this blockrep reads. Use a matching release."""

    errno = _errno.EPROTO


class CorruptionError(BlockrepError):
    """Stored data failed its checksum or a metadata file is damaged. Do not retry; restore.
    (The C engine says EBADMSG; clients see EIO.)"""

    errno = _errno.EIO


class DiskError(BlockrepError):
    """The disk under the volume failed an I/O (EIO from the kernel): nothing was found damaged,
    the operation was not done. Check the disk (dmesg, SMART); a retry may succeed."""

    errno = _errno.EIO


class NoSpace(BlockrepError):
    """The filesystem under the volume is full. Retry after freeing space."""

    errno = _errno.ENOSPC


class ReadOnly(BlockrepError):
    """A write to a read-only export (a snapshot)."""

    errno = _errno.EROFS


class ServerError(BlockrepError):
    """nbdkit could not be started or stopped."""


_BY_ERRNO = {
    _errno.EINVAL: InvalidArgument,
    _errno.ENOENT: NotFound,
    _errno.EEXIST: AlreadyExists,
    _errno.ENOSPC: NoSpace,
    _errno.EDQUOT: NoSpace,
    _errno.EROFS: ReadOnly,
    _errno.EPROTO: UnsupportedFormat,
    _errno.EIO: DiskError,
    _errno.EBADMSG: CorruptionError,
}


def from_errno(err: int, message: str) -> BlockrepError:
    """The error class for an errno returned by the C engine, keeping that errno (EBADMSG, the
    engine's word for corruption, becomes EIO: what an NBD client can be told)."""
    cls = _BY_ERRNO.get(err, BlockrepError)
    e = cls(message)
    e.errno = _errno.EIO if err == _errno.EBADMSG else err
    return e


class Protected(BlockrepError):
    """Refused: replication still needs this snapshot (a target's common base, or not yet
    shipped). Use --force to delete it anyway (the next run to that target then sends more)."""

    errno = _errno.EBUSY


class Paused(BlockrepError):
    """A transfer stopped on request (its window closed, the scheduler stopping), not by a fault:
    its confirmed prefix is saved and the next run of the same transfer resumes after it."""

    errno = _errno.EINTR
