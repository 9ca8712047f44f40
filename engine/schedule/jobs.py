"""The daemon's workers (docs/SCHEDULE.md §2-3): one thread per volume takes its snapshots on
schedule and prunes the primary; one thread per (volume, target) ships what the target lacks,
inside its window, at its rate, with backoff after failures. Workers share nothing but the
volume's JobState and the daemon's transfer semaphore; a pause is a threading.Event handed to
replicate(), which saves the confirmed prefix and raises Paused."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from collections.abc import Callable

from .. import server
from ..access import run_op
from ..errors import AlreadyExists, BlockrepError, InvalidArgument, Paused
from ..freeze import quiesced
from ..replication import drclient
from ..replication import state as repl_state
from ..replication.drserver import read_role
from ..replication.plan import Conflict
from ..replication.replicate import replicate
from ..replication.retention import FLAG_REPLICATE
from ..replication.uris import redact, redact_uri
from ..units import format_size
from ..volume import read_params
from . import calendar as cal
from .config import Target, VolumeJob
from .jobstate import JobState

log = logging.getLogger("blockrep.schedule")
IDLE_POLL = 30.0  # a target with nothing to do looks again this often (a snapshot also wakes it)


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def snapshot_name(slot: _dt.datetime) -> str:
    return "sched-" + slot.astimezone(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


class Shared:
    """What every worker of one daemon shares."""

    def __init__(self, max_transfers: int, retry_min: int, retry_max: int, notify: Callable[[str], None]):
        self.transfers = threading.BoundedSemaphore(max_transfers)
        self.retry_min, self.retry_max = retry_min, retry_max
        self.notify = notify


class TargetWorker(threading.Thread):
    def __init__(self, job: VolumeJob, target: Target, st: JobState, shared: Shared):
        super().__init__(daemon=True, name=f"ship {job.path.name} -> {redact_uri(target.uri)}")
        self.job, self.target, self.st, self.shared = job, target, st, shared
        self.label = f"{job.path} -> {redact_uri(target.uri)}"
        self.stop_ev = threading.Event()
        self.wake = threading.Event()
        self.cancel: threading.Event | None = None
        self.failures = 0
        self.retry_at: _dt.datetime | None = None
        self.shipping: str | None = None
        st.set_target(target.uri, state="idle", failures=0, next_attempt=None, next_window=None)

    def stop(self) -> None:
        self.stop_ev.set()
        self.wake.set()
        if self.cancel is not None:
            self.cancel.set()

    def _sleep(self, seconds: float) -> None:
        self.wake.wait(max(0.0, min(seconds, IDLE_POLL)))
        self.wake.clear()

    def pending(self) -> tuple[str | None, bool]:
        """(snapshot to ship next, whether it resumes an interrupted transfer)."""
        vol = self.job.path
        snaps = run_op(vol, "snapshot_list")
        rec = repl_state.target(vol, self.target.uri)
        by_uuid = {s["uuid"]: i for i, s in enumerate(snaps)}
        prog = rec.get("in_progress") or {}
        if prog.get("snapshot_uuid") in by_uuid:
            s = snaps[by_uuid[prog["snapshot_uuid"]]]
            return s["name"], bool(prog.get("done_upto"))
        have = by_uuid.get(rec.get("snapshot_uuid") or "", -1)
        todo = [s for s in snaps[have + 1:] if s.get("flags", 0) & FLAG_REPLICATE]
        if not todo:
            return None, False
        if have < 0 or self.target.ship == "newest":
            return todo[-1]["name"], False
        return todo[0]["name"], False

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a worker must never die silently
                self._failed(self.shipping, BlockrepError(f"{type(e).__name__}: {e}"))
            finally:
                self.shipping = None

    def step(self) -> None:
        """One decision: ship, wait for the window or the backoff, or idle."""
        uri = self.target.uri
        try:
            name, resuming = self.pending()
        except BlockrepError as e:
            self._failed(None, e)
            return
        now = utcnow()
        if name is None:
            self.st.set_target(uri, state="idle", next_window=None, snapshot=None)
            self._sleep(IDLE_POLL)
            return
        w = self.target.window
        if w is not None and not w.is_open(now):
            opens = w.next_open(now)
            state = "paused" if resuming else "waiting"
            self.st.set_target(uri, state=state, snapshot=name, next_window=opens)
            self._sleep((opens - now).total_seconds() + 0.05)
            return
        if self.retry_at is not None and now < self.retry_at:
            self._sleep((self.retry_at - now).total_seconds())
            return
        if not self.shared.transfers.acquire(timeout=2.0):
            if self.st.target(uri).get("state") != "queued":
                self.st.set_target(uri, state="queued", snapshot=name)
            return
        try:
            # the window may have closed while this waited for a transfer slot
            if not self.stop_ev.is_set() and (w is None or w.is_open(utcnow())):
                self.ship(name, resuming)
        finally:
            self.shared.transfers.release()

    def ship(self, name: str, resuming: bool) -> None:
        uri, t = self.target.uri, self.target
        self.shipping = name
        self.cancel = cancel = threading.Event()
        if self.stop_ev.is_set():
            cancel.set()
        closer = None
        why = "the scheduler is stopping"
        if t.window is not None:
            now = utcnow()
            if not t.window.is_open(now):
                return
            closes = t.window.closes_at(now)
            closer = threading.Timer(max(0.0, (closes - utcnow()).total_seconds()), cancel.set)
            closer.daemon = True
            closer.start()
            why = f"window {t.window} closed; resumes at the next opening"
        rec = repl_state.target(self.job.path, uri).get("in_progress") or {}
        done = rec.get("done_upto") or 0
        self.st.set_target(uri, state="running", snapshot=name, since=utcnow(), next_window=None)
        if resuming:
            log.info("%s: transfer of %s resumed at %s", self.label, name, format_size(done))
        else:
            log.info("%s: transfer of %s started", self.label, name)
        self.shared.notify(f"{self.label}: shipping {name}")
        kwargs: dict = {}
        if t.gfs:
            kwargs["keep_remote_gfs"] = t.gfs
        try:
            rate = (lambda: t.rate_at(utcnow())) if t.rates else t.rate
            res = replicate(str(self.job.path), uri, snapshot=name, keep_remote=t.keep_remote, rate=rate,
                            retries=1, connections=t.connections, cancel=cancel, **kwargs)
        except Paused as e:
            self.st.add(uri, "bytes_sent_total", int(getattr(e, "bytes_sent", 0) or 0))
            stopping = self.stop_ev.is_set()
            self.st.set_target(uri, state="paused")
            log.info("%s: transfer of %s paused (%s)", self.label, name,
                     "the scheduler is stopping" if stopping else why)
            return
        except BlockrepError as e:
            self._failed(name, e)
            return
        finally:
            self.cancel = None
            if closer is not None:
                closer.cancel()
        self.failures, self.retry_at = 0, None
        self.st.add(uri, "bytes_sent_total", int(res.get("bytes_sent") or 0))
        self.st.set_target(uri, state="idle", failures=0, next_attempt=None, last_error=None,
                           last_finished=utcnow(), last_snapshot=name)
        how = res.get("mode")
        if how == "incremental":
            how = f"incremental since {res.get('base')}"
        log.info("%s: transfer of %s finished (%s): %s sent in %s s", self.label, name, how,
                 format_size(res.get("bytes_sent") or 0), res.get("seconds"))
        for gone in res.get("pruned_remote") or []:
            log.info("%s: DR pruned %s", self.label, gone)
        if res.get("target_is_blockrep"):
            self.count_dr_snapshots()
        self.shared.notify(f"{self.label}: {name} replicated")
        prune_local(self.job, self.st)

    def count_dr_snapshots(self) -> None:
        """The DR's snapshots of this volume, for status and blockrep_snapshots{site="dr"}."""
        try:
            mine = read_params(self.job.path).uuid
            hello = drclient.hello(self.target.uri)
        except BlockrepError:
            return
        n = sum(1 for s in hello.get("snapshots", []) if (s.get("source") or "") == mine)
        self.st.set_target(self.target.uri, dr_snapshots=n)

    def _failed(self, name: str | None, e: BlockrepError) -> None:
        """Back off and say why. A refusal that a retry cannot fix (the target is the wrong
        volume, bound to another primary, too small…) is state `refused`, retried at retry_max
        (the operator may fix the target or the file meanwhile)."""
        self.failures += 1
        refused = isinstance(e, (Conflict, InvalidArgument, AlreadyExists))
        delay = self.shared.retry_max if refused else min(self.shared.retry_max,
                                                          self.shared.retry_min * 2 ** (self.failures - 1))
        self.retry_at = utcnow() + _dt.timedelta(seconds=delay)
        text = redact(str(e), self.target.uri)
        self.st.add(self.target.uri, "failures_total", 1)
        self.st.set_target(self.target.uri, state="refused" if refused else "failing", failures=self.failures,
                           last_error=text, next_attempt=self.retry_at)
        what = f"transfer of {name}" if name else "looking for work"
        log.warning("%s: %s %s: %s; retry in %d s", self.label, what, "refused" if refused else "failed",
                    text, delay)
        self.shared.notify(f"{self.label}: failing")
        self._sleep(delay)


