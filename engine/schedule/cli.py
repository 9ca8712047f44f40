"""`blockrep schedule run|check|status CONFIG.toml` (docs/SCHEDULE.md)."""

from __future__ import annotations

import datetime as _dt
import json
import sys

from ..errors import BlockrepError
from ..replication.uris import redact, redact_uri
from ..units import format_size
from . import calendar as cal
from . import config as C


def _dr_retention(uri: str) -> str:
    """Which rule prunes the DR: asked of the DR itself (a short probe)."""
    from ..replication import drclient
    try:
        info, is_br = drclient.is_blockrep(uri)
        if not is_br:
            return "not a blockrep DR: nothing prunes its history (keep_remote does not apply)"
        r = drclient.hello(uri).get("retention") or {}
    except BlockrepError as e:
        return f"unknown now (target unreachable: {redact(str(e), uri)})"
    own = f"its own serve --keep {r.get('keep')}" if r.get("keep") else "no retention of its own (serve --keep)"
    if r.get("allow_remote_prune"):
        return f"keep_remote applies (the DR allows remote pruning, never below {own})"
    return f"{own} (append-only DR: keep_remote is not honoured there)"


def cmd_check(a) -> int:
    cfg = C.load(a.config)  # ConfigError: one line per problem (main() prints them)
    now = _dt.datetime.now(_dt.UTC)
    vols: list[dict] = []
    out: dict = {"config": str(cfg.path), "metrics": f"{cfg.metrics[0]}:{cfg.metrics[1]}" if cfg.metrics else None,
           "max_transfers": cfg.max_transfers, "volumes": vols}
    for job in cfg.volumes:
        runs = [cal.iso(t) for t in cal.next_slots(job.start, job.every, now, 5)]
        tg = [{"target": redact_uri(t.uri), "window": str(t.window) if t.window else None,
               "rate": t.rate, "rates": [{"window": str(w), "rate": r} for w, r in t.rates],
               "keep_remote": t.keep_remote, "ship": t.ship,
               "dr_retention": _dr_retention(t.uri) if not a.offline else None} for t in job.targets]
        vols.append({"volume": str(job.path), "every": job.every, "keep_local": job.keep_local,
                               "gfs": job.gfs, "next_runs": runs, "targets": tg})
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cfg.path}: valid, {len(cfg.volumes)} volume(s)")
    for v in vols:
        print(f"{v['volume']}: every {v['every']} s, keep_local {v['keep_local']}"
              + (f", gfs {v['gfs']}" if v["gfs"] else ""))
        for r in v["next_runs"]:
            at = cal.parse_iso(r)
            print(f"  next run {at.astimezone().isoformat(timespec='seconds') if at else r}")
        for t in v["targets"]:
            extra = ", ".join(x for x in (f"window {t['window']}" if t["window"] else "",
                                          f"rate {format_size(t['rate'])}/s" if t["rate"] else "",
                                          *(f"{format_size(r['rate'])}/s during {r['window']}" for r in t["rates"]))
                              if x)
            print(f"  target {t['target']}" + (f" ({extra})" if extra else ""))
            if t["dr_retention"]:
                print(f"    DR retention: {t['dr_retention']}")
    return 0


def _age(s) -> str:
    return "-" if s is None else f"{s} s"


def cmd_status(a) -> int:
    from .status import rows
    cfg = C.load(a.config, check_volumes=False)
    rs = rows(cfg)
    if a.json:
        print(json.dumps(rs, indent=2))
        return 0
    for r in rs:
        d = r["daemon"]
        daemon = f"daemon pid {d['pid']}" if d["running"] else "daemon not running"
        print(f"{r['volume']}: {daemon}, last snapshot {r['last_snapshot'] or '-'}, next run {r['next_run']}"
              + (f", error: {r['error'] or r['last_error']}" if r["error"] or r["last_error"] else ""))
        for t in r["targets"]:
            pend = format_size(t["pending_bytes"]) if t["pending_bytes"] is not None else "-"
            line = (f"  {t['target']}: {t['state']}, snapshot {t['snapshot'] or '-'}, RPO {_age(t['rpo_seconds'])}, "
                    f"pending {pend}")
            if t["state"] in ("waiting", "paused") and t["next_window"]:
                line += f", window opens {t['next_window']}"
            if t["state"] == "failing":
                line += f", next attempt {t['next_attempt']}, last error: {t['last_error']}"
            print(line)
    return 0


def cmd_run(a) -> int:
    from .daemon import run
    return run(a.config)


def _reporting(fn):
    """A config with errors: one `blockrep: error:` line per error, exit 1."""
    def run(a) -> int:
        try:
            return fn(a)
        except C.ConfigError as e:
            for line in e.errors:
                print(f"blockrep: error: {a.config}: {line}", file=sys.stderr)
            return 1
    return run


def add_parser(sub) -> None:
    sc = sub.add_parser("schedule", help="the automatic replication daemon: run it, check its file, show status")
    ss = sc.add_subparsers(dest="schedule_command", required=True, parser_class=type(sc))
    r = ss.add_parser("run", help="run the schedule in the foreground (systemd Type=notify)")
    r.add_argument("config", metavar="CONFIG.toml", help="the schedule file (docs/SCHEDULE.md)")
    r.set_defaults(func=_reporting(cmd_run))
    c = ss.add_parser("check", help="validate the file and print each volume's next five runs")
    c.add_argument("config", metavar="CONFIG.toml", help="the schedule file (docs/SCHEDULE.md)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--offline", action="store_true",
                   help="do not ask the DR servers which retention applies")
    c.set_defaults(func=_reporting(cmd_check))
    s = ss.add_parser("status", help="per volume and target: last snapshot, RPO, state, next run, pending, errors")
    s.add_argument("config", metavar="CONFIG.toml", help="the schedule file (docs/SCHEDULE.md)")
    s.add_argument("--json", action="store_true", help="print a JSON list, one object per volume")
    s.set_defaults(func=_reporting(cmd_status))

