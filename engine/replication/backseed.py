"""`blockrep restore` (back seed from a DR snapshot) and `blockrep snapshot rollback` (the live
volume becomes one of its own snapshots): docs/REPLICATION.md §8.

Notes on the design:
- Both replace the live data, so both: ask (a terminal) or require --yes; refuse while other
  clients have the live export open (--force); hold the head exclusively meanwhile (the server
  refuses new clients of the live export; this command writes through `!restore?token=T`, a
  token only the control socket hands out, so nobody else can); take a **safety snapshot** first,
  so the change can be undone (`snapshot rollback VOL SAFETY`).
- Only what differs is written. rollback: the changes between NAME and the safety snapshot
  (read from the volume's own `@NAME`). restore, with a snapshot both sites hold (by uuid): the
  primary's changes since it plus the DR head's changes since it (a superset of the DR's changes
  up to NAME), read from the DR's `@NAME`; with none but data here: digests of both compared,
  only differing 1 MiB chunks; an empty volume: a full copy (holes as write-zeroes).
- Afterwards the digests of every chunk written are compared on both sides (only digests cross);
  the volume then holds NAME's uuid as a snapshot, and replication.json records the DR as holding
  it, so the next `replicate` is incremental.
- Writes are ordinary writes with new generations: change tracking stays exact (a rollback that
  re-pointed the map at old entries would carry old generations and hide the change from every
  later diff).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .. import control
from ..access import run_op
from ..errors import BlockrepError, InvalidArgument, NotFound
from ..volume import read_params
from . import checksums as C
from . import drclient, state
from . import protocol as P
from .copy import RateSpec, copy_extents
from .nbdio import TransferError
from .replicate import Progress, merge_extents, source_server


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; without one, --yes is required (a script must say it means it)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InvalidArgument(f"{question}: confirm with --yes (there is no terminal to ask)")
    print(f"{question}. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise InvalidArgument("not confirmed: nothing was changed")


@contextlib.contextmanager
def exclusive_head(vol: Path, force: bool, stream_from: str | None = None) -> Iterator[str]:
    """The live export to ourselves: refused while other clients have it open (unless force);
    yields the token of the `!restore` export this command writes through. stream_from: a
    receive of a stream from that primary (DRServer.head_exclusive)."""
    token = P.new_token()
    if stream_from is None:
        control.call(vol, "head_exclusive", token=token, pid=os.getpid(), force=force)
    else:
        control.call(vol, "head_exclusive", token=token, pid=os.getpid(), force=force, stream_from=stream_from)
    try:
        yield token
    finally:
        with contextlib.suppress(BlockrepError):
            control.call(vol, "head_release", token=token)


def safety_snapshot(vol: Path, token: str) -> str:
    """A snapshot of the live volume before it is replaced (token: the head's holder; the server
    refuses everybody else's snapshots while the head is held, so none holds a half-done state)."""
    name = "safety-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")[:-4] + "Z"
    return run_op(vol, "snapshot_create", name=name, holder=token)["name"]


def _ship(source_uri: str, source_export: str, target_uri: str, token: str, extents, *, rate, progress,
          retries: int, size: int) -> dict:
    """Copy the extents into the head, retried from the confirmed prefix on transient errors."""
    total = sum(n for _, n in extents)
    show = Progress(total, progress)
    done = {"upto": 0}

    def saved(stats, confirmed):
        done["upto"] = confirmed
        show(stats, confirmed)
    for attempt in range(1, retries + 2):
        try:
            st = copy_extents(source_uri, source_export, target_uri, P.build("restore", token=token), extents,
                              rate=rate, resume_from=done["upto"], on_progress=saved, connections=1)
            show.done()
            return st.as_dict()
        except TransferError as e:
            if not e.transient or attempt > retries:
                show.done()
                raise TransferError(f"copying {source_export} into the live volume failed after {attempt} "
                                    f"attempt(s): {e}", transient=e.transient) from None
            wait = min(30, 2 ** (attempt - 1))
            show.note(f"retrying in {wait} s (attempt {attempt + 1} of {retries + 1}): {e}")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _still_differing(vol: Path, head_uri: str, source_uri: str, source_snapshot: str, safety: str, extents,
                     size: int) -> tuple[list[tuple[int, int]], int]:
    """Resume: of the planned extents plus whatever the head changed since the safety snapshot
    (the interrupted run's writes, and any other), only the 1 MiB chunks whose digests still differ
    from the source (only digests cross). Returns (extents, bytes found already there)."""
    since = [(e["offset"], e["length"]) for e in run_op(vol, "changes_since", since=safety)]
    chunks = C.chunks_of(merge_extents(extents, since), P.FULL_SHIFT)
    if not chunks:
        return [], 0
    runs = C.runs_of(chunks)
    mine = C.blockrep_sums(head_uri, None, P.FULL_SHIFT, runs, size)
    theirs = C.blockrep_sums(source_uri, source_snapshot, P.FULL_SHIFT, runs, size)
    bad = [chunks[i] for i in C.differing(mine, theirs).tolist()]
    todo = C.coalesce(bad, P.FULL_SHIFT, size)
    planned = sum(n for _, n in C.coalesce(chunks, P.FULL_SHIFT, size))
    return todo, planned - sum(n for _, n in todo)


