"""`blockrep status`: per target, the newest replicated snapshot, RPO, pending bytes, and the last
success and the last failure apart (DESIGN §1 "RPO as a first-class number")."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from ..access import run_op
from ..volume import read_params
from . import state
from .drserver import read_role


def status(volume: str) -> list[dict]:
    vol = Path(volume).resolve()
    read_params(vol)
    targets = state.load(vol)["targets"]
    snaps = {s["uuid"]: s for s in run_op(vol, "snapshot_list")} if targets else {}
    now = _dt.datetime.now(_dt.UTC)
    role = read_role(vol)
    # a DR (e.g. an old primary demoted after a failover) ships nothing while it is one
    inactive = role["role"] in ("dr", "promoting")
    out = []
    for uri, t in targets.items():
        ok, bad = t.get("last_success"), t.get("last_failure")
        failing = bool(bad) and (not ok or bad.get("at", "") >= ok.get("at", ""))
        row = {"target": uri, "kind": t.get("kind"), "snapshot": t.get("snapshot"),
               "snapshot_uuid": t.get("snapshot_uuid"), "replicated_at": t.get("replicated_at"),
               "rpo_seconds": None, "pending_bytes": None,
               "state": "inactive" if inactive else "failing" if failing else "ok", "volume_role": role["role"],
               "last_success": ok, "last_failure": bad, "last_error": t.get("last_error"),
               "last_rate": (ok or {}).get("rate"),
               "in_progress": t.get("in_progress")}
        s = snaps.get(t.get("snapshot_uuid") or "")
        if s:
            created = state.parse_time(s["created"])
            row["rpo_seconds"] = round((now - created).total_seconds())
            row["pending_bytes"] = run_op(vol, "pending", since=s["name"])
        out.append(row)
    return out


def forget(volume: str, uri: str) -> bool:
    vol = Path(volume).resolve()
    read_params(vol)
    return state.forget(vol, uri)
