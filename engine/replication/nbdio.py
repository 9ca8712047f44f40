"""libnbd connections and requests that stay within the protocol's and libnbd's limits.

Notes on the design:
- libnbd 1.14 refuses block status counts above 4 GiB - 1 and reads or writes above 64 MiB
  ("request too large"); servers may refuse more than 32 MiB. Every helper here steps through a
  range in bounded requests (block status by STATUS_STEP, as ovirt-imageio's nbdutil does;
  data by MAX_IO), so callers may ask for any range of a 16 TiB export.
- Errors are TransferError with `transient`: True when retrying may help (the connection broke,
  the server went away, a timeout), False when it cannot (the request itself is wrong: EINVAL,
  ERANGE, EPERM, EROFS, ENOSPC on a full target, a refused identity). The caller retries only the
  transient ones.
- A TLS handshake that fails (GnuTLS: "The TLS connection was non-properly terminated" when the
  server does not know the user or the key does not match; nbdkit tells the client no more) is
  TLSAuthError, not a TransferError: no retry fixes a wrong key, and it must not read as "target
  unreachable" to the operator who has to fix the PSK file or the URI's user.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
from collections.abc import Iterator

import nbd

from ..errors import BlockrepError

STATUS_STEP = 1 << 31  # block status per request (libnbd's limit is 4 GiB - 1)
MAX_IO = 32 << 20  # bytes per read/write request (the NBD servers' usual maximum)
ZERO_STEP = 1 << 30  # bytes per write-zeroes request

# errnos a retry cannot fix: the request, the permissions or the target are wrong
PERMANENT = frozenset({_errno.EINVAL, _errno.ERANGE, _errno.EPERM, _errno.EROFS, _errno.EACCES,
                       _errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG, _errno.EOVERFLOW, _errno.ENOTSUP,
                       _errno.EEXIST, _errno.ENOENT})


class TransferError(BlockrepError):
    """A request to an NBD server failed; `transient` (link loss, server gone) means a retry may
    succeed, otherwise fail at once."""

    def __init__(self, msg: str, transient: bool = True):
        super().__init__(msg)
        self.transient = transient


class TLSAuthError(BlockrepError):
    """The TLS handshake with the server failed: the PSK file's key or the URI's user is not one
    the server holds. Fix the key or the user; retrying cannot help (transient is False)."""

    errno = _errno.EACCES
    transient = False


def tls_handshake_failed(e: nbd.Error) -> bool:
    """A handshake the server ended (or answered with an alert), not one the socket broke under
    (GnuTLS's "Error in the pull/push function" is a connection reset: transient); or the URI's
    user is not in our own PSK file (libnbd: "username U was not found in PSK file")."""
    text = e.string or ""
    if "not found in PSK file" in text:
        return True
    return "gnutls_handshake" in text and "pull function" not in text and "push function" not in text


def is_transient(e: nbd.Error) -> bool:
    """Whether a libnbd error may go away on retry. (`e.errno` is the errno's name, e.g. "EPERM";
    `e.errnum` the number.) A request on a connection that already died or was closed by the
    server fails with EINVAL and "invalid state: DEAD" or "... is invalid in state CLOSED": the
    connection was lost, so those are transient."""
    text = (e.string or "").lower()
    if tls_handshake_failed(e):
        return False
    if "invalid state" in text or "invalid in state" in text:
        return True
    if e.errnum in PERMANENT:
        return False
    return "too large" not in text and "invalid" not in text


def errno_transient(err: int) -> bool:
    """Whether a request that failed with errno `err` (an async completion's error) may succeed
    on retry; ENOTCONN, ECONNRESET, EIO, ETIMEDOUT... may."""
    return err not in PERMANENT


def error(what: str, e: nbd.Error) -> TransferError:
    return TransferError(f"{what}: {e.string}", transient=is_transient(e))


def errno_error(what: str, err: int) -> TransferError:
    return TransferError(f"{what}: {os.strerror(err)}", transient=errno_transient(err))


def connect(uri: str, export: str | None = None, *, meta: bool = True) -> nbd.NBD:
    """A libnbd connection to uri, or to another export of the same server."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-psk-file= in nbds:// URIs
    h.set_full_info(True)  # ask for the export description (how a blockrep DR is recognised)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    where = f"{uri}" + (f" (export {export!r})" if export is not None else "")
    try:
        if export is not None:
            h.set_opt_mode(True)
        h.connect_uri(uri)
    except nbd.Error as e:
        if tls_handshake_failed(e):
            raise TLSAuthError(f"TLS handshake failed: wrong PSK or user? ({where}: {e.string})") from None
        # the socket could not be reached (a server restarting: its Unix socket may be missing
        # for a moment, ENOENT) may come back; the caller's first contact (probe) decides that
        # an unreachable target is not worth a minute of retries
        socket_level = "connect:" in (e.string or "")
        raise TransferError(f"cannot connect to {where}: {e.string}",
                            transient=socket_level or is_transient(e)) from None
    if export is not None:
        try:
            h.set_export_name(export)
            h.opt_go()
        except nbd.Error as e:
            # refused at open (a DR command the server turned down) is the server's final word
            raise TransferError(f"cannot connect to {where}: {e.string}", transient=False) from None
    return h


def close(h: nbd.NBD | None) -> None:
    if h is None:
        return
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def abandon(h: nbd.NBD | None) -> None:
    """Close the connection at once, dropping the commands still in flight (after an error: a
    polite shutdown would wait for a server that may never answer). libnbd 1.14's Python
    binding has no close(); nbd_close is what its __del__ calls, done now instead of whenever
    the last reference (a traceback's frame, say) goes away."""
    if h is None:
        return
    if hasattr(h, "close"):  # libnbd >= 1.16
        h.close()
    elif hasattr(h, "_o"):
        nbd.libnbdmod.close(h._o)
        del h._o


@contextlib.contextmanager
def connection(uri: str, export: str | None = None, *, meta: bool = True):
    h = connect(uri, export, meta=meta)
    try:
        yield h
    finally:
        close(h)


def block_status(h: nbd.NBD, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) runs covering [offset, offset + length), coalesced, asked for
    in requests of at most STATUS_STEP bytes. A server without base:allocation reports data."""
    end = offset + length
    pos = offset
    have = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    run_off, run_len, run_zero = offset, 0, False
    while pos < end:
        got: list[tuple[int, int]] = []
        if have:
            def cb(metacontext, off, entries, err, got=got):
                if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                    got.extend((entries[i], entries[i + 1]) for i in range(0, len(entries), 2))
                return 0
            try:
                h.block_status(min(STATUS_STEP, end - pos), pos, cb)
            except nbd.Error as e:
                raise error(f"block status at {pos}", e) from None
        if not got:
            got = [(min(STATUS_STEP, end - pos), 0)]
        for n, flags in got:
            n = min(n, end - pos)
            if n <= 0:
                break
            zero = bool(flags & nbd.STATE_ZERO)
            if run_len and zero == run_zero:
                run_len += n
            else:
                if run_len:
                    yield run_off, run_len, run_zero
                run_off, run_len, run_zero = pos, n, zero
            pos += n
            if pos >= end:
                break
    if run_len:
        yield run_off, run_len, run_zero


def pread(h: nbd.NBD, count: int, offset: int) -> bytes:
    """Read any count in requests of at most MAX_IO bytes."""
    try:
        if count <= MAX_IO:
            return h.pread(count, offset)
        return b"".join(h.pread(min(MAX_IO, offset + count - o), o) for o in range(offset, offset + count, MAX_IO))
    except nbd.Error as e:
        raise error(f"read of {count} bytes at {offset}", e) from None


def read_all(h: nbd.NBD, ranges: list[tuple[int, int]] | None = None) -> bytes:
    """The whole (small) export, or the given (offset, length) ranges, concatenated."""
    if ranges is None:
        size = h.get_size()
        return pread(h, size, 0) if size else b""
    return b"".join(pread(h, n, o) for o, n in ranges)


def export_description(h: nbd.NBD) -> str:
    with contextlib.suppress(nbd.Error):
        return h.get_export_description() or ""
    return ""