def _verify(head_uri: str, source_uri: str, source_snapshot: str, extents, size: int) -> None:
    """Digests of every chunk written, here and at the source: they must be equal."""
    if not extents:
        return
    runs = C.runs_of(C.chunks_of(extents, P.FULL_SHIFT))
    mine = C.blockrep_sums(head_uri, None, P.FULL_SHIFT, runs, size)
    theirs = C.blockrep_sums(source_uri, source_snapshot, P.FULL_SHIFT, runs, size)
    bad = C.differing(mine, theirs)
    if len(bad):
        raise BlockrepError(f"after the copy {len(bad)} chunk(s) of the live volume still differ from "
                            f"{source_snapshot}: the live volume is in between (its safety snapshot holds "
                            "what it was); run the command again")


def rollback(volume: str, name: str, *, yes: bool = False, force: bool = False, progress: bool = False) -> dict:
    """The live volume becomes snapshot NAME (after a safety snapshot)."""
    t0 = time.monotonic()
    vol = Path(volume).resolve()
    params = read_params(vol)
    snaps = run_op(vol, "snapshot_list")
    if not any(s["name"] == name for s in snaps):
        raise NotFound(f"no snapshot named {name!r} in {vol}")
    confirm(f"This replaces the live data of {vol} with snapshot {name} (a safety snapshot is taken first)", yes)
    with source_server(vol) as src, exclusive_head(vol, force) as token:
        safety = safety_snapshot(vol, token)
        extents = [(e["offset"], e["length"]) for e in run_op(vol, "diff", from_name=name, to_name=safety)]
        sent = _ship(src, "@" + name, src, token, extents, rate=None, progress=progress, retries=2,
                     size=params.size)
        _verify(src, src, name, extents, params.size)
    return {"snapshot": name, "safety_snapshot": safety, "mode": "local", "extents": len(extents),
            "bytes_sent": sent["bytes_sent"], "bytes_zeroed": sent["bytes_zeroed"],
            "seconds": round(time.monotonic() - t0, 3)}


def _dr_snapshot(dr: dict, name: str | None) -> dict:
    snaps = dr.get("snapshots") or []
    if not snaps:
        raise NotFound("the DR holds no snapshot to restore from")
    if name is None:
        return snaps[-1]
    for s in snaps:
        if s["name"] == name:
            return s
    raise NotFound(f"the DR holds no snapshot named {name!r} (it has: "
                   f"{', '.join(s['name'] for s in snaps[-5:])}{' …' if len(snaps) > 5 else ''})")


