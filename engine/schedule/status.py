"""`blockrep schedule status` and the metrics read the same rows (docs/SCHEDULE.md §4): the
daemon's record (VOL/schedule.json: state, next run, counters), the replication records (RPO,
pending bytes, last success), and the volume's own figures. So a scrape shows what status shows."""

from __future__ import annotations

import datetime as _dt
import os

from ..access import run_op
from ..errors import BlockrepError
from ..replication import state as repl_state
from ..replication.retention import FLAG_REPLICATE
from ..replication.status import status as repl_status
from ..replication.uris import redact_uri
from . import calendar as cal
from . import jobstate
from .config import Config


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rows(cfg: Config) -> list[dict]:
    """One dict per volume, with a `targets` list; errors are reported in the row, never raised."""
    out = []
    now = _dt.datetime.now(_dt.UTC)
    for job in cfg.volumes:
        row: dict = {"volume": str(job.path), "every": job.every, "next_runs": None, "error": None,
                     "targets": []}
        try:
            rec = jobstate.load(job.path)
        except BlockrepError as e:
            rec, row["error"] = {}, str(e)
        running = _alive(rec.get("pid"))
        row["daemon"] = {"running": running, "pid": rec.get("pid") if running else None,
                         "heartbeat": rec.get("heartbeat")}
        row["last_snapshot"] = rec.get("last_snapshot")
        row["next_run"] = cal.iso(cal.next_slot(job.start, job.every, now))
        row["last_error"] = rec.get("last_error")
        try:
            info = run_op(job.path, "info")
            snaps = run_op(job.path, "snapshot_list")
            row["used_bytes"], row["live_bytes"] = info.get("used_bytes"), info.get("live_bytes")
            row["snapshots"] = len(snaps)
            row["scheduled_snapshots"] = sum(1 for s in snaps if s.get("flags", 0) & FLAG_REPLICATE)
            by_uri = {r["target"]: r for r in repl_status(str(job.path))}
        except BlockrepError as e:
            row["error"] = row["error"] or str(e)
            by_uri = {}
        for t in job.targets:
            r = by_uri.get(t.uri, {})
            d = (rec.get("targets") or {}).get(t.uri) or {}
            state = d.get("state", "idle") if running else "stopped"
            ok = r.get("last_success") or {}
            row["targets"].append({
                "target": redact_uri(t.uri), "state": state, "snapshot": r.get("snapshot"),
                "rpo_seconds": r.get("rpo_seconds"), "pending_bytes": r.get("pending_bytes"),
                "last_success": ok.get("at"), "last_error": d.get("last_error") or r.get("last_error"),
                "next_attempt": d.get("next_attempt"), "next_window": d.get("next_window"),
                "window": str(t.window) if t.window else None, "shipping": d.get("snapshot"),
                "bytes_sent_total": int(d.get("bytes_sent_total") or 0),
                "failures_total": int(d.get("failures_total") or 0),
                "dr_snapshots": d.get("dr_snapshots"),
                "in_progress_bytes": ((repl_state.target(job.path, t.uri).get("in_progress") or {})
                                      .get("done_upto")) if r else None,
            })
        out.append(row)
    return out