def prune_local(job: VolumeJob, st: JobState) -> None:
    """The primary's retention: scheduled snapshots beyond keep_local (and the GFS rules); the
    ones replication still needs are kept (REPLICATION.md §6)."""
    kwargs: dict = {"keep": job.keep_local, "only_tagged": True}
    if job.gfs:
        kwargs["gfs"] = job.gfs
    try:
        res = run_op(job.path, "snapshot_prune", **kwargs)
    except BlockrepError as e:
        log.warning("%s: pruning failed: %s", job.path, e)
        st.set(last_error=f"pruning: {e}")
        return
    for name in res.get("deleted", []):
        log.info("%s: pruned %s", job.path, name)
    kept = res.get("kept") or {}
    note = "; ".join(f"{n}: {why}" for n, why in sorted(kept.items()))
    if note != (st.data.get("kept_beyond") or ""):  # once per change, not at every slot
        if kept:
            log.warning("%s: keeping %d scheduled snapshot(s) beyond keep_local, replication needs them: %s",
                        job.path, len(kept), note)
        st.set(kept_beyond=note or None)


class VolumeWorker(threading.Thread):
    """Takes the volume's snapshots at its slots (one catch-up after downtime) and wakes its
    targets."""

    def __init__(self, job: VolumeJob, shared: Shared):
        super().__init__(daemon=True, name=f"snap {job.path.name}")
        self.job, self.shared = job, shared
        self.st = JobState(job.path)
        self.in_hooks = False  # inside quiesced(): a stop waits for the post/thaw hooks
        self.stop_ev = threading.Event()
        self.targets = [TargetWorker(job, t, self.st, shared) for t in job.targets]
        for key in list(self.st.data["targets"]):
            if key not in {redact_uri(t.uri) for t in job.targets}:
                del self.st.data["targets"][key]

    def begin(self) -> None:
        self.start()
        for t in self.targets:
            t.start()

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.targets:
            t.stop()

    def alive(self) -> bool:
        return any(th.is_alive() for th in [self, *self.targets])

    def join_all(self, timeout: float) -> None:
        deadline = utcnow() + _dt.timedelta(seconds=timeout)
        for th in [self, *self.targets]:
            if th.ident is not None:
                th.join(max(0.0, (deadline - utcnow()).total_seconds()))

    def warn_foreign_targets(self) -> None:
        """Targets in replication.json that this schedule does not ship to still protect their
        base and the snapshots they lack from pruning (REPLICATION.md §6): say so, once."""
        try:
            known = repl_state.load(self.job.path)["targets"]
        except BlockrepError:
            return
        mine = {t.uri for t in self.job.targets}
        for uri in sorted(set(known) - mine):
            log.warning("%s: replication.json also lists %s, which this schedule does not ship to; its base and "
                        "the snapshots it lacks stay protected from pruning for 30 days "
                        "(`blockrep status %s --forget URI` drops it)", self.job.path, redact_uri(uri), self.job.path)

    def ensure_served(self) -> None:
        read_params(self.job.path)  # a volume that is gone: say that, not "starting its server"
        if not server.running_pid(self.job.path):
            log.info("%s: not served; starting its server", self.job.path)
            server.serve(str(self.job.path))

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                self.loop()
            except Exception as e:  # noqa: BLE001 - a worker must never die silently
                log.error("%s: internal error (%s: %s); retrying in 10 s", self.job.path, type(e).__name__, e)
                self.st.set(last_error=f"internal error: {type(e).__name__}: {e}")
                self.stop_ev.wait(10)

    def loop(self) -> None:
        job = self.job
        if self.st.last_slot is None:  # never ran: wait for the first slot, no catch-up of the past
            self.st.set(last_slot=cal.slot_at_or_before(job.start, job.every, utcnow()))
        while not self.stop_ev.is_set():
            now = utcnow()
            last = self.st.last_slot
            if last is not None and (last - now).total_seconds() > job.every:
                log.warning("%s: the clock went back (the last slot run, %s, is in the future); "
                            "the schedule continues from now", job.path, cal.iso(last))
                self.st.set(last_slot=cal.slot_at_or_before(job.start, job.every, now))
                last = self.st.last_slot
            slot = cal.due(job.start, job.every, last, now)
            if slot is not None:
                self.take(slot, catch_up=last is not None and (slot - last).total_seconds() > job.every)
            nxt = cal.next_slot(job.start, job.every, utcnow())
            self.st.set(next_run=nxt)
            self.stop_ev.wait(max(0.0, (nxt - utcnow()).total_seconds()))

    def take(self, slot: _dt.datetime, catch_up: bool) -> None:
        # A catch-up is named after the time it is taken: it holds that moment's data, not the slot's
        job, name = self.job, snapshot_name(utcnow() if catch_up else slot)
        try:
            role = read_role(job.path)
        except BlockrepError as e:
            role = {"role": "unknown", "bound_to": None}
            log.warning("%s: %s", job.path, e)
        if role["role"] in ("dr", "promoting"):  # its head is a transfer's, not an application's
            log.warning("%s: skipped the slot %s: the volume is a DR (of %s) now; `blockrep promote` makes it "
                        "a primary again", job.path, cal.iso(slot), role["bound_to"] or "a promote under way")
            self.st.set(last_slot=slot, last_error="the volume is a DR: no snapshots are scheduled")
            return
        try:
            self.ensure_served()
            self.in_hooks = True
            try:
                with quiesced(freeze=list(job.freeze) or None, pre=list(job.pre) or None,
                              post=list(job.post) or None):
                    snap = run_op(job.path, "snapshot_create", name=name, tag=True)
            finally:
                self.in_hooks = False
        except BlockrepError as e:
            log.warning("%s: snapshot for the slot %s failed: %s", job.path, cal.iso(slot), e)
            self.st.set(last_slot=slot, last_error=f"snapshot: {e}")
            self.shared.notify(f"{job.path}: snapshot failed")
            return
        self.st.set(last_slot=slot, last_snapshot=snap["name"], last_error=None)
        log.info("%s: snapshot %s taken%s", job.path, snap["name"], " (catching up a missed run)" if catch_up else "")
        self.shared.notify(f"{job.path}: snapshot {snap['name']}")
        for t in self.targets:
            t.wake.set()
        prune_local(job, self.st)