def restore(volume: str, uri: str, snapshot: str | None = None, *, yes: bool = False, force: bool = False,
            rate: RateSpec = None, progress: bool = False, retries: int = 6) -> dict:
    """Rebuild the live volume from the DR's snapshot (default its newest), shipping only what
    differs; returns snapshot, safety_snapshot, mode, bytes_sent, seconds."""
    t0 = time.monotonic()
    vol = Path(volume).resolve()
    params = read_params(vol)
    info, dr = drclient.blockrep_peer(uri, "DR unreachable", f"{uri} is not a blockrep server: restore needs its "
                                      "snapshots by identity (for any other NBD export, copy it with nbdcopy)")
    if info["export"] != "":
        raise InvalidArgument(f"{uri} names the export {info['export']!r}: give the DR server itself and "
                              "--snapshot NAME")
    if dr.get("volume") == params.uuid:
        raise InvalidArgument(f"{uri} is {vol} itself: restore reads from a DR of it")
    if dr.get("size") != params.size:
        raise InvalidArgument(f"the DR volume is {dr.get('size')} bytes, {vol} is {params.size}: restore into "
                              "a volume of the same size")
    target = _dr_snapshot(dr, snapshot)
    local = {s["uuid"]: s for s in run_op(vol, "snapshot_list")}
    empty = not local and not run_op(vol, "info").get("live_bytes")
    ours = target.get("source") in (params.uuid, None) or dr.get("bound_to") == params.uuid
    pending = state.target(vol, uri).get("restoring") or {}
    if not ours and not empty and not force and pending.get("snapshot_uuid") != target["uuid"]:
        raise InvalidArgument(f"DR snapshot {target['name']} is a copy of another volume ({target.get('source')}), "
                              f"and {vol} holds data of its own: --force replaces it anyway")
    confirm(f"This replaces the live data of {vol} with DR snapshot {target['name']} from {uri} "
            "(a safety snapshot is taken first)", yes)
    with source_server(vol) as src, exclusive_head(vol, force) as token:
        # an interrupted restore of the same DR snapshot: keep its safety snapshot (the state
        # before it began) and send only what did not arrive (below)
        resumed = pending.get("snapshot_uuid") == target["uuid"] and \
            any(s["name"] == pending.get("safety_snapshot") for s in local.values())
        interim = None
        if resumed:
            safety = pending["safety_snapshot"]
            # what the head holds now (half restored, or written since): never overwritten unkept
            interim = safety_snapshot(vol, token)
        else:
            safety = safety_snapshot(vol, token)
            state.set_target(vol, uri, restoring={"snapshot": target["name"], "snapshot_uuid": target["uuid"],
                                                  "safety_snapshot": safety, "started": state.now()})
            local = {s["uuid"]: s for s in run_op(vol, "snapshot_list")}
        upto = [s for s in dr["snapshots"][: dr["snapshots"].index(target) + 1]]
        base = next((s for s in reversed(upto) if s["uuid"] in local), None)
        if base is not None:
            mode = "incremental"
            mine = [(e["offset"], e["length"])
                    for e in run_op(vol, "diff", from_name=local[base["uuid"]]["name"], to_name=safety)]
            theirs = drclient.changes(uri, base["name"]) if base["uuid"] != target["uuid"] else []
            extents = merge_extents(mine, theirs)
        elif not empty:
            mode = "rebase"
            a = C.blockrep_sums(src, safety, P.FULL_SHIFT, None, params.size)
            b = C.blockrep_sums(uri, target["name"], P.FULL_SHIFT, None, params.size)
            extents = C.coalesce(C.differing(a, b).tolist(), P.FULL_SHIFT, params.size)
        else:
            mode, extents = "full", [(0, params.size)]
        skipped = 0
        if resumed:
            extents, skipped = _still_differing(vol, src, uri, target["name"], safety, extents, params.size)
        sent = _ship(uri, "@" + target["name"], src, token, extents, rate=rate, progress=progress,
                     retries=retries, size=params.size)
        _verify(src, uri, target["name"], extents, params.size)
        have = local.get(target["uuid"])
        if have is None:  # NAME's identity here too: the next replicate is incremental
            names = {s["name"] for s in local.values()}
            name = target["name"] if target["name"] not in names else f"{target['name'][:55]}-restored"
            have = run_op(vol, "snapshot_create", name=name, tag=True, uuid=target["uuid"], holder=token)
        state.set_target(vol, uri, kind="blockrep", snapshot=have["name"], snapshot_uuid=target["uuid"],
                         replicated_at=state.now(), in_progress=None, dr_volume=dr.get("volume"), restoring=None)
    return {"snapshot": target["name"], "uuid": target["uuid"], "safety_snapshot": safety, "mode": mode,
            "resumed": resumed, "bytes_already_there": skipped, "interim_snapshot": interim,
            "base": base and base["name"], "extents": len(extents), "bytes_sent": sent["bytes_sent"],
            "bytes_zeroed": sent["bytes_zeroed"], "local_snapshot": have["name"],
            "seconds": round(time.monotonic() - t0, 3)}
