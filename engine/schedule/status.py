"""`blockrep schedule status` and the metrics read the same rows (docs/SCHEDULE.md §4): the
daemon's record (VOL/schedule.json: state, next run, counters), the replication records (RPO,
pending bytes, last success), and the volume's own figures. So a scrape shows what status shows.

It only asks servers, each call with a short deadline, and stops asking a volume after its first
failure: one hung server costs a scrape OP_TIMEOUT, not every volume's figures. An unserved
volume is never opened here (that would take its lock under the daemon, which serves it).
"""

from __future__ import annotations

import datetime as _dt

from .. import control, server
from ..errors import BlockrepError
from ..replication import state as repl_state
from ..replication.retention import FLAG_REPLICATE
from ..replication.uris import redact_uri
from . import calendar as cal
from . import jobstate
from .config import Config, VolumeJob

OP_TIMEOUT = 2.0  # seconds per control-socket call


class _Volume:
    """The figures of one served volume, asked through its control socket."""

    def __init__(self, vol):
        self.vol, self.error = vol, None if server.running_pid(vol) else "not served"

    def op(self, cmd: str, **args):
        if self.error:
            return None
        try:
            return control.call(self.vol, cmd, timeout=OP_TIMEOUT, **args)
        except BlockrepError as e:
            self.error = str(e)
            return None


def _targets(job: VolumeJob, rec: dict, running: bool, v: _Volume, snaps: list[dict] | None) -> list[dict]:
    now = _dt.datetime.now(_dt.UTC)
    try:
        records = repl_state.load(job.path)["targets"]
    except BlockrepError as e:
        v.error = v.error or str(e)
        records = {}
    by_uuid = {s["uuid"]: s for s in snaps or []}
    out = []
    for t in job.targets:
        r = records.get(t.uri) or {}
        d = (rec.get("targets") or {}).get(redact_uri(t.uri)) or {}
        ok = r.get("last_success") or {}
        s = by_uuid.get(r.get("snapshot_uuid") or "")
        rpo = round((now - repl_state.parse_time(s["created"])).total_seconds()) if s else None
        pending = v.op("pending", since=s["name"]) if s else None
        out.append({
            "target": redact_uri(t.uri), "state": d.get("state", "idle") if running else "stopped",
            "snapshot": r.get("snapshot"), "rpo_seconds": rpo, "pending_bytes": pending,
            "last_success": ok.get("at"), "last_error": d.get("last_error"),
            "next_attempt": d.get("next_attempt"), "next_window": d.get("next_window"),
            "window": str(t.window) if t.window else None, "shipping": d.get("snapshot"),
            "rate_now": t.rate_at(now),
            "bytes_sent_total": int(d.get("bytes_sent_total") or 0),
            "failures_total": int(d.get("failures_total") or 0),
            "dr_snapshots": d.get("dr_snapshots"),
            "in_progress_bytes": (r.get("in_progress") or {}).get("done_upto"),
        })
    return out


def rows(cfg: Config) -> list[dict]:
    """One dict per volume, with a `targets` list; errors are reported in the row, never raised."""
    out = []
    now = _dt.datetime.now(_dt.UTC)
    for job in cfg.volumes:
        row: dict = {"volume": str(job.path), "every": job.every, "error": None}
        try:
            rec = jobstate.load(job.path)
        except BlockrepError as e:
            rec, row["error"] = {}, str(e)
        running = jobstate.ScheduleLock.held(job.path)
        row["daemon"] = {"running": running, "pid": rec.get("pid") if running else None,
                         "heartbeat": rec.get("heartbeat")}
        row["last_snapshot"] = rec.get("last_snapshot")
        row["next_run"] = cal.iso(cal.next_slot(job.start, job.every, now))
        row["last_error"] = rec.get("last_error")
        row["kept_beyond_keep_local"] = rec.get("kept_beyond")
        v = _Volume(job.path)
        info = v.op("info") or {}
        snaps = v.op("snapshot_list")
        row["used_bytes"], row["live_bytes"] = info.get("used_bytes"), info.get("live_bytes")
        row["snapshots"] = len(snaps) if snaps is not None else None
        row["scheduled_snapshots"] = (sum(1 for s in snaps if s.get("flags", 0) & FLAG_REPLICATE)
                                      if snaps is not None else None)
        row["targets"] = _targets(job, rec, running, v, snaps)
        row["error"] = row["error"] or v.error
        out.append(row)
    return out
