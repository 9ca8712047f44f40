"""`blockrep replicate`: ship a snapshot to a DR site (DESIGN M6, M12; docs/REPLICATION.md).

Notes on the design:
- One run per (volume, target): state.RunLock, held for the whole run.
- The source is always the primary's own server: the snapshot is read from its `@NAME` export and
  its digests from `!sums`; an unserved volume is served on a private socket meanwhile.
- The decision (seed, incremental, rebase, nothing to do) is plan.py's, by identity (uuids).
- A blockrep DR receives through a transfer (drclient.Session): begin with identity checks, data
  through `!data`, digests of every chunk the delta touched compared (and resent once if they
  differ), then the manifest and the commit, which the DR verifies itself before it creates the
  snapshot. A plain NBD target gets the data, a flush, and a fingerprint in replication.json.
- Resume: the confirmed prefix of the transfer plan and the token are saved while it runs; a
  later run of the same transfer (same snapshot, base, mode and plan) continues after it.
- Faults: transient errors are retried with backoff (1, 2, 4 … 30 s); permanent ones fail at once.
- Every run, failed or not, is recorded per target (state.record_run). A pause (`cancel` set: the
  scheduler's window closed, or it stops) is not a failure: the confirmed prefix is saved, Paused
  is raised and nothing is recorded as a run; the next run resumes.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .. import server
from ..access import run_op
from ..errors import BlockrepError, InvalidArgument, NotFound, Paused
from ..freeze import quiesced
from ..units import format_size
from ..volume import read_params
from . import checksums as C
from . import drclient, plan, state
from . import protocol as P
from .copy import RateSpec, copy_extents
from .nbdio import TransferError, connection, pread

FINGERPRINT_CHUNKS = 8


@contextlib.contextmanager
def source_server(vol: Path):
    """The URI of a server of vol: its own, or a private one started for this command."""
    if server.running_pid(vol):
        rt = server.runtime_info(vol) or {}
        yield rt.get("uri") or f"nbd+unix:///?socket={server.default_socket(vol)}"
        return
    with tempfile.TemporaryDirectory(prefix="blockrep-src-") as d:
        sock = Path(d) / "nbd.sock"
        uri = server.serve(str(vol), socket_path=str(sock), private=True)  # dies with this process
        try:
            yield uri
        finally:
            server.stop(str(vol))


def merge_extents(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in sorted(e for lst in lists for e in lst):
        if out and o <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], o + n)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((o, n))
    return out


class Progress:
    """Bytes done / total, rate and ETA on a terminal (stderr), nothing otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.monotonic()

    def __call__(self, stats, _confirmed=None) -> None:
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = stats.bytes_done / dt
        eta = (self.total - stats.bytes_done) / rate if rate else 0
        print(f"\r{format_size(stats.bytes_done)} / {format_size(self.total)}  {format_size(rate)}/s  "
              f"ETA {eta:.0f}s   ", end="", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"\r{text}".ljust(78), file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


class SourceSums(threading.Thread):
    """The primary's digests of chunk runs, computed while the delta is shipped."""

    def __init__(self, src: str, snapshot: str, shift: int, runs: list[tuple[int, int]] | None, size: int):
        super().__init__(daemon=True)
        self.args = (src, snapshot, shift, runs, size)
        self.result: bytes | BaseException = b""
        self.start()

    def run(self) -> None:
        try:
            self.result = C.blockrep_sums(*self.args)
        except BaseException as e:  # re-raised by get()
            self.result = e

    def get(self) -> bytes:
        self.join()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class Run:
    """One replicate run (the lock is held by the caller)."""

    keep_remote_gfs: dict | None = None  # GFS counts asked of a blockrep DR at commit (replicate())

    def __init__(self, vol: Path, to: str, *, rate, full, force, retries, progress, connections, in_flight,
                 wait=False, cancel: threading.Event | None = None):
        self.cancel = cancel
        self.vol, self.to, self.rate, self.full, self.force = vol, to, rate, full, force
        self.wait = wait
        self.dr_lock: state.RunLock | None = None
        self.retries, self.show_progress = retries, progress
        self.connections, self.in_flight = connections, in_flight
        self.params = read_params(vol)
        self.info: dict = {"snapshot": None, "mode": None, "base": None}

    # ---- the target
    def probe(self) -> tuple[dict, dict | None]:
        try:
            info, is_br = drclient.is_blockrep(self.to)
        except TransferError as e:
            raise TransferError(f"target unreachable: {e}", transient=False) from None
        if is_br and info["export"] != "":
            raise InvalidArgument(f"target {self.to} is the read-only export {info['export']!r} of a blockrep "
                                  "server: replicate to the server itself (its live export, no export name)")
        if info["read_only"] and not is_br:  # a bound blockrep DR's head is written through transfers only
            raise InvalidArgument(f"target {self.to} is read-only")
        if info["size"] < self.params.size:
            raise InvalidArgument(f"target {self.to} is smaller ({info['size']} bytes) than the volume "
                                  f"({self.params.size})")
        dr = None
        self.target_size = info["size"]
        if is_br:
            dr = drclient.hello(self.to)
            # one run per DR volume too, whatever URI spelling reaches it
            self.dr_lock = state.RunLock(self.vol, f"blockrep DR volume {dr['volume']}")
            self.dr_lock.acquire(wait=self.wait)
            if self.wait:  # the DR may have moved on while we waited
                dr = drclient.hello(self.to)
            plan.check_target(self.params.uuid, dr, force=self.force)
        return info, dr

    def looks_like_our_head(self, src: str, snap: dict) -> bool:
        """True when a plain target reads like this volume's own live head where the head differs
        from the snapshot: the target is this volume seen through a proxy (qemu-nbd, nbd-server…),
        and shipping the snapshot would revert the head's newer writes."""
        changed = run_op(self.vol, "changes_since", since=snap["name"])
        blocks = [e["offset"] for e in changed[:: max(1, len(changed) // 8)][:8]]
        if not blocks:
            return False
        try:
            with connection(src) as head, connection(src, "@" + snap["name"]) as old, connection(self.to) as tgt:
                for o in blocks:
                    h = pread(head, 4096, o)
                    if h == pread(old, 4096, o) or pread(tgt, 4096, o) != h:
                        return False
        except TransferError:
            return False
        return True

    def fingerprint_ok(self, record: dict) -> bool:
        fp = record.get("fingerprint") or {}
        chunks = fp.get("chunks") or []
        if fp.get("size") is None or fp.get("target_size", self.target_size) != self.target_size:
            return False  # a resized (or replaced) target
        try:
            runs = [(i, 1) for i, _ in chunks]
            got = C.nbd_sums(self.to, P.DELTA_SHIFT, self.params.size, runs) if runs else b""
        except TransferError:
            return False
        return got == b"".join(bytes.fromhex(d) for _, d in chunks)

    # ---- the run
    def run(self, snapshot: str | None, *, keep_local, keep_remote, freeze, pre, post) -> dict:
        t0 = time.monotonic()
        info, dr = self.probe()
        vol = self.vol
        with source_server(vol) as src:
            resumed = None
            if snapshot is None:
                # an interrupted run is finished first (it resumes where it stopped), then a new
                # snapshot is taken and shipped on top of it: a killed cron run loses nothing
                prog = state.target(vol, self.to).get("in_progress") or {}
                snaps = run_op(vol, "snapshot_list")
                old = next((s for s in snaps if s["uuid"] == prog.get("snapshot_uuid")), None)
                if old is not None:
                    resumed = self.ship(src, old, snaps, dr, keep_remote)
                    if dr is not None:
                        dr = drclient.hello(self.to)
                with quiesced(freeze=freeze, pre=pre, post=post):
                    snapshot = run_op(vol, "snapshot_create", tag=True)["name"]
            snaps = run_op(vol, "snapshot_list")
            snap = next((s for s in snaps if s["name"] == snapshot), None)
            if snap is None:
                raise NotFound(f"no snapshot named {snapshot!r} in {vol}")
            result = self.ship(src, snap, snaps, dr, keep_remote)
        if resumed is not None:
            result["resumed_first"] = {k: resumed.get(k) for k in ("snapshot", "mode", "bytes_sent", "resumed_from")}
            result["bytes_sent"] += resumed["bytes_sent"]
        result["seconds"] = round(time.monotonic() - t0, 3)
        if keep_local is not None:
            res = run_op(vol, "snapshot_prune", keep=keep_local, only_tagged=True)
            result["pruned_local"], result["kept_local"] = res["deleted"], res["kept"]
        return result

    def ship(self, src: str, snap: dict, snaps: list[dict], dr: dict | None, keep_remote) -> dict:
        """Plan and ship one snapshot (or find it already there); snaps: the volume's, oldest first."""
        t0 = time.monotonic()
        vol = self.vol
        self.info.update(snapshot=snap["name"], mode=None, base=None)
        record = state.target(vol, self.to)
        if dr is not None:
            p = plan.for_blockrep(snaps, snap, self.params.uuid, dr, full=self.full, force=self.force,
                                  progress=record.get("in_progress"))
        else:
            if not self.force and self.looks_like_our_head(src, snap):
                raise plan.Conflict(f"the target {self.to} reads like this volume's own live export (a proxy "
                                    f"of it?): shipping {snap['name']} there would revert newer writes; "
                                    "--force if it is not")
            p = plan.for_plain(snaps, snap, record, record.get("snapshot_uuid") is not None
                               and self.fingerprint_ok(record), full=self.full)
        self.info.update(mode=p.mode, base=p.base and p.base["name"])
        if p.mode == "done":
            order = [s["uuid"] for s in snaps]
            fields: dict = {"kind": "blockrep" if dr else "nbd"}
            if (record.get("in_progress") or {}).get("snapshot_uuid") == snap["uuid"]:
                fields["in_progress"] = None  # a run killed after the DR committed: it is there
            known = record.get("snapshot_uuid")
            if known not in order or order.index(known) < order.index(snap["uuid"]):  # never go back
                fields.update(snapshot=snap["name"], snapshot_uuid=snap["uuid"],
                              replicated_at=record.get("replicated_at") or state.now())
            state.set_target(vol, self.to, **fields)
            return {"snapshot": snap["name"], "uuid": snap["uuid"], "base": None, "mode": "none",
                    "already_replicated": True, "bytes_sent": 0, "extents": 0,
                    "seconds": round(time.monotonic() - t0, 3), "target": self.to}
        return self.transfer(src, snap, p, dr, record, keep_remote)

    def extents_for(self, src: str, snap: dict, p: plan.Plan, dr: dict | None, progress: dict | None):
        """(extents to ship, DR-side changes merged in) for the plan."""
        size = self.params.size
        if p.mode == "seed":
            return [(0, size)], []
        if p.mode == "incremental" and p.base is not None:
            delta = [(e["offset"], e["length"])
                     for e in run_op(self.vol, "diff", from_name=p.base["name"], to_name=snap["name"])]
            if dr is None:
                return delta, []
            if progress and (progress.get("snapshot_uuid"), progress.get("base_uuid")) == \
                    (snap["uuid"], p.base["uuid"]) and "dr_dirty" in progress:
                dirty = [(int(o), int(n)) for o, n in progress["dr_dirty"]]
            else:
                dirty = drclient.changes(self.to, p.base["name"])
            return merge_extents(delta, dirty), dirty
        # rebase: only digests cross; send the chunks that differ
        mine = C.blockrep_sums(src, snap["name"], P.FULL_SHIFT, None, size)
        theirs = C.blockrep_sums(self.to, None, P.FULL_SHIFT, None, size)
        bad = C.differing(mine, theirs).tolist()
        return C.coalesce(bad, P.FULL_SHIFT, size), []

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Paused("paused before any data moved")

    def transfer(self, src: str, snap: dict, p: plan.Plan, dr: dict | None, record: dict, keep_remote) -> dict:
        vol, size = self.vol, self.params.size
        progress = record.get("in_progress")
        self.check_cancel()
        extents, dirty = self.extents_for(src, snap, p, dr, progress)
        self.check_cancel()
        base_uuid = p.base["uuid"] if p.base else None
        resume, token = plan.resume_point(progress, snap["uuid"], base_uuid, p.mode, extents)
        if dr is None:
            token = None
        elif token is None or (dr.get("transfer") or {}).get("snapshot") != snap["uuid"]:
            # nothing to resume unless the DR still holds this very transfer (it may have been
            # promoted, rolled back, or replaced it since)
            resume, token = 0, P.new_token()
        shift = P.DELTA_SHIFT if p.mode == "incremental" else P.FULL_SHIFT
        total = sum(n for _, n in extents)
        show = Progress(total, self.show_progress)
        in_progress = {"snapshot": snap["name"], "snapshot_uuid": snap["uuid"], "base_uuid": base_uuid,
                       "mode": p.mode, "token": token, "done_upto": resume,
                       "extents_sha256": plan.extents_digest(extents), "dr_dirty": dirty}
        # from here until success the target head is in between
        state.set_target(vol, self.to, kind="blockrep" if dr else "nbd", head_uuid=None, in_progress=in_progress,
                         dr_volume=dr and dr["volume"])
        session = None
        if dr is not None and token is not None:
            session = drclient.Session(self.to, primary=self.params.uuid, snap=snap["uuid"], name=snap["name"],
                                       base=p.base["uuid"] if p.base else None, token=token, force=self.force)
        try:
            target_export = session.data_export if session else None
            # Suppression skips blocks equal to the base: only while the target head holds the base
            # (a blockrep DR that changed nothing since it, a plain target whose record says so).
            # A blockrep DR's digests would catch a wrong skip anyway, at the price of a resend.
            suppress = p.mode == "incremental" and (not dirty if dr is not None
                                                    else record.get("head_uuid") == base_uuid)
            runs = None if shift == P.FULL_SHIFT else C.runs_of(C.chunks_of(extents, shift))
            mine = SourceSums(src, snap["name"], shift, runs, size) if dr is not None else None
            sent = self.copy(src, snap, target_export, extents, suppress and p.base, show, in_progress)
            show.done()
            commit = None
            if session is not None and mine is not None:
                commit = self.check_and_commit(src, snap, session, mine.get(), shift, runs, keep_remote, sent)
            fingerprint = None if dr is not None else self.fingerprint(src, snap, extents)
        except Paused:
            if session is not None:
                session.close()
            # A pause flushed and confirmed all it could: beyond done_upto the target holds at most
            # the chunks that were in flight (<= copy.QUEUE_BYTES), so resuming the same plan re-sends
            # little. A kill may leave PROGRESS_SECONDS of unconfirmed data there: no mark, rebase.
            in_progress["clean"] = True
            state.set_target(vol, self.to, in_progress=in_progress)
            raise
        except BaseException:
            if session is not None:
                session.close()
            raise
        if session is not None:
            session.close()
        state.set_target(vol, self.to, snapshot=snap["name"], snapshot_uuid=snap["uuid"], head_uuid=snap["uuid"],
                         replicated_at=state.now(), in_progress=None, fingerprint=fingerprint)
        result = {"snapshot": snap["name"], "uuid": snap["uuid"], "base": p.base and p.base["name"],
                  "mode": p.mode, "full": p.mode == "seed", "delta_bytes": total, **sent, "target": self.to,
                  "target_is_blockrep": dr is not None, "resumed_from": resume}
        if commit is not None:
            result["pruned_remote"] = commit.get("pruned", [])
            result["keep_remote"] = commit.get("keep_request")
        return result

    def copy(self, src, snap, target_export, extents, base, show, in_progress) -> dict:
        """Ship the extents, retried from the confirmed prefix (in_progress["done_upto"])."""
        def save_progress(stats, confirmed):
            in_progress["done_upto"] = confirmed
            state.set_target(self.vol, self.to, in_progress=in_progress)
            show(stats, confirmed)

        def attempt() -> dict:
            st = copy_extents(src, "@" + snap["name"], self.to, target_export, extents,
                              base_export=f"@{base['name']}" if base else None, rate=self.rate,
                              resume_from=in_progress["done_upto"], on_progress=save_progress,
                              connections=self.connections, in_flight=self.in_flight, cancel=self.cancel)
            return {k: v for k, v in st.as_dict().items() if k != "seconds"}
        try:
            return self._retrying(attempt, "transfer", show)
        except TransferError as e:
            show.done()
            why = self._dr_changed_role()
            raise TransferError(f"replication of {snap['name']} to {self.to} failed after "
                                f"{getattr(e, 'attempts', 1)} attempt(s): {why or e}", transient=e.transient) from None

    def _dr_changed_role(self) -> str | None:
        """If the DR was promoted (or rebound) while this run wrote to it, say so: its refusal of
        our writes (EPERM) would otherwise read as a disk or permission error."""
        try:
            dr = drclient.hello(self.to)
        except (BlockrepError, OSError):
            return None
        pr = dr.get("promoted") or {}
        if pr.get("from") == self.params.uuid:
            return (f"the DR was promoted (failover, from snapshot {pr.get('snapshot')} at {pr.get('at')}) during "
                    "this transfer: it takes no more deltas from this volume")
        if dr.get("bound_to") not in (None, self.params.uuid):
            return f"the DR was bound to another primary ({dr.get('bound_to')}) during this transfer"
        return None

    def check_and_commit(self, src, snap, session, mine: bytes, shift: int, runs, keep_remote, sent) -> dict:
        """Send the manifest and commit: the DR verifies every touched chunk itself. If it refuses,
        find the chunks that differ (digests of both sides: only digests cross), resend them once
        and commit again; a second refusal fails the run with nothing committed."""
        size = self.params.size
        all_runs = runs if runs is not None else [(0, P.nchunks(size, shift))]
        idx = C.indices_of_runs(all_runs)
        digs = np.frombuffer(mine, dtype="V16")
        keep = np.ones(len(idx), dtype=bool)
        if shift == P.FULL_SHIFT:  # seed/rebase manifests list data chunks only (REPLICATION.md §3)
            keep = digs != np.frombuffer(P.zero_sum(1 << shift), dtype="V16")[0]
            last = P.nchunks(size, shift) - 1
            if len(idx) and idx[-1] == last and size & ((1 << shift) - 1):
                keep[-1] = digs[-1] != np.frombuffer(P.zero_sum(size - (last << shift)), dtype="V16")[0]
        man = np.empty(int(keep.sum()), dtype=np.dtype([("idx", "<u8"), ("d", "V16")]))
        man["idx"], man["d"] = idx[keep], digs[keep]
        try:
            return self._retrying(lambda: (session.write_manifest(man.tobytes()),
                                           session.commit(len(man), shift, keep_remote,
                                                          self.keep_remote_gfs))[1], "commit")
        except TransferError as refused:
            if refused.transient:
                raise
            first = refused
        pos = C.differing(mine, C.blockrep_sums(self.to, None, shift, runs, size))
        if not len(pos):
            raise TransferError(f"the DR refused the commit of {snap['name']} although its digests match "
                                f"(its server.log says why): {first}", transient=False)
        bad = C.positions_to_chunks(all_runs, pos)
        self.info["resent_chunks"] = len(bad)
        st = copy_extents(src, "@" + snap["name"], self.to, session.data_export, C.coalesce(bad, shift, size),
                          rate=self.rate, connections=self.connections, in_flight=self.in_flight,
                          cancel=self.cancel)
        sent["bytes_sent"] += st.bytes_sent
        try:
            return self._retrying(lambda: session.commit(len(man), shift, keep_remote, self.keep_remote_gfs),
                                  "commit")
        except TransferError:
            raise TransferError(f"replication of {snap['name']} to {self.to}: the DR copy of {len(bad)} chunk(s) "
                                "differed and the DR still refused the commit after they were sent again; "
                                "DR snapshot not committed", transient=False) from None

    def _retrying(self, fn, what: str, show: Progress | None = None):
        """fn(), retried with backoff (1, 2, 4 … 30 s) while it fails transiently (link loss, the
        DR restarting); the error that ends it carries `attempts`."""
        for attempt in range(1, self.retries + 2):
            try:
                return fn()
            except TransferError as e:
                if not e.transient or attempt > self.retries:
                    e.attempts = attempt  # type: ignore[attr-defined]
                    raise
                wait = min(30, 2 ** (attempt - 1))
                if show is not None:
                    show.note(f"retrying in {wait} s (attempt {attempt + 1} of {self.retries + 1}): {e}")
                state.set_target(self.vol, self.to, last_error=f"retrying the {what} (attempt {attempt + 1}): {e}")
                if self.cancel is not None:
                    if self.cancel.wait(wait):
                        raise Paused(f"paused while waiting to retry the {what}") from None
                else:
                    time.sleep(wait)
        raise AssertionError("unreachable")

    def fingerprint(self, src: str, snap: dict, extents) -> dict:
        """Digests of a few chunks this run shipped, to notice later changes at a plain target."""
        chunks = C.chunks_of(extents[:64], P.DELTA_SHIFT)
        pick = chunks[:: max(1, len(chunks) // FINGERPRINT_CHUNKS)][:FINGERPRINT_CHUNKS] or [0]
        digests = C.blockrep_sums(src, snap["name"], P.DELTA_SHIFT, [(i, 1) for i in pick], self.params.size)
        return {"size": self.params.size, "target_size": self.target_size,
                "chunks": [[i, digests[k * 16:(k + 1) * 16].hex()] for k, i in enumerate(pick)]}


def replicate(volume: str, to: str, snapshot: str | None = None, keep_local: int | None = None,
              keep_remote: int | None = None, rate: RateSpec = None, full: bool = False,
              force: bool = False, wait: bool = False, freeze=None, pre=None, post=None,
              retries: int = 6, progress: bool = False, connections: int | None = None,
              in_flight: int = 64, cancel: threading.Event | None = None,
              keep_remote_gfs: dict | None = None) -> dict:
    """Run one replication; every outcome is recorded in VOL/replication.json. On failure the
    raised error carries `.details` (snapshot, mode, base) for `--json`. keep_remote_gfs: GFS
    counts asked of a blockrep DR at commit ({"hourly": H, …}, gfs.py), beside keep_remote."""
    vol = Path(volume).resolve()
    read_params(vol)
    from .gfs import check_counts
    keep_remote_gfs = check_counts(keep_remote_gfs, "keep-remote")  # refused before anything runs
    if not any(to.startswith(s) for s in ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")):
        raise InvalidArgument(f"invalid target {to!r}: use nbd://host[:port]/, nbds://… or nbd+unix:///?socket=PATH")
    if connections is None:  # one flow fills a link best (bench/README.md, replication (c))
        connections = 4 if "+unix://" in to else 1
    lock = state.RunLock(vol, to)
    lock.acquire(wait=wait)
    run = Run(vol, to, rate=rate, full=full, force=force, retries=retries, progress=progress,
              connections=connections, in_flight=in_flight, wait=wait, cancel=cancel)
    run.keep_remote_gfs = keep_remote_gfs
    started = state.now()
    try:
        res = run.run(snapshot, keep_local=keep_local, keep_remote=keep_remote, freeze=freeze, pre=pre, post=post)
        rate = round(res["bytes_sent"] / res["seconds"]) if res["seconds"] else 0
        state.record_run(vol, to, {"at": started, "result": "ok", "snapshot": res["snapshot"], "mode": res["mode"],
                                   "bytes_sent": res["bytes_sent"], "seconds": res["seconds"], "rate": rate},
                         last_error=None)
        return res
    except Paused as e:
        e.details = dict(run.info)  # type: ignore[attr-defined]
        raise
    except BlockrepError as e:
        e.details = dict(run.info)  # type: ignore[attr-defined]
        with contextlib.suppress(BlockrepError, OSError):
            state.record_run(vol, to, {"at": started, "result": "failed", "error": str(e), **run.info},
                             last_error=str(e))
        raise
    finally:
        if run.dr_lock is not None:
            run.dr_lock.release()
        lock.release()
