"""The `blockrep` command line (contract: DESIGN.md §4). Every failure is one line on stderr,
``blockrep: error: …``, and exit status 1 (2 for usage errors, as argparse does, and for `status
--max-rpo` when a target is behind). Every option has a help text: the man page is made from it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import psk, server
from .access import run_op
from .errors import BlockrepError, InvalidArgument
from .freeze import FreezeError, quiesced
from .units import format_size, parse_duration, parse_size
from .version import version
from .volume import Lock, Volume, create, disk_usage, journal_shares_filesystem, read_params, validate_snapshot_name


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other blockrep error
        self.exit(2, f"blockrep: error: {message}\n")


def _size_arg(what):
    def conv(text):
        try:
            return parse_size(text, what)
        except InvalidArgument as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def cmd_create(a) -> int:
    p = create(a.volume, a.size, backend=a.backend, granularity=a.granularity,
               compress=a.compress or "none", segment_size=a.segment_size, journal=a.journal,
               journal_size=a.journal_size or 0)
    if p.backend == "image" and journal_shares_filesystem(p, a.volume):
        print(f"blockrep: warning: the change log {p.journal} is on the same filesystem as the image "
              f"{Path(a.volume).resolve() / 'image.raw'}: writes then pay the image disk's latency; put --journal "
              "on another (faster) disk", file=sys.stderr)
    where = f", change log {p.journal}" if p.backend == "image" else ""
    print(f"created {a.volume}: {format_size(p.size)}, backend {p.backend}{where}, uuid {p.uuid}")
    return 0


def _info(vol: Path) -> dict:
    params = read_params(vol)
    pid = server.running_pid(vol)
    if not pid and Lock.held(vol):  # owned by some other process: what the files say
        info = {
            "path": str(vol), "uuid": params.uuid, "size": params.size,
            "backend": params.backend, "granularity": params.granularity,
            "compress": params.compress, "created": params.created,
            "format_version": params.format_version,
            "used_bytes": disk_usage(vol) + (disk_usage(params.journal) if params.backend == "image" else 0),
        }
        if params.backend == "image":
            info["journal"] = params.journal
    else:
        info = run_op(str(vol), "info")
    from .replication.drserver import read_role
    info.update(read_role(vol))  # primary, dr or promoted (docs/REPLICATION.md §9)
    info["served"] = bool(pid)
    if pid:
        info["server_pid"] = pid
        rt = server.runtime_info(vol)
        if rt:
            info["uri"] = rt.get("uri")
    return info


def cmd_info(a) -> int:
    info = _info(Path(a.volume).resolve())
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("volume", info["path"]), ("uuid", info["uuid"]),
        ("size", f"{format_size(info['size'])} ({info['size']} bytes)"),
        ("backend", info["backend"]), ("compress", info["compress"]),
        ("granularity", format_size(info["granularity"])), ("created", info["created"]),
        ("used on disk", format_size(info["used_bytes"])),
        ("role", {"primary": "primary", "dr": f"DR of {info['bound_to']} (live export read-only)",
                  "promoted": f"promoted from {info['promoted'] and info['promoted'].get('snapshot')} "
                              f"(former DR of {info['promoted'] and info['promoted'].get('from')})"}[info["role"]]),
    ]
    for s in info.get("snapshots", []):
        rows.append((f"snapshot {s['name']}", f"created {s['created']}, changed {format_size(s['changed_bytes'])}, "
                     f"pins {format_size(s['pinned_bytes'])}"))
    if "live_bytes" in info:
        rows += [("live data", format_size(info["live_bytes"])),
                 ("segments", str(info["segments"])),
                 ("log since checkpoint", format_size(info["log_since_checkpoint"])),
                 ("map memory", format_size(info["map_memory_bytes"]))]
    if "journal_pending_bytes" in info:
        rows += [("change log", f"{info['journal']}, {format_size(info['journal_pending_bytes'])} not yet in the "
                                f"image (waits above {format_size(info['journal_max_bytes'])})"),
                 ("mover", f"{format_size(info['mover_bytes_per_second'])}/s"
                           + (f", stopped: {info['image_error']} (restart the server)" if info["image_error"] else "")),
                 ("image current", "yes" if info["image_current"] else
                  f"no ({format_size(info['journal_pending_bytes'])} in the change log)")]
    if "live_bytes" in info:
        rec = info["recovery"]
        if rec["torn_bytes_dropped"] or rec["corrupt_records"] or rec["skipped_bytes"]:
            rows.append(("recovery", f"dropped torn tail {rec['torn_bytes_dropped']} bytes, "
                         f"corrupt records {rec['corrupt_records']}, skipped {rec['skipped_bytes']} bytes"))
    served = f"yes, pid {info['server_pid']}, {info.get('uri', '')}" if info["served"] else "no"
    rows.append(("served", served))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def cmd_check(a) -> int:
    """Read every stored block and list the extents whose checksums fail (exit 1 if any)."""
    vol = Path(a.volume).resolve()
    server.ensure_not_served(vol)
    with Volume.open(vol, readonly=True) as v:
        bad = v.scrub()
        rec = v.recovery
    if a.json:
        print(json.dumps({"damaged": [{"offset": o, "length": n} for o, n in bad],
                          "recovery": rec}, indent=2))
    else:
        for o, n in bad:
            print(f"{o} {n}")
        print(f"{len(bad)} damaged extent(s), {sum(n for _, n in bad)} bytes", file=sys.stderr)
    return 1 if bad else 0


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def cmd_snapshot_create(a) -> int:
    if a.name is not None:  # --name "" is a bad name, not "use the default"
        validate_snapshot_name(a.name)
    snap = None
    try:
        with quiesced(freeze=a.freeze, pre=a.pre, post=a.post):
            snap = run_op(a.volume, "snapshot_create", name=a.name)
    except FreezeError as e:
        if snap is None:
            raise
        # the snapshot exists (and is consistent): say so, and which one, but fail the command
        print(snap["name"])
        raise FreezeError(f"snapshot {snap['name']} was taken, but afterwards: {e}") from None
    print(snap["name"])
    return 0


def _targets_by_snapshot(vol: Path) -> dict[str, list[str]]:
    """snapshot uuid -> the (redacted) URIs of the replication targets whose newest replicated
    snapshot it is."""
    from .replication import state
    from .replication.uris import redact_uri
    out: dict[str, list[str]] = {}
    for uri, t in state.load(vol)["targets"].items():
        if t.get("snapshot_uuid"):
            out.setdefault(t["snapshot_uuid"], []).append(redact_uri(uri))
    return out


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    for r in [headers, *rows]:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip())


def cmd_snapshot_list(a) -> int:
    snaps = run_op(a.volume, "snapshot_list")
    try:
        held = _targets_by_snapshot(Path(a.volume).resolve())
    except BlockrepError as e:  # the listing is still true; only the TARGETS column is unknown
        print(f"blockrep: warning: targets not shown: {e}", file=sys.stderr)
        held = {}
    for s in snaps:
        s["targets"] = held.get(s.get("uuid") or "", [])
    if a.json:
        _print_json(snaps)
        return 0
    _table(["NAME", "CREATED", "CHANGED", "PINS", "TARGETS"],
           [[s["name"], s["created"], format_size(s["changed_bytes"]), format_size(s["pinned_bytes"]),
             ", ".join(s["targets"]) or "-"] for s in snaps])
    return 0


def cmd_snapshot_delete(a) -> int:
    validate_snapshot_name(a.name)  # before the volume is opened: a bad name changes nothing
    run_op(a.volume, "snapshot_delete", name=a.name, force=a.force)
    return 0


def _gfs_args(a, prefix: str = "keep") -> dict | None:
    """The --PREFIX-hourly … --PREFIX-monthly counts given (None if none); negative ones refused."""
    from .replication.gfs import PERIODS
    got = {p: getattr(a, f"{prefix}_{p}") for p in PERIODS}
    for p, n in got.items():
        if n is not None and n < 0:
            raise InvalidArgument(f"--{prefix.replace('_', '-')}-{p} must be 0 or more")
    return {p: n for p, n in got.items() if n is not None} or None


def _add_gfs_args(parser, prefix: str, what: str) -> None:
    from .replication.gfs import PERIODS
    for p, unit in zip(PERIODS, ("hour", "day", "ISO week", "month"), strict=True):
        parser.add_argument(f"--{prefix}-{p}", type=int, metavar="N",
                            help=f"{what} the newest snapshot of each of the N most recent {unit}s that have one "
                                 "(local time; GFS, as sanoid)")


def cmd_snapshot_prune(a) -> int:
    gfs = _gfs_args(a)
    if a.keep is None and gfs is None:
        raise InvalidArgument("say what to keep: --keep N and/or --keep-hourly/--keep-daily/--keep-weekly/"
                              "--keep-monthly N")
    if a.keep is not None and a.keep < 0:
        raise InvalidArgument("--keep must be 0 or more")
    args = {"keep": a.keep, "force": a.force} if gfs is None else {"keep": a.keep, "force": a.force, "gfs": gfs}
    res = run_op(a.volume, "snapshot_prune", **args)
    for name in res["deleted"]:
        print(f"deleted {name}")
    for name, why in res["kept"].items():
        print(f"blockrep: kept {name}: {why} (--force deletes it)", file=sys.stderr)
    return 0


def cmd_diff(a) -> int:
    validate_snapshot_name(getattr(a, "from"))
    validate_snapshot_name(a.to)
    extents = run_op(a.volume, "diff", from_name=getattr(a, "from"), to_name=a.to)
    if a.json:
        _print_json(extents)
    else:
        for e in extents:
            print(f"{e['offset']} {e['length']}")
    return 0


def cmd_replicate(a) -> int:
    from .replication.replicate import replicate
    for n in (a.keep_local, a.keep_remote):
        if n is not None and n < 1:
            raise InvalidArgument("--keep-local/--keep-remote must be at least 1 (the common base)")
    if a.snapshot:
        validate_snapshot_name(a.snapshot)
        if a.freeze or a.pre or a.post:
            raise InvalidArgument("--freeze/--pre/--post apply to the snapshot replicate takes: drop --snapshot")
    if (a.connections is not None and a.connections < 1) or a.in_flight < 1:
        raise InvalidArgument("--connections and --in-flight must be at least 1")
    if not 0 <= a.retries <= 100:
        raise InvalidArgument("--retries must be 0 to 100")
    try:
        res = replicate(a.volume, a.to, snapshot=a.snapshot, keep_local=a.keep_local, keep_remote=a.keep_remote,
                        rate=a.rate, full=a.full, force=a.force, wait=a.wait, freeze=a.freeze, pre=a.pre,
                        post=a.post, progress=sys.stderr.isatty() and not a.json,
                        connections=a.connections, in_flight=a.in_flight, retries=a.retries,
                        keep_remote_gfs=_gfs_args(a, "keep_remote"))
    except BlockrepError as e:
        if a.json:
            _print_json({**getattr(e, "details", {}), "target": a.to, "error": str(e)})
        raise
    if a.json:
        _print_json(res)
    elif res.get("already_replicated"):
        print(f"{res['snapshot']} is already replicated to {a.to}")
    else:
        how = {"seed": "seed (full copy)", "rebase": "rebase (digests compared)"}.get(
            res["mode"], f"incremental since {res.get('base')}")
        print(f"replicated {res['snapshot']} ({how}): {format_size(res['bytes_sent'])} sent, "
              f"{res['extents']} extents, {res['seconds']} s")
    return 0


def _print_backseed(res: dict, what: str) -> None:
    print(f"{what}: {format_size(res['bytes_sent'])} written ({res['mode']}, {res['extents']} extent(s)), "
          f"{res['seconds']} s; the previous live data is snapshot {res['safety_snapshot']} "
          f"(`blockrep snapshot rollback VOL {res['safety_snapshot']}` undoes this)")


def cmd_restore(a) -> int:
    from .replication.backseed import restore
    if a.snapshot:
        validate_snapshot_name(a.snapshot)
    res = restore(a.volume, a.source, a.snapshot, yes=a.yes, force=a.force, rate=a.rate,
                  progress=sys.stderr.isatty() and not a.json)
    if a.json:
        _print_json(res)
    else:
        _print_backseed(res, f"restored {a.volume} from {res['snapshot']}")
    return 0


def cmd_snapshot_rollback(a) -> int:
    from .replication.backseed import rollback
    validate_snapshot_name(a.name)
    res = rollback(a.volume, a.name, yes=a.yes, force=a.force, progress=sys.stderr.isatty() and not a.json)
    if a.json:
        _print_json(res)
    else:
        _print_backseed(res, f"rolled {a.volume} back to {a.name}")
    return 0


def cmd_promote(a) -> int:
    from .replication.roles import promote
    if a.snapshot:
        validate_snapshot_name(a.snapshot)
    res = promote(a.volume, a.snapshot, force=a.force, progress=sys.stderr.isatty() and not a.json)
    if a.json:
        _print_json(res)
    else:
        print(f"promoted {a.volume}: its live export is writable and equals {res['snapshot']} "
              f"({format_size(res['bytes_sent'])} written); transfers from its old primary "
              f"{res['former_primary']} are refused until `blockrep demote`; the head it had is snapshot "
              f"{res['safety_snapshot']}")
    return 0


def cmd_demote(a) -> int:
    from .replication.roles import demote
    res = demote(a.volume, a.primary, force=a.force)
    if a.json:
        _print_json(res)
    else:
        base = (f"common base {res['common_base']}" if res["common_base"]
                else "no common snapshot: the first transfer is a rebase")
        print(f"demoted {a.volume}: now a DR of {res['primary']} (volume {res['bound_to']}; {base}); its live "
              f"export is read-only; what it held is snapshot {res['safety_snapshot']}")
    return 0


def cmd_attach(a) -> int:
    from .attach import attach
    st = attach(a.uri, read_only=a.read_only, new_identity=a.new_identity, mount=a.mount)
    if a.json:
        _print_json(st)
        return 0
    print(st["device"])
    for c in st.get("identity", []):
        print(f"blockrep: {c['device']}: new {c['type']} identity {c['new']} (was {c['old']})", file=sys.stderr)
    if st.get("mountpoint"):
        print(f"blockrep: {st['mounted']} mounted on {st['mountpoint']}", file=sys.stderr)
    return 0


def cmd_detach(a) -> int:
    from .attach import detach
    st = detach(a.target)
    print(f"detached {st.get('device')} ({st.get('uri')})", file=sys.stderr)
    return 0


def cmd_send(a) -> int:
    from .replication.stream import send
    for n in (a.snapshot, getattr(a, "from")):
        if n is not None:
            validate_snapshot_name(n)
    if a.output is None and sys.stdout.isatty():
        raise InvalidArgument("send writes a binary stream: give -o FILE, or pipe it (| ssh dr blockrep receive …)")
    if a.output is None:
        res = send(a.volume, a.snapshot, getattr(a, "from"), resume=a.resume)
    else:
        with open(a.output, "wb") as f:
            res = send(a.volume, a.snapshot, getattr(a, "from"), out=f, resume=a.resume)
    print(f"sent {res['snapshot']}" + (f" since {res['base']}" if res["base"] else " (full)")
          + f": {format_size(res['data_bytes'])} of data in {format_size(res['stream_bytes'])} of stream, "
          f"{res['records']} records", file=sys.stderr)
    return 0


def cmd_receive(a) -> int:
    from .replication.stream import receive, resume_token
    if a.resume_token:
        print(resume_token(a.volume))
        return 0
    if a.input is None:
        if sys.stdin.isatty():
            raise InvalidArgument("receive reads a stream: give -i FILE, or pipe one in")
        res = receive(a.volume, force=a.force)
    else:
        with open(a.input, "rb") as f:
            res = receive(a.volume, f, force=a.force)
    print(f"received {res['snapshot']} ({res['records']} records)", file=sys.stderr)
    return 0


def cmd_verify(a) -> int:
    from .replication.verify import verify
    validate_snapshot_name(a.snapshot)
    res = verify(a.volume, a.snapshot, a.against, quick=a.quick)
    if a.json:
        _print_json(res)
    else:
        for e in res["differing"]:
            print(f"{e['offset']} {e['length']}")
    if res.get("error"):
        extra = f"; {len(res['differing'])} extent(s) differ" if res["differing"] else ""
        print(f"blockrep: error: {res['error']}{extra}", file=sys.stderr)
        return 1
    if not res["identical"]:
        print(f"blockrep: error: {a.snapshot} differs from {a.against} in {len(res['differing'])} extent(s)",
              file=sys.stderr)
        return 1
    if not a.json:
        print(f"{a.snapshot} is identical at {a.against} ({res['chunks_compared']} chunks of 1 MiB compared"
              f"{', last delta only' if a.quick else ''})")
    return 0


def cmd_status(a) -> int:
    from .replication.status import forget, status
    if a.forget:
        if not forget(a.volume, a.forget):
            raise InvalidArgument(f"{a.forget} is not a replication target of {a.volume}")
        print(f"forgot {a.forget}")
        return 0
    rows = status(a.volume)
    if a.json:
        _print_json(rows)
    elif not rows:
        print("no replication targets yet")
    elif rows[0]["volume_role"] in ("dr", "promoting"):
        print(f"{a.volume} is a DR now (role {rows[0]['volume_role']}): its targets are inactive until "
              "`blockrep promote` makes it a primary again")
    for r in rows if not a.json else []:
        rpo = f"{r['rpo_seconds']} s" if r["rpo_seconds"] is not None else "-"
        pend = format_size(r["pending_bytes"]) if r["pending_bytes"] is not None else "-"
        ok, bad = r["last_success"], r["last_failure"]
        line = (f"{r['target']}: {r['state']}, snapshot {r['snapshot'] or '-'}, RPO {rpo}, pending {pend}, "
                f"last success {ok['at'] if ok else 'never'}")
        if bad:
            line += f", last failure {bad['at']}: {bad.get('error')}"
        print(line)
    if a.max_rpo is not None:
        late = [r["target"] for r in rows if r["state"] != "inactive"
                and (r["rpo_seconds"] is None or r["rpo_seconds"] > a.max_rpo)]
        if late:
            print(f"blockrep: error: RPO above {a.max_rpo} s for {', '.join(late)}", file=sys.stderr)
            return 2  # apart from 1 (the command failed): monitoring tells "behind" from "broken"
    return 0


def cmd_serve(a) -> int:
    uri = server.serve(a.volume, socket_path=a.socket, listen=a.listen, tls_psk=a.tls_psk,
                       foreground=a.foreground, keep=a.keep, allow_remote_prune=a.allow_remote_prune,
                       keep_min_age=parse_duration(a.keep_min_age, "--keep-min-age"), gfs=_gfs_args(a))
    print(uri)  # daemon mode (contract): the URI clients use; --foreground never gets here (exec)
    return 0


def cmd_psk_create(a) -> int:
    path = psk.create(a.file, a.user)
    print(f"created {path} for user {a.user}: serve --tls-psk {path}; clients use "
          f"nbds://{a.user}@HOST:PORT/?tls-psk-file={path}")
    return 0


def cmd_stop(a) -> int:
    if not server.stop(a.volume, force=a.force):
        print(f"blockrep: {a.volume} was not being served", file=sys.stderr)
    return 0


SIZES = "K, M, G, T suffixes (powers of 1024)"


def _command(sub, name: str, func, help: str, json: bool = False,
             json_help: str = "print JSON instead of text") -> argparse.ArgumentParser:
    """A subcommand that takes VOL (and --json where it lists)."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("volume", metavar="VOL", help="the volume directory")
    if json:
        p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blockrep", description="Block volumes over NBD with snapshots and replication.")
    p.add_argument("--version", action="version", version=f"blockrep {version()}",
                   help="print the version (blockrep X.Y.Z) and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           help="one of the commands below; `blockrep COMMAND --help` for its options")

    c = _command(sub, "create", cmd_create, "create a volume")
    c.add_argument("--size", required=True, type=_size_arg("size"), metavar="SIZE",
                   help=f"volume size in bytes, {SIZES}, e.g. 100G; a multiple of 4 KiB, at most 16 TiB")
    c.add_argument("--backend", default="lsfs", choices=["lsfs", "image"],
                   help="storage engine: lsfs (log-structured, the default) or image (a flat raw image file "
                        "with a change log on another disk, --journal)")
    c.add_argument("--journal", metavar="DIR",
                   help="image backend: the change-log directory, ideally on another (faster) disk than VOL")
    c.add_argument("--journal-size", type=_size_arg("journal size"), metavar="SIZE",
                   help=f"image backend: head data the change log holds before writes wait for the mover, {SIZES} "
                        "(default 1G)")
    c.add_argument("--granularity", default=4096, type=_size_arg("granularity"), metavar="SIZE",
                   help=f"unit of change tracking (diff, replication deltas) in bytes, {SIZES}; a power of "
                        "two from 4K to 1G (default 4K)")
    c.add_argument("--compress", choices=["zstd", "none"], help="compress stored data with zstd (default none)")
    c.add_argument("--segment-size", default=32 << 20, type=_size_arg("segment size"), metavar="SIZE",
                   help=f"log segment size in bytes, {SIZES} (default 32M)")
    _command(sub, "info", cmd_info, "show a volume: size, disk use, snapshots, recovery report", json=True)

    _command(sub, "check", cmd_check, "verify every stored block's checksum, list damaged extents",
             json=True)

    s = _command(sub, "serve", cmd_serve, "serve a volume over NBD (prints the URI it serves)")
    s.add_argument("--socket", metavar="PATH", help="Unix socket path (default VOL/nbd.sock)")
    s.add_argument("--listen", metavar="HOST:PORT", help="listen on TCP instead of a Unix socket")
    s.add_argument("--tls-psk", metavar="FILE",
                   help="require TLS with this PSK file (USER:HEXKEY lines; `blockrep psk create` makes one)")
    s.add_argument("--foreground", action="store_true",
                   help="do not daemonise: run nbdkit in the foreground (systemd, containers)")
    s.add_argument("--keep", type=int, metavar="N",
                   help="as a DR: keep the newest N replicated snapshots (the DR's own retention)")
    s.add_argument("--keep-min-age", metavar="DURATION", default="1d",
                   help="as a DR: never prune a snapshot younger than this (s, m, h, d, w suffixes; a bare "
                        "number is seconds; default 1d), however many arrive; --keep N then keeps the newest N "
                        "older ones too")
    _add_gfs_args(s, "keep", "as a DR: also keep")
    s.add_argument("--allow-remote-prune", action="store_true",
                   help="as a DR: honour a primary's --keep-remote/--keep-remote-daily … requests, which only add "
                        "to what this DR's own --keep… rules keep; off by default")

    sn = sub.add_parser("snapshot", help="create, list, delete and prune snapshots",
                        description="create, list, delete and prune snapshots")
    ssub = sn.add_subparsers(dest="snapshot_command", required=True, parser_class=_Parser, metavar="COMMAND",
                             help="what to do with snapshots")
    c2 = _command(ssub, "create", cmd_snapshot_create, "take a snapshot (prints its name)")
    c2.add_argument("--name", help="[A-Za-z0-9._-]{1,64}; default: a UTC timestamp")
    c2.add_argument("--freeze", metavar="MOUNTPOINT", action="append",
                    help="fsfreeze -f/-u this filesystem around the snapshot (repeatable)")
    c2.add_argument("--pre", metavar="CMD", action="append", help="command run before; failure refuses the snapshot")
    c2.add_argument("--post", metavar="CMD", action="append", help="command run after, always")
    _command(ssub, "list", cmd_snapshot_list, "list snapshots, oldest first, and what each target holds",
             json=True, json_help="print a JSON list (name, uuid, created, changed_bytes, pinned_bytes, targets)")
    d2 = _command(ssub, "delete", cmd_snapshot_delete, "delete a snapshot")
    d2.add_argument("name", metavar="NAME", help="the snapshot to delete")
    d2.add_argument("--force", action="store_true", help="also a snapshot replication still needs")
    p2 = _command(ssub, "prune", cmd_snapshot_prune, "delete all but the newest N snapshots")
    p2.add_argument("--keep", type=int, metavar="N", help="how many of the newest snapshots to keep")
    _add_gfs_args(p2, "keep", "also keep")
    p2.add_argument("--force", action="store_true", help="also snapshots replication still needs")
    rb = _command(ssub, "rollback", cmd_snapshot_rollback,
                  "make the live volume snapshot NAME again (a safety snapshot of it is taken first)", json=True)
    rb.add_argument("name", metavar="NAME", help="the snapshot the live volume becomes")
    rb.add_argument("--yes", action="store_true", help="do not ask (required without a terminal)")
    rb.add_argument("--force", action="store_true",
                    help="even while other clients have the live export open (they see the data change)")

    df = _command(sub, "diff", cmd_diff, "changed extents between two snapshots", json=True)
    df.add_argument("from", metavar="FROM", help="the older snapshot")
    df.add_argument("to", metavar="TO", help="the newer snapshot")

    rp = _command(sub, "replicate", cmd_replicate, "ship a snapshot's changes to a DR NBD export", json=True,
                  json_help="print a JSON object (snapshot, base, mode, bytes_sent, extents, seconds; "
                            "error on failure)")
    rp.add_argument("--to", required=True, metavar="URI", help="nbd://, nbds://, nbd+unix:// (libnbd URIs)")
    rp.add_argument("--snapshot", metavar="NAME", help="snapshot to ship (default: take one now)")
    rp.add_argument("--keep-local", type=int, metavar="N",
                    help="afterwards keep the newest N snapshots replicate took here (what replication needs stays)")
    rp.add_argument("--keep-remote", type=int, metavar="N",
                    help="ask the DR to keep its newest N (honoured only with its --allow-remote-prune)")
    _add_gfs_args(rp, "keep-remote", "ask the DR to also keep")
    rp.add_argument("--rate", type=_size_arg("rate"), metavar="BYTES/s",
                    help=f"at most this many bytes per second, {SIZES}, e.g. 10M (default: unlimited)")
    rp.add_argument("--full", action="store_true", help="send everything, not only the delta")
    rp.add_argument("--force", action="store_true",
                    help="overwrite the head of a DR bound to another volume or holding data of its own")
    rp.add_argument("--wait", action="store_true", help="wait for a run to the same target to finish")
    rp.add_argument("--freeze", metavar="MOUNTPOINT", action="append", help="fsfreeze around the snapshot")
    rp.add_argument("--pre", metavar="CMD", action="append", help="run before the snapshot; failure refuses it")
    rp.add_argument("--post", metavar="CMD", action="append", help="run after the snapshot, always")
    rp.add_argument("--connections", type=int, metavar="N",
                    help="connections to the target (default: 4 on a Unix socket, 1 over TCP, measured best "
                         "on a 100 Mbit/s link; one without multi-conn always gets 1)")
    rp.add_argument("--in-flight", type=int, default=64, metavar="N",
                    help="requests in flight per connection (default 64)")
    rp.add_argument("--retries", type=int, default=6, metavar="N",
                    help="retry a transient failure N times, after 1, 2, 4 … 30 s (default 6: about a minute)")

    rs = _command(sub, "restore", cmd_restore,
                  "back seed: rebuild the live volume from a DR snapshot, writing only what differs", json=True)
    rs.add_argument("--from", dest="source", required=True, metavar="URI",
                    help="the blockrep DR server (nbd://, nbds://, nbd+unix:// URI of its live export)")
    rs.add_argument("--snapshot", metavar="NAME", help="the DR snapshot to restore (default: its newest)")
    rs.add_argument("--yes", action="store_true", help="do not ask (required without a terminal)")
    rs.add_argument("--force", action="store_true",
                    help="even with other clients connected, or from a DR snapshot of another volume")
    rs.add_argument("--rate", type=_size_arg("rate"), metavar="BYTES/s",
                    help="cap in bytes per second, K/M/G suffixes (powers of 1024), e.g. 10M")

    pm = _command(sub, "promote", cmd_promote,
                  "failover: a DR volume's live export becomes writable, equal to one of its snapshots; "
                  "its old primary's transfers are refused from then on", json=True)
    pm.add_argument("--snapshot", metavar="NAME",
                    help="the snapshot the live volume becomes (default: the newest replicated one)")
    pm.add_argument("--force", action="store_true",
                    help="even while clients have the live export open or a transfer is under way (it is stopped)")
    dm = _command(sub, "demote", cmd_demote,
                  "failback: this volume becomes a DR of another blockrep server (e.g. the promoted DR); "
                  "its live export turns read-only, after a safety snapshot", json=True)
    dm.add_argument("--primary", required=True, metavar="URI",
                    help="the blockrep server whose transfers this volume takes from now on")
    dm.add_argument("--force", action="store_true",
                    help="bind to a server that shares no snapshot with this volume, or rebind from another "
                         "primary; with read-only clients connected")

    at = sub.add_parser("attach", help="an NBD export as a block device here (prints it), mounted if asked")
    at.add_argument("uri", metavar="URI", help="nbd://, nbds://…?tls-psk-file=F, nbd+unix:///EXPORT?socket=PATH "
                    "(a DR snapshot: its @NAME export)")
    mode = at.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true", help="refuse every write (and mount read-only)")
    mode.add_argument("--new-identity", action="store_true",
                      help="a throw-away copy-on-write overlay with new filesystem, partition-table and LVM "
                           "identifiers, to mount beside the original; the export is never written")
    at.add_argument("--mount", metavar="DIR", help="also mount the (first) filesystem on DIR")
    at.add_argument("--json", action="store_true", help="print the attachment as JSON")
    at.set_defaults(func=cmd_attach)
    dt = sub.add_parser("detach", help="undo an attach: unmount, remove the device, end its server")
    dt.add_argument("target", metavar="DEV|DIR", help="the device attach printed, or the mountpoint")
    dt.set_defaults(func=cmd_detach)

    se = _command(sub, "send", cmd_send, "write a snapshot (or the changes between two) as a stream (docs/STREAM.md)")
    se.add_argument("snapshot", metavar="B", help="the snapshot to send")
    se.add_argument("--from", metavar="A", help="send only the changes since snapshot A (an increment)")
    se.add_argument("-o", "--output", metavar="FILE", help="write the stream to FILE (default: standard output)")
    se.add_argument("--resume", metavar="TOKEN", help="continue the stream an interrupted receive stopped in "
                    "(the token its error line printed)")
    rv = _command(sub, "receive", cmd_receive, "apply a stream; its snapshot is created once all of it verified")
    rv.add_argument("-i", "--input", metavar="FILE", help="read the stream from FILE (default: standard input)")
    rv.add_argument("--resume-token", action="store_true",
                    help="print the token of a receive that stopped in VOL (killed, or failed) and exit")
    rv.add_argument("--force", action="store_true",
                    help="into a volume with data of its own, or changed since the stream's base")

    vf = _command(sub, "verify", cmd_verify, "prove a DR snapshot equals the local one (checksums)", json=True)
    vf.add_argument("snapshot", metavar="SNAP", help="the local snapshot to compare")
    vf.add_argument("--against", required=True, metavar="URI",
                    help="the DR server, its @SNAP export, or any NBD export")
    vf.add_argument("--quick", action="store_true", help="only the chunks of the last delta")

    st = _command(sub, "status", cmd_status, "replication targets: newest replicated snapshot, RPO, pending bytes",
                  json=True)
    st.add_argument("--forget", metavar="URI", help="drop a target's records")
    st.add_argument("--max-rpo", type=int, metavar="SECONDS",
                    help="exit 2 if a target's RPO is above this many seconds or unknown (for monitoring)")

    sp = _command(sub, "stop", cmd_stop, "stop serving a volume")
    sp.add_argument("--force", action="store_true",
                    help="stop even when the server cannot make its data durable (full or failing disk): "
                         "writes since the last flush are lost")

    ps = sub.add_parser("psk", help="make TLS pre-shared key files", description="make TLS pre-shared key files")
    pssub = ps.add_subparsers(dest="psk_command", required=True, parser_class=_Parser, metavar="COMMAND",
                              help="what to do")
    pc = pssub.add_parser("create", help="write a new PSK file (mode 0600; never replaces one)",
                          description="write a new PSK file USER:HEXKEY (32 random bytes), mode 0600, in the "
                                      "format nbdkit --tls-psk and libnbd tls-psk-file= read")
    pc.add_argument("file", metavar="FILE", help="the file to create (must not exist)")
    pc.add_argument("user", metavar="USER", help="the PSK user name, [A-Za-z0-9._-]{1,64} (nbds://USER@host/)")
    pc.set_defaults(func=cmd_psk_create)

    from .schedule.cli import add_parser as _add_schedule
    _add_schedule(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BlockrepError as e:
        print(f"blockrep: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blockrep: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `blockrep snapshot list VOL | head`
        sys.stderr.close()
        return 141
    except OSError as e:  # a file we may not read or write (not root, a read-only mount): one line
        where = f": {e.filename}" if e.filename else ""
        print(f"blockrep: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
