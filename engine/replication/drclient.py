"""The primary's side of the DR protocol (docs/REPLICATION.md §2-3): one function per command.

Every call opens its own connection to the DR server (the export name is the command). A
refusal is final (TransferError transient=False) and carries the DR's reason.
"""

from __future__ import annotations

import json

import nbd

from ..errors import InvalidArgument
from . import protocol as P
from .nbdio import TransferError, close, connect, connection, export_description, read_all


def is_blockrep(uri: str) -> tuple[dict, bool]:
    """(size, read_only, description) of the URI's export, and whether a blockrep server serves it."""
    with connection(uri) as h:
        info = {"size": h.get_size(), "read_only": h.is_read_only(), "description": export_description(h),
                "export": h.get_export_name(), "multi_conn": h.can_multi_conn()}
    return info, info["description"].startswith("blockrep volume")


def blockrep_peer(uri: str, unreachable: str, not_blockrep: str) -> tuple[dict, dict]:
    """(export info, !hello reply) of a blockrep server; TransferError "UNREACHABLE: why" if it
    cannot be reached, InvalidArgument(not_blockrep) if it is another kind of NBD server."""
    try:
        info, is_br = is_blockrep(uri)
    except TransferError as e:
        raise TransferError(f"{unreachable}: {e}", transient=False) from None
    if not is_br:
        raise InvalidArgument(not_blockrep)
    return info, hello(uri)


def _json(uri: str, export: str) -> dict:
    with connection(uri, export, meta=False) as h:
        data = read_all(h)
    try:
        return json.loads(data)
    except ValueError:
        raise TransferError(f"the DR sent an unreadable reply to {export.split('?')[0]}", transient=False) from None


def hello(uri: str) -> dict:
    try:
        return _json(uri, "!hello")
    except TransferError as e:
        raise TransferError(f"{uri} is a blockrep server without the DR protocol this blockrep speaks "
                            f"(upgrade it): {e}", transient=e.transient) from None


class Session:
    """An open transfer: the begin connection is held for the whole run (the DR refuses a second
    transfer while it is open); close() releases it (commit or not)."""

    def __init__(self, uri: str, *, primary: str, snap: str, name: str, base: str | None, token: str,
                 force: bool):
        self.uri, self.token = uri, token
        try:
            self.h = connect(uri, P.build("begin", primary=primary, snap=snap, name=name, base=base,
                                          token=token, force=force), meta=False)
        except TransferError as e:
            # NBD carries no reason text: the DR logged it (server.log); say what we know
            raise TransferError(f"the DR refused to begin the transfer of {name} (its server.log says why; "
                                f"another transfer may be running): {e}", transient=False) from None
        try:
            self.reply = json.loads(read_all(self.h))
        except (ValueError, TransferError):
            self.reply = {}

    @property
    def data_export(self) -> str:
        return P.build("data", token=self.token)

    def write_manifest(self, entries: bytes) -> None:
        with connection(self.uri, P.build("manifest", token=self.token), meta=False) as h:
            try:
                for o in range(0, len(entries), 16 << 20):
                    h.pwrite(entries[o:o + (16 << 20)], o)
                h.flush()
            except nbd.Error as e:
                raise TransferError(f"writing the manifest: {e.string}") from None

    def commit(self, entries: int, shift: int, keep: int | None, gfs: dict | None = None) -> dict:
        """Commit; keep/gfs: the retention asked of the DR (it decides). GFS counts go only to a
        DR that announced "keep_gfs" in its begin reply: an older one refuses arguments it does not
        know, so it gets the count alone and the reply's keep_request says so."""
        gfs_ok = isinstance(self.reply, dict) and "keep_gfs" in (self.reply.get("features") or ())
        asked = P.gfs_text(gfs) is not None
        res = _json(self.uri, P.build("commit", token=self.token, entries=entries, shift=shift, keep=keep,
                                      gfs=gfs if gfs_ok else None))
        if asked and not gfs_ok:
            res["keep_request"] = (f"{res.get('keep_request')}; GFS counts not sent: this DR does not take them "
                                   "(upgrade it)")
        return res

    def abort(self) -> None:
        try:
            with connection(self.uri, P.build("abort", token=self.token), meta=False):
                pass
        except TransferError:
            pass

    def close(self) -> None:
        close(self.h)


def changes(uri: str, base_name: str) -> list[tuple[int, int]]:
    """Extents the DR head changed since its snapshot base_name."""
    with connection(uri, f"!changes@{base_name}", meta=False) as h:
        data = read_all(h)
    return [(int.from_bytes(data[i:i + 8], "little"), int.from_bytes(data[i + 8:i + 16], "little"))
            for i in range(0, len(data), 16)]
