"""The DR side of replication, run by the plugin inside the DR's nbdkit (docs/REPLICATION.md §2-4).

Notes on the design:
- NBD alone, no extra listener: every DR command is an export name (protocol.py parses it
  strictly) opened after the handshake, so behind TLS-PSK when the server requires it.
- Append-only: there is no command that deletes or rewrites a committed snapshot. A primary adds
  snapshots through a transfer: `!begin` (identity checks, one live transfer per head), `!data`
  writes, `!manifest`, then `!commit`, where this side verifies every chunk the delta touched
  against the manifest with digests it computes itself before it creates the snapshot.
- Retention is the DR's own (`serve --keep N`, `--keep-hourly` … `--keep-monthly`: GFS, gfs.py);
  a primary's request (`keep=`, `gfs=` at commit) counts only with `--allow-remote-prune`, and
  only adds to what the DR's own rules keep (retention.dr_plan).
- Every change and every refusal is logged on `blockrep.dr` (server.log) with the peer.
- Roles (REPLICATION.md §9): a DR (`bound_to` set) takes transfers from its primary only; a
  promoted one (failover: `promoted.from` = its old primary) never takes them from it again,
  `--force` or not, until `demote` binds it to a primary anew.
- Locking: callbacks of different connections run at once (SERIALIZE_REQUESTS); `DRServer.lock`
  guards the transfer and dr.json. Data writes check one attribute (`transfer.writable`).

Handles (what the plugin's open returns) are typed objects: `kind` 0 = the head (reads with
vol_read), 1 = a snapshot (vol_snap_read of `map_id`), 2 = a command export (its own pread/pwrite).
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .. import ops
from ..errors import AlreadyExists, BlockrepError, CorruptionError, InvalidArgument, NotFound, VolumeBusy
from ..volume import Volume, validate_snapshot_name
from . import protocol as P
from . import retention
from .gfs import check_counts

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("blockrep.dr")
STATE = "dr.json"
MANIFEST = "dr-manifest"
CONTROL = "control socket"  # the peer of promote and demote (a local root command)
FLAG_REPLICATED = 2  # snapshot flag: committed by a DR transfer (bit 0 is "made by replicate")


class Refused(BlockrepError):
    """A DR command refused for a reason the client must not retry blindly."""

    def __init__(self, msg: str, err: int):
        super().__init__(msg)
        self.errno = err


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- handles

class Handle:
    kind = 0
    map_id = 0
    writable = False
    transfer: Transfer | None = None  # for !data and !manifest handles: writes need transfer.writable
    size = 0

    def close(self) -> None:
        pass


class Head(Handle):
    def __init__(self, vol: Volume, writable: bool, owner: DRServer, own: bool = False):
        self.size, self.writable, self.owner, self.own = vol.size, writable, owner, own
        with owner.heads_lock:  # every open of the live export: restore refuses while others have one
            owner.heads[own] += 1

    def close(self) -> None:
        with self.owner.heads_lock:
            self.owner.heads[self.own] -= 1
        if self.writable:
            with self.owner.lock:
                self.owner.rw_heads -= 1


class Snap(Handle):
    kind = 1

    def __init__(self, vol: Volume, map_id: int):
        self.size, self.map_id = vol.size, map_id


class Blob(Handle):
    kind = 2

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def pread(self, buf, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


class Sums(Handle):
    kind = 2

    def __init__(self, vol: Volume, map_id: int, shift: int):
        self.vol, self.map_id, self.shift = vol, map_id, shift
        self.size = P.nchunks(vol.size, shift) * P.SUM_BYTES

    def pread(self, buf, offset: int) -> None:
        first = offset // P.SUM_BYTES
        last = (offset + len(buf) - 1) // P.SUM_BYTES
        out = digests(self.vol, self.map_id, self.shift, first, last + 1)
        skip = offset - first * P.SUM_BYTES
        buf[:] = out[skip:skip + len(buf)]


class Data(Handle):
    """The head, written by the transfer that holds the token (REPLICATION.md §2)."""

    writable = True

    def __init__(self, vol: Volume, transfer: Transfer):
        self.size, self.transfer = vol.size, transfer


class Manifest(Handle):
    kind = 2
    writable = True
    size = P.MANIFEST_MAX

    def __init__(self, path: Path, transfer: Transfer):
        self.transfer = transfer
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def pread(self, buf, offset: int) -> None:
        data = os.pread(self.fd, len(buf), offset)
        buf[:] = data + bytes(len(buf) - len(data))

    def pwrite(self, buf, offset: int) -> None:
        # the plugin brackets this call with transfer.enter()/leave()
        if offset + len(buf) > P.MANIFEST_MAX:
            raise Refused("the manifest is at most 1 GiB", _errno.ENOSPC)
        os.pwrite(self.fd, buf, offset)

    def close(self) -> None:
        os.close(self.fd)


class Session(Blob):
    """The begin connection: its transfer is live while it is open."""

    def __init__(self, data: bytes, transfer: Transfer, owner: DRServer):
        super().__init__(data)
        self.transfer_ref, self.owner = transfer, owner

    def close(self) -> None:
        with self.owner.lock:
            self.transfer_ref.live -= 1


# ---------------------------------------------------------------- digests

def data_chunks(vol: Volume, map_id: int, shift: int, first: int, end: int) -> np.ndarray:
    """Boolean per chunk in [first, end): True where the map holds data (not a hole)."""
    import numpy as np  # numpy is imported where a DR transfer needs it: nbdkit starts 0.1 s sooner
    out = np.zeros(end - first, dtype=bool)
    lo, hi = first << shift, min(end << shift, vol.size)
    pos = lo
    while pos < hi:
        ext = vol.extents(hi - pos, pos, 1024, snapshot=map_id)
        for o, n, t in ext:
            if t == 0:
                a, b = max(o, lo), min(o + n, hi)
                if a < b:
                    out[(a >> shift) - first:((b - 1) >> shift) - first + 1] = True
        last = ext[-1]
        pos = last[0] + last[1]
    return out


def chunk_len(size: int, shift: int, idx: int) -> int:
    return min(1 << shift, size - (idx << shift))


def digests(vol: Volume, map_id: int, shift: int, first: int, end: int) -> bytes:
    """Digests of chunks [first, end) of a map; holes are not read (their digest is known)."""
    import numpy as np
    has = data_chunks(vol, map_id, shift, first, end)
    out = np.full(end - first, np.frombuffer(P.zero_sum(1 << shift), dtype="V16")[0], dtype="V16")
    last = P.nchunks(vol.size, shift) - 1
    if first <= last < end:
        out[last - first] = np.frombuffer(P.zero_sum(chunk_len(vol.size, shift, last)), dtype="V16")[0]
    for k in np.flatnonzero(has).tolist():
        n = chunk_len(vol.size, shift, first + k)
        data = vol.snapshot_read(map_id, n, (first + k) << shift) if map_id else vol.read(n, (first + k) << shift)
        out[k] = np.frombuffer(P.chunk_sum(data), dtype="V16")[0]
    return out.tobytes()


# ---------------------------------------------------------------- the DR server

class Transfer:
    """An open transfer. Writes through its handles run between enter() and leave(); close_writes()
    stops new ones and waits for those in flight, so a commit verifies a head nobody is writing."""

    def __init__(self, rec: dict):
        self.rec = rec  # persisted part (dr.json "transfer")
        self.live = 0  # open begin connections
        self.writable = True
        self.inflight = 0
        self.cond = threading.Condition()

    def enter(self) -> bool:
        with self.cond:
            if not self.writable:
                return False
            self.inflight += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.inflight -= 1
            if not self.inflight:
                self.cond.notify_all()

    def close_writes(self) -> None:
        with self.cond:
            self.writable = False
            while self.inflight:
                self.cond.wait()

    def open_writes(self) -> None:
        with self.cond:
            self.writable = True

    def matches(self, token: str) -> bool:
        return self.rec["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()


class DRServer:
    """The DR commands of one served volume. `peer()` describes the current client for logs."""

    def __init__(self, vol: Volume, *, keep: int | None = None, allow_remote_prune: bool = False,
                 keep_min_age: int = 86400, peer=lambda: "unknown", gfs: dict | None = None):
        self.vol, self.keep, self.allow_remote_prune, self.peer = vol, keep, allow_remote_prune, peer
        self.keep_min_age = keep_min_age
        self.gfs = check_counts(gfs)  # the DR's own GFS counts (serve --keep-hourly …), None: none
        self.lock = threading.RLock()
        self.rw_heads = 0
        # head_exclusive (restore, rollback): [token, pid] of the holder; heads[own]: open live exports
        self.heads_lock = threading.Lock()
        self.heads = {False: 0, True: 0}
        self.exclusive: tuple[str, int] | None = None
        self.stream_from: str | None = None  # the holder is a receive of a stream from this primary
        self.path = vol.path / STATE
        self.state = self._load()
        rec = self.state.get("transfer")
        self.transfer: Transfer | None = Transfer(rec) if rec else None

    # ---- dr.json
    def _load(self) -> dict:
        try:
            st = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"bound_to": None, "snapshots": {}, "transfer": None}
        except ValueError as e:
            raise CorruptionError(f"{self.path} is damaged: {e}") from None
        st.setdefault("snapshots", {})
        st.setdefault("transfer", None)
        return st

    def _save(self) -> None:
        self.state["transfer"] = self.transfer.rec if self.transfer else None
        tmp = self.path.with_name(STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def bound(self) -> bool:
        return bool(self.state.get("bound_to"))

    @property
    def role(self) -> str:
        return role_of(self.state)

    @property
    def promoting(self) -> bool:
        """A promote began and did not finish: the head is in between, read-only but to its holder."""
        pr = self.state.get("promoted") or {}
        return bool(pr) and not pr.get("complete")

    def audit(self, what: str, peer: str | None = None) -> None:
        log.info("DR %s [peer %s]", what, peer or self.peer())

    def refuse(self, what: str, msg: str, err: int) -> NoReturn:
        log.warning("DR refused %s: %s [peer %s]", what, msg, self.peer())
        raise Refused(msg, err)

    # ---- open
    def _holder(self) -> tuple[str, int] | None:
        """The live holder of head_exclusive (one that died has released it)."""
        ex = self.exclusive
        if ex is not None:
            try:
                os.kill(ex[1], 0)
            except ProcessLookupError:
                self.exclusive = ex = None
            except PermissionError:
                pass
        return ex

    def head_exclusive(self, token: str, pid: int, force: bool = False, stream_from: str | None = None) -> dict:
        """Control op: the live export to one holder (restore, rollback, receive): refused while
        other clients have it open unless force; new clients are refused until head_release.
        stream_from: the holder is a receive of a stream sent from that primary volume, which may
        write the head of a DR bound to it (a DR updated offline); no live transfer may run then."""
        P.parse(P.build("restore", token=token))  # a well-formed token
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise InvalidArgument("pid must be a process id")
        if stream_from is not None:
            with self.lock:
                bound = self.state.get("bound_to")
                if bound and bound != stream_from:
                    raise InvalidArgument(f"this volume is a DR of another primary ({bound}); the stream is from "
                                          f"{stream_from}")
                t = self.transfer
                if t is not None and t.live > 0:
                    raise VolumeBusy(f"a transfer from the primary is in progress (snapshot {t.rec['name']}): "
                                     "receive a stream when it is over")
        with self.heads_lock:
            ex = self._holder()
            if ex is not None and ex[0] != token:
                raise VolumeBusy(f"the live volume is already held by pid {ex[1]} (a restore, rollback, promote, "
                                 "demote or receive)")
            others = self.heads[False]
            if others and not force:
                raise VolumeBusy(f"{others} client(s) are connected to the live export of {self.vol.path}: "
                                 "disconnect them (unmount, stop the VM) or --force")
            self.exclusive, self.stream_from = (token, pid), stream_from
        log.info("live export held by pid %d (restore, rollback, promote, demote or receive); %d other client(s) "
                 "connected", pid, others)
        return {"others": others}

    def snapshot_create(self, holder: str | None = None, **args) -> dict:
        """The control op snapshot_create: while a restore, rollback or promote holds the head,
        only it may take one (a scheduled snapshot then would hold a half-replaced volume)."""
        ex = self._holder()
        if ex is not None and ex[0] != holder:
            raise VolumeBusy(f"the live volume is being replaced (restore, rollback or promote, pid {ex[1]}): "
                             "a snapshot now would hold it half done; try again when it is done")
        return ops.snapshot_create(self.vol, **args)

    def head_release(self, token: str) -> None:
        with self.heads_lock:
            if self.exclusive is not None and self.exclusive[0] == token:
                self.exclusive = None
                log.info("live export released")

    def cmd_restore(self, token: str) -> Handle:
        ex = self._holder()
        if self.bound and not (ex is not None and ex[0] == token and self.stream_from == self.state["bound_to"]):
            self.refuse("restore", "this is a bound DR: its head is written by transfers (and streams from "
                        "its primary) only", _errno.EROFS)
        if ex is None or ex[0] != token:
            self.refuse("restore", "no restore holds the live export with this token", _errno.EPERM)
        with self.lock:
            self.rw_heads += 1
        return Head(self.vol, True, self, own=True)

    def open_head(self, readonly: bool) -> Handle:
        ex = self._holder()
        if ex is not None:
            self.refuse("the live export", f"being replaced by pid {ex[1]} (restore, rollback, promote, demote "
                        "or receive): try again when it is done",
                        _errno.EBUSY)
        if readonly or self.bound or self.promoting:  # no lock: a long commit must not hold up readers
            return Head(self.vol, False, self)
        with self.lock:
            writable = not self.bound and not self.promoting
            if writable:
                self.rw_heads += 1
            return Head(self.vol, writable, self)

    def open_snapshot(self, name: str) -> Handle:
        try:
            return Snap(self.vol, self.vol.snapshot(validate_snapshot_name(name))["id"])
        except BlockrepError as e:
            self.refuse(f"export @{name[:70]!r}", str(e), e.errno)

    def open_command(self, name: str, readonly: bool) -> Handle:
        try:
            cmd = P.parse(name)
        except InvalidArgument as e:
            self.refuse(f"export {name[:80]!r}", str(e), _errno.EINVAL)
        if cmd.verb == "hello":
            return Blob(json.dumps(self.hello()).encode())
        try:
            if cmd.verb == "sums":
                map_id = self.vol.snapshot(cmd.snapshot)["id"] if cmd.snapshot else 0
                return Sums(self.vol, map_id, cmd.shift)
            if cmd.verb == "changes":
                ext = self.vol.diff_ids(self.vol.snapshot(cmd.snapshot or "")["id"], 0)
                return Blob(b"".join(o.to_bytes(8, "little") + n.to_bytes(8, "little") for o, n in ext))
        except BlockrepError as e:
            self.refuse(name[:80], str(e), e.errno)
        if readonly and cmd.verb in ("data", "manifest", "restore"):
            self.refuse(cmd.verb, "this export changes the volume: open it read-write", _errno.EROFS)
        return getattr(self, "cmd_" + cmd.verb)(**cmd.args)

    # ---- commands
    def hello(self) -> dict:
        origins = self.state["snapshots"]
        snaps = [{"name": s["name"], "uuid": s["uuid"], "created": s["created"],
                  "source": (origins.get(s["uuid"]) or {}).get("source")} for s in self.vol.snapshots()]
        t = self.transfer
        return {
            "protocol": P.PROTOCOL, "features": list(P.FEATURES), "volume": self.vol.params.uuid,
            "size": self.vol.size, "role": self.role, "promoted": self.state.get("promoted"),
            "bound_to": self.state.get("bound_to"), "has_data": self.vol.stats()["live_blocks"] > 0,
            "snapshots": snaps,
            "transfer": None if t is None else {"snapshot": t.rec["snap"], "name": t.rec["name"],
                                                "live": t.live > 0, "started": t.rec["started"]},
            "retention": {"keep": self.keep, "allow_remote_prune": self.allow_remote_prune,
                          "keep_min_age": self.keep_min_age, "gfs": self.gfs},
        }

    def _active(self, token: str, what: str) -> Transfer:
        t = self.transfer
        if t is None or not t.matches(token):
            self.refuse(what, "no open transfer holds this token (another run replaced it, or it was committed)",
                        _errno.EPERM)
        assert t is not None
        return t

    def cmd_begin(self, primary, snap, name, base, token, force) -> Handle:
        what = f"begin of {name} ({snap}) from primary {primary}"
        with self.lock:
            vol = self.vol
            if primary == vol.params.uuid:
                self.refuse(what, "this is the source volume itself: a volume cannot replicate into itself",
                            _errno.EPERM)
            pr = self.state.get("promoted")
            if pr and pr.get("from") == primary:  # its head is live data now: --force or not
                self.refuse(what, f"this volume was promoted (failover, from snapshot {pr['snapshot']} at "
                            f"{pr['at']}): it takes no more deltas from its old primary; `blockrep demote` "
                            "it to make it a DR again", _errno.EPERM)
            snaps = vol.snapshots()
            if any(s["uuid"] == snap for s in snaps):
                self.refuse(what, f"snapshot {name} ({snap}) is already replicated here", _errno.EEXIST)
            clash = [s for s in snaps if s["name"] == name]
            if clash:
                self.refuse(what, f"this DR already holds a different snapshot named {name} "
                            f"(uuid {clash[0]['uuid']}); committed DR snapshots are never replaced",
                            _errno.EEXIST)
            bound = self.state.get("bound_to")
            if bound and bound != primary and not force:
                self.refuse(what, f"this DR volume is bound to primary {bound}", _errno.EPERM)
            if not bound and pr:
                self.refuse(what, f"this volume was promoted (failover, from snapshot {pr['snapshot']}): its live "
                            "data is in use; only a `blockrep demote` on this host makes it a DR again",
                            _errno.EPERM)
            if not bound:
                own = vol.stats()["live_blocks"] > 0 or snaps
                if own and not force:
                    self.refuse(what, f"this volume holds data or snapshots of its own ({len(snaps)} snapshot(s))",
                                _errno.EPERM)
                if self.rw_heads:
                    self.refuse(what, f"{self.rw_heads} client(s) hold the head open read-write", _errno.EBUSY)
            if base is not None and not any(s["uuid"] == base for s in snaps):
                self.refuse(what, f"the base {base} is not a snapshot of this DR", _errno.ENOENT)
            t = self.transfer
            resumed = False
            if t is not None and t.matches(token):
                if (t.rec["snap"], t.rec["base"]) != (snap, base):
                    self.refuse(what, "this token belongs to a transfer of another snapshot", _errno.EINVAL)
                resumed = True
            elif t is not None and t.live > 0:
                self.refuse(what, f"another transfer is in progress (snapshot {t.rec['name']}, since "
                            f"{t.rec['started']}, from {t.rec['peer']})", _errno.EBUSY)
            elif t is not None:
                t.close_writes()  # its connections may not write any more
                self.audit(f"replaces the interrupted transfer of {t.rec['name']} by {what}")
            if bound != primary:
                if bound:
                    self.audit(f"FORCED rebind from primary {bound} to {primary}")
                elif force:
                    self.audit(f"FORCED bind of a volume with data of its own to primary {primary}")
                self.state["bound_to"] = primary
                self.state["bound_at"] = _now()
            if not resumed or self.transfer is None:
                self.transfer = Transfer({"token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                                          "snap": snap, "name": name, "base": base, "primary": primary,
                                          "started": _now(), "peer": self.peer()})
                (vol.path / MANIFEST).unlink(missing_ok=True)
            self.transfer.live += 1
            self.transfer.open_writes()
            self._save()
            self.audit(("resumed " if resumed else "") + what)
            reply = {"resumed": resumed, "volume": vol.params.uuid, "features": list(P.FEATURES)}
            return Session(json.dumps(reply).encode(), self.transfer, self)

    def cmd_data(self, token) -> Handle:
        with self.lock:
            return Data(self.vol, self._active(token, "data"))

    def cmd_manifest(self, token) -> Handle:
        with self.lock:
            return Manifest(self.vol.path / MANIFEST, self._active(token, "manifest"))

    def cmd_abort(self, token) -> Handle:
        with self.lock:
            t = self._active(token, "abort")
            t.close_writes()
            self.transfer = None
            self._save()
            self.audit(f"aborted the transfer of {t.rec['name']}")
            return Blob(b"{}")

    def cmd_commit(self, token, entries, shift, keep, gfs=None) -> Handle:
        with self.lock:
            t = self._active(token, "commit")
            what = f"commit of {t.rec['name']} ({t.rec['snap']})"
            t.close_writes()  # no write of this transfer is in flight from here on
            try:
                self.vol.flush()
                bad = self._verify(t, entries, shift)
            except (BlockrepError, OSError) as e:
                t.open_writes()
                self.refuse(what, f"verification failed: {e}; nothing committed", getattr(e, "errno", None)
                            or _errno.EIO)
            if bad:
                t.open_writes()
                self.refuse(what, f"verification failed: {len(bad)} chunk(s) of the head differ from the "
                            f"manifest or are missing from it, first at offset {bad[0] << shift}; "
                            "nothing committed", _errno.EIO)
            s = self.vol.snapshot_create(t.rec["name"], uuid=t.rec["snap"], flags=FLAG_REPLICATED)
            self.state["snapshots"][s["uuid"]] = {"name": s["name"], "source": t.rec["primary"],
                                                  "base": t.rec["base"], "committed_at": _now(),
                                                  "peer": self.peer()}
            self.transfer = None
            self._save()
            (self.vol.path / MANIFEST).unlink(missing_ok=True)
            self.audit(f"{what} verified ({entries} manifest entries) and committed")
            pruned, note = self._retention(keep, gfs)
            return Blob(json.dumps({"snapshot": s["name"], "uuid": s["uuid"], "pruned": pruned,
                                    "keep_request": note}).encode())

    # ---- roles (control ops of promote and demote: REPLICATION.md §9)
    def dr_promote(self, snapshot: str | None = None, force: bool = False) -> dict:
        """Failover, step 2: stop taking the primary's transfers; the caller (holding the head)
        then rolls the head back to the snapshot and calls dr_promote_done."""
        with self.lock:
            st = self.state
            pr = st.get("promoted")
            if pr and pr.get("complete"):
                raise InvalidArgument(f"{self.vol.path} is already promoted (from snapshot {pr['snapshot']} at "
                                      f"{pr['at']}); its live volume is in use: `snapshot rollback` changes it")
            if pr and not st.get("bound_to"):  # a promote that did not finish: finish it, to the same snapshot
                if snapshot is not None and snapshot != pr["snapshot"]:
                    raise InvalidArgument(f"an unfinished promote to snapshot {pr['snapshot']} is under way: "
                                          "run it again with that snapshot (or without --snapshot)")
                return dict(pr)
            if not st.get("bound_to"):
                raise InvalidArgument(f"{self.vol.path} is not a DR (it is bound to no primary): there is "
                                      "nothing to promote; its live export is writable already")
            snaps = self.vol.snapshots()
            if snapshot is None:
                mine = [s for s in snaps if s["uuid"] in st["snapshots"]]
                if not mine:
                    raise NotFound("this DR holds no replicated snapshot: name one with --snapshot")
                snap = mine[-1]
            else:
                snap = self.vol.snapshot(validate_snapshot_name(snapshot))
            t = self.transfer
            if t is not None and t.live > 0 and not force:
                raise VolumeBusy(f"a transfer from the primary is in progress (snapshot {t.rec['name']}, since "
                                 f"{t.rec['started']}, from {t.rec['peer']}): stop it first, or --force")
            if t is not None:
                t.close_writes()  # its connections write no more; its token is dead
                self.transfer = None
                (self.vol.path / MANIFEST).unlink(missing_ok=True)
            st["promoted"] = {"from": st["bound_to"], "snapshot": snap["name"], "snapshot_uuid": snap["uuid"],
                              "at": _now(), "complete": False, "safety_snapshot": None}
            st["bound_to"] = None
            st["demoted"] = None
            self._save()
            stopped = " (its transfer stopped)" if t else ""
            self.audit(f"PROMOTED (failover) from snapshot {snap['name']}: transfers from the old primary "
                       f"{st['promoted']['from']} are refused from now on{stopped}", CONTROL)
            return dict(st["promoted"])

    def dr_promote_done(self, safety_snapshot: str) -> dict:
        with self.lock:
            pr = self.state.get("promoted")
            if not pr:
                raise InvalidArgument("no promote is under way")
            pr["complete"], pr["safety_snapshot"] = True, validate_snapshot_name(safety_snapshot)
            self._save()
            self.audit(f"promote complete: the live volume equals snapshot {pr['snapshot']}", CONTROL)
            return dict(pr)

    def dr_received(self, primary: str, snapshot_uuid: str, base: str | None = None) -> dict:
        """Control op after a receive created a snapshot from a stream of `primary`: this volume is
        that primary's DR from now on (bound, the snapshot recorded as committed, for retention,
        promote and the next network transfer, which is then incremental from it); an interrupted
        network transfer is dropped (the head moved under it)."""
        for u in (primary, snapshot_uuid, base):
            if u is not None and (not isinstance(u, str) or not P.UUID_RE.fullmatch(u)):
                raise InvalidArgument("primary, snapshot_uuid and base must be uuids")
        with self.lock:
            st = self.state
            bound = st.get("bound_to")
            if bound and bound != primary:
                raise InvalidArgument(f"this volume is a DR of another primary ({bound})")
            s = self.vol.snapshot_by_uuid(snapshot_uuid)
            if not bound:
                st["bound_to"], st["bound_at"] = primary, _now()
                st["promoted"] = st["demoted"] = None
            st["snapshots"][snapshot_uuid] = {"name": s["name"], "source": primary, "base": base,
                                              "committed_at": _now(), "peer": "stream (blockrep receive)"}
            t = self.transfer
            if t is not None and t.live == 0:
                t.close_writes()
                self.transfer = None
                (self.vol.path / MANIFEST).unlink(missing_ok=True)
            self._save()
            self.audit(f"received snapshot {s['name']} ({snapshot_uuid}) from a stream of primary {primary}"
                       + ("" if bound else f": now a DR of {primary}"), CONTROL)
            return {"bound_to": primary}

    def dr_demote(self, primary: str, safety_snapshot: str | None = None, force: bool = False) -> dict:
        """This volume becomes a DR of `primary` (a volume uuid): its live export turns read-only
        and takes that primary's transfers. The caller holds the head and took the safety snapshot;
        without one (None) only the checks run, so a refusal leaves no snapshot behind."""
        if not isinstance(primary, str) or not P.UUID_RE.fullmatch(primary):
            raise InvalidArgument("primary must be a volume uuid")
        with self.lock:
            st = self.state
            if primary == self.vol.params.uuid:
                raise InvalidArgument("a volume cannot be a DR of itself")
            bound = st.get("bound_to")
            if bound == primary:
                raise InvalidArgument(f"{self.vol.path} is already a DR of {primary}")
            if bound and not force:
                raise InvalidArgument(f"{self.vol.path} is a DR of another primary ({bound}): --force rebinds it")
            if self.rw_heads:
                raise VolumeBusy(f"{self.rw_heads} client(s) have the live export open read-write: disconnect "
                                 "them (unmount, stop the VM); a DR's head is written by transfers only")
            if safety_snapshot is None:
                return {"bound_to": bound}
            st["bound_to"], st["bound_at"] = primary, _now()
            st["demoted"] = {"at": st["bound_at"], "primary": primary,
                             "safety_snapshot": validate_snapshot_name(safety_snapshot)}
            st["promoted"] = None
            self._save()
            self.audit(f"DEMOTED: now a DR of primary {primary}; the live export is read-only "
                       f"(safety snapshot {safety_snapshot})" + (f"; was a DR of {bound}" if bound else ""), CONTROL)
            return {"bound_to": primary, **st["demoted"]}

    def _verify(self, t: Transfer, entries: int, shift: int) -> list[int]:
        """Chunk indices whose head digest differs from the manifest (REPLICATION.md §3)."""
        import numpy as np

        from .checksums import chunk_array
        vol = self.vol
        nch = P.nchunks(vol.size, shift)
        if entries > nch:
            raise InvalidArgument(f"the manifest claims {entries} entries, the volume has {nch} chunks")
        raw = b""
        if entries:
            fd = os.open(vol.path / MANIFEST, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                raw = os.pread(fd, entries * P.ENTRY, 0)
            finally:
                os.close(fd)
            if len(raw) != entries * P.ENTRY:
                raise InvalidArgument("the manifest is shorter than its entry count")
        man = np.frombuffer(raw, dtype=np.dtype([("idx", "<u8"), ("d", "V16")]))
        idx = man["idx"]
        if len(idx) and (np.any(idx[1:] <= idx[:-1]) or int(idx[-1]) >= nch):
            raise InvalidArgument("the manifest is not sorted, has duplicates or reaches beyond the volume")
        if t.rec["base"] is not None:
            base_id = vol.snapshot_by_uuid(t.rec["base"])["id"]
            changed = chunk_array(vol.diff_ids(base_id, 0, granularity=4096), shift)
            missing = np.setdiff1d(changed, idx)
            if len(missing):  # the head changed where the delta says nothing
                return [int(x) for x in missing]
        else:
            has = data_chunks(vol, 0, shift, 0, nch)
            changed = np.flatnonzero(has).astype(np.uint64)
        check = np.union1d(changed, idx).astype(np.uint64)
        pos = np.searchsorted(idx, check)
        bad: list[int] = []
        for k, c in enumerate(check.tolist()):
            n = chunk_len(vol.size, shift, c)
            listed = pos[k] < len(idx) and int(idx[pos[k]]) == c
            want = bytes(man["d"][pos[k]]) if listed else P.zero_sum(n)
            if P.chunk_sum(vol.read(n, c << shift)) != want:
                bad.append(c)
        return bad

    def _retention(self, keep_request: int | None, gfs_request: dict | None = None) -> tuple[list[str], str]:
        """Apply the DR's retention after a commit; (deleted names, what became of the request)."""
        own = retention.Rules(self.keep or 0, self.gfs)
        request = None
        note = "none"
        if keep_request is not None or gfs_request is not None:
            asked = retention.Rules(keep_request or 0, gfs_request)
            said = f"{keep_request} snapshot(s)" if gfs_request is None else str(asked)
            if self.allow_remote_prune:
                request = asked
                if asked.covers(own):
                    note = "honoured"
                elif own.has_gfs() or asked.has_gfs():
                    note = f"honoured together with the DR's own {own} (a request never keeps less)"
                else:
                    note = f"raised to the DR's own {own}"
            else:
                note = "ignored (the DR runs without --allow-remote-prune)"
                self.audit(f"ignored a request to keep {said}")
        doomed = self.prune_plan(self.vol.snapshots(), own, request, _dt.datetime.now(_dt.UTC))
        if not own.has_gfs() and (request is None or not request.has_gfs()):  # the log line of count-only retention
            rules = f"keep {max(request.latest, own.latest or 1) if request else own.latest}"
        else:
            rules = str(own) if request is None else f"{own}, asked {request}"
        for s in doomed:
            self.vol.snapshot_delete(s["name"])
            self.state["snapshots"].pop(s["uuid"], None)
            self.audit(f"retention ({rules}, min age {self.keep_min_age} s) deleted snapshot {s['name']}")
        if doomed:
            self._save()
        return [s["name"] for s in doomed], note

    def prune_plan(self, snaps: list[dict], own: retention.Rules, request: retention.Rules | None,
                   now: _dt.datetime) -> list[dict]:
        """The DR's retention (retention.dr_plan): only snapshots a transfer committed are
        candidates (the DR admin's own are never touched); every one younger than keep_min_age
        (by the DR's own commit clock) is kept, and of the older ones what the rules keep. So a
        flood of new snapshots cannot push anything younger than keep_min_age out, and what the
        rules keep of the older ones stays too."""
        committed = {u: o.get("committed_at") for u, o in self.state["snapshots"].items()}
        doomed, _ = retention.dr_plan(snaps, committed, own, request,
                                      _dt.timedelta(seconds=self.keep_min_age), now)
        return doomed


def role_of(state: dict) -> str:
    """primary, dr, promoting (a promote that did not finish) or promoted, from a dr.json
    (REPLICATION.md §9)."""
    if state.get("bound_to"):
        return "dr"
    pr = state.get("promoted")
    if pr:
        return "promoted" if pr.get("complete") else "promoting"
    return "primary"


def read_role(path: Path) -> dict:
    """{role, bound_to, promoted} of a volume directory, from its dr.json (written atomically)."""
    try:
        st = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        st = {}
    except ValueError as e:
        raise CorruptionError(f"{path / STATE} is damaged: {e}") from None
    return {"role": role_of(st), "bound_to": st.get("bound_to"), "promoted": st.get("promoted")}


def errno_of(e: BaseException) -> int:
    return getattr(e, "errno", None) or _errno.EIO


__all__ = ["DRServer", "Handle", "Refused", "AlreadyExists", "NotFound", "VolumeBusy"]
