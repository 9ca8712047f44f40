"""`blockrep promote` and `blockrep demote`: failover and failback (docs/REPLICATION.md §9).

Notes on the design:
- The role lives in the DR server's dr.json and changes only through its control ops
  (`dr_promote`, `dr_promote_done`, `dr_demote`), so a served volume and one opened for this
  command (a private server, as restore does) behave alike, and the server's in-memory state
  is the one that changes.
- Both hold the live export exclusively (backseed.exclusive_head) while they work: no client
  writes into a head whose role is changing.
- promote = stop taking the primary's transfers, then a rollback of the head to NAME (the head
  of a DR may hold a partial delta), verified by digest; a promote interrupted in between is
  finished by running it again. demote = a safety snapshot (the writes that never reached the
  new primary) and a binding; the next transfer from the new primary overwrites those writes,
  incrementally from the common base, because both volumes hold the same snapshot uuids.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import control
from ..access import run_op
from ..errors import InvalidArgument
from ..volume import read_params
from . import drclient, state
from .backseed import _ship, _verify, exclusive_head, safety_snapshot
from .drserver import read_role
from .replicate import source_server
from .uris import redact_uri


def promote(volume: str, snapshot: str | None = None, *, force: bool = False, progress: bool = False) -> dict:
    """Failover: the DR volume's live export becomes writable and equal to its snapshot (default the
    newest a transfer committed); its old primary's transfers are refused from now on."""
    t0 = time.monotonic()
    vol = Path(volume).resolve()
    params = read_params(vol)
    with source_server(vol) as src, exclusive_head(vol, force) as token:
        pr = control.call(vol, "dr_promote", snapshot=snapshot, force=force)
        name = pr["snapshot"]
        safety = safety_snapshot(vol, token)
        extents = [(e["offset"], e["length"]) for e in run_op(vol, "diff", from_name=name, to_name=safety)]
        sent = _ship(src, "@" + name, src, token, extents, rate=None, progress=progress, retries=2,
                     size=params.size)
        _verify(src, src, name, extents, params.size)
        control.call(vol, "dr_promote_done", safety_snapshot=safety)
    return {"snapshot": name, "uuid": pr["snapshot_uuid"], "former_primary": pr["from"], "role": "promoted",
            "safety_snapshot": safety, "extents": len(extents), "bytes_sent": sent["bytes_sent"],
            "bytes_zeroed": sent["bytes_zeroed"], "seconds": round(time.monotonic() - t0, 3)}


def _common(own: list[dict], peer: dict) -> dict | None:
    """The newest of this volume's snapshots (oldest first) whose uuid the peer holds."""
    theirs = {s["uuid"] for s in peer.get("snapshots") or []}
    return next((s for s in reversed(own) if s["uuid"] in theirs), None)


def demote(volume: str, primary_uri: str, *, force: bool = False) -> dict:
    """This volume becomes a DR of the blockrep server at primary_uri: its live export turns
    read-only and takes that server's transfers (after a safety snapshot of what it holds)."""
    t0 = time.monotonic()
    vol = Path(volume).resolve()
    params = read_params(vol)
    shown = redact_uri(primary_uri)
    _, peer = drclient.blockrep_peer(primary_uri, "the new primary is unreachable",
                                     f"{shown} is not a blockrep server: a DR is bound to a blockrep volume")
    if peer.get("volume") == params.uuid:
        raise InvalidArgument(f"{shown} is {vol} itself: a volume cannot be a DR of itself")
    if peer.get("size") != params.size:
        raise InvalidArgument(f"the primary volume is {peer.get('size')} bytes, {vol} is {params.size}: "
                              "a DR has its primary's size")
    if peer.get("role") == "dr":
        raise InvalidArgument(f"{shown} is itself a DR (of {peer.get('bound_to')}): promote it first")
    if read_role(vol)["bound_to"] == peer.get("volume"):
        raise InvalidArgument(f"{vol} is already a DR of {shown} (volume {peer.get('volume')})")
    with source_server(vol):
        own = run_op(vol, "snapshot_list")
        base = _common(own, peer)
        if base is None and not force:
            raise InvalidArgument(f"{shown} (volume {peer.get('volume')}) shares no snapshot with {vol}: its "
                                  "first transfer here would compare both whole volumes and overwrite what differs "
                                  "(a rebase); --force binds it anyway")
        changed = sum(e["length"] for e in run_op(vol, "changes_since", since=base["name"])) if base else 0
        if changed and not force and base is not None:
            raise InvalidArgument(f"{vol} changed since {base['name']}, the newest snapshot {shown} holds "
                                  f"({changed} bytes): the next transfer from it overwrites those writes. For a "
                                  f"planned switch-over replicate them there first; after a failover (they never "
                                  "reached the DR) --force keeps them in the safety snapshot only")
        control.call(vol, "dr_demote", primary=peer["volume"], force=force)  # the checks, before any snapshot
        with exclusive_head(vol, force) as token:
            safety = safety_snapshot(vol, token)
            res = control.call(vol, "dr_demote", primary=peer["volume"], safety_snapshot=safety, force=force)
        # a transfer of ours to the new primary that was interrupted before the roles changed must
        # never resume: its prefix is gone from there (promote rolled it back)
        for uri, t in state.load(vol)["targets"].items():
            if t.get("dr_volume") == peer["volume"] and t.get("in_progress"):
                state.set_target(vol, uri, in_progress=None)
    return {"role": "dr", "bound_to": res["bound_to"], "primary": shown,
            "common_base": base and base["name"], "discarded_bytes": changed, "safety_snapshot": safety,
            "seconds": round(time.monotonic() - t0, 3)}
