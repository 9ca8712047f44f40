"""`blockrep replicate`, `verify` and `status`: ship a snapshot's changed extents to a DR site.

Notes on the design:
- The source is always the primary's own server: the snapshot is read from its `@NAME` export
  and the changed extents come from its control socket (`diff`). An unserved volume is served on
  a private socket for the duration, so there is one code path.
- Targets: a blockrep DR server (recognised by its export description) or any NBD server. The
  common base with a blockrep DR is the newest local snapshot that the DR also exports; with any
  other server it is the snapshot this primary last shipped there completely (VOL/replication.json).
  No base, or --full: every extent ever written is sent (the seed), holes are skipped.
- Commit: after the delta is written and flushed, a blockrep DR creates its snapshot of the same
  name (engine/dr.py, `!commit@NAME`). So a DR snapshot exists only for a whole delta.
- Resume: the confirmed prefix of the transfer plan is saved in VOL/replication.json while it runs;
  a later run for the same snapshot and base continues after it.
- Faults: transient transfer errors are retried with exponential backoff (1, 2, 4 … 30 s).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

from . import dr, server
from .access import run_op
from .errors import BlockrepError, InvalidArgument, NotFound
from .transfer import TransferError, connect, copy_extents
from .units import format_size
from .volume import read_params

STATE = "replication.json"


# ---------- state ----------

def load_state(vol: Path) -> dict:
    try:
        return json.loads((vol / STATE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def save_state(vol: Path, state: dict) -> None:
    tmp = vol / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, vol / STATE)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------- the source: the primary's own server ----------

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


# ---------- the target ----------

def probe(uri: str) -> dict:
    """Size, whether it is a blockrep volume, and its snapshot exports."""
    try:
        h = connect(uri)
    except TransferError as e:
        raise TransferError(f"target unreachable: {e}", transient=False) from None
    try:
        info = {"size": h.get_size(), "description": "", "read_only": h.is_read_only()}
        with contextlib.suppress(nbd.Error):
            info["description"] = h.get_export_description() or ""
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
    info["blockrep"] = info["description"].startswith("blockrep volume")
    info["snapshots"] = list_exports(uri) if info["blockrep"] else []
    return info


def list_exports(uri: str) -> list[str]:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    names: list[str] = []
    try:
        h.connect_uri(uri)
        def add(name, desc):
            names.append(name)
            return 0
        h.opt_list(add)
        h.opt_abort()
    except nbd.Error as e:
        raise TransferError(f"cannot list the exports of {uri}: {e.string}") from None
    return [n[1:] for n in names if n.startswith("@")]


def dr_command(uri: str, verb: str, snapshot: str) -> None:
    h = connect(uri, f"!{verb}@{snapshot}")
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def _read_export(uri: str, export: str, ranges: list[tuple[int, int]] | None = None) -> bytes:
    """The bytes of a (small) DR command export, whole or the given (offset, length) ranges."""
    h = connect(uri, export)
    try:
        if ranges is None:
            size = h.get_size()
            return h.pread(size, 0) if size else b""
        return b"".join(h.pread(n, o) for o, n in ranges)
    except nbd.Error as e:
        raise TransferError(f"reading {export!r} from {uri}: {e.string}") from None
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def dr_changes(uri: str, base: str) -> list[tuple[int, int]]:
    """Extents the DR head changed since its snapshot `base` (writes made at the DR site)."""
    data = _read_export(uri, f"!changes@{base}")
    return [struct.unpack_from("<QQ", data, i) for i in range(0, len(data), 16)]


def merge_extents(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in sorted(e for lst in lists for e in lst):
        if out and o <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], o + n)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((o, n))
    return out


DELTA_CHUNK = 1 << dr.DELTA_SHIFT


def chunks_of(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Runs of DELTA_CHUNK-aligned chunks (first index, count) that the extents touch."""
    idx = sorted({i for o, n in extents for i in range(o // DELTA_CHUNK, (o + n - 1) // DELTA_CHUNK + 1)})
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class LocalSums(threading.Thread):
    """The primary's digests of the chunks a delta touches, computed while the delta is shipped."""

    def __init__(self, src: str, snapshot: str, extents: list[tuple[int, int]], size: int):
        super().__init__(daemon=True)
        self.src, self.snapshot, self.extents, self.size = src, snapshot, extents, size
        self.result: bytes | BaseException = b""
        self.start()

    def run(self) -> None:
        try:
            ranges = [(i * dr.SUM_BYTES, n * dr.SUM_BYTES) for i, n in chunks_of(self.extents, self.size)]
            self.result = _read_export(self.src, f"!sums:{dr.DELTA_SHIFT}@{self.snapshot}", ranges)
        except BaseException as e:  # re-raised by get()
            self.result = e

    def get(self) -> bytes:
        self.join()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def mismatched_chunks(src: str, snapshot: str, to: str, extents: list[tuple[int, int]],
                      size: int, mine: bytes | None = None) -> list[tuple[int, int]]:
    """Compare the digests of every chunk the delta touched: the primary's snapshot against the
    DR head (only digests cross the network). Returns the differing chunks as extents."""
    runs = chunks_of(extents, size)
    ranges = [(i * dr.SUM_BYTES, n * dr.SUM_BYTES) for i, n in runs]
    if mine is None:
        mine = _read_export(src, f"!sums:{dr.DELTA_SHIFT}@{snapshot}", ranges)
    theirs = _read_export(to, f"!sums:{dr.DELTA_SHIFT}@", ranges)
    bad: list[tuple[int, int]] = []
    pos = 0
    for i, n in runs:
        for k in range(n):
            a = mine[pos:pos + dr.SUM_BYTES]
            if a != theirs[pos:pos + dr.SUM_BYTES]:
                off = (i + k) * DELTA_CHUNK
                bad.append((off, min(DELTA_CHUNK, size - off)))
            pos += dr.SUM_BYTES
    return bad


# ---------- replicate ----------

class Progress:
    """Bytes done / total, rate and ETA on a terminal (stderr), nothing otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.monotonic()

    def __call__(self, stats, _confirmed) -> None:
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = stats.bytes_done / dt
        eta = (self.total - stats.bytes_done) / rate if rate else 0
        print(f"\r{format_size(stats.bytes_done)} / {format_size(self.total)}  {format_size(rate)}/s  "
              f"ETA {eta:.0f}s   ", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def replicate(volume: str, to: str, snapshot: str | None = None, keep_local: int | None = None,
              keep_remote: int | None = None, rate: float | None = None, full: bool = False,
              retries: int = 6, progress: bool = False) -> dict:
    vol = Path(volume).resolve()
    params = read_params(vol)
    target = probe(to)
    if target["read_only"]:
        raise InvalidArgument(f"target {to} is read-only")
    if target["size"] < params.size:
        raise InvalidArgument(f"target {to} is smaller ({target['size']} bytes) than the volume ({params.size})")
    with source_server(vol) as src:
        if snapshot is None:
            snapshot = run_op(vol, "snapshot_create")["name"]
        names = [s["name"] for s in run_op(vol, "snapshot_list")]
        if snapshot not in names:
            raise NotFound(f"no snapshot named {snapshot!r} in {vol}")
        older = names[: names.index(snapshot)]
        state = load_state(vol)
        tstate = state.setdefault(to, {})
        base = None
        if not full:
            if target["blockrep"]:
                if snapshot in target["snapshots"]:
                    return {"snapshot": snapshot, "base": None, "bytes_sent": 0, "extents": 0, "seconds": 0,
                            "already_replicated": True}
                common = [n for n in older if n in target["snapshots"]]
                base = common[-1] if common else None
            elif tstate.get("snapshot") in older:
                base = tstate["snapshot"]
        if base is None:
            # the seed: the whole volume, so the target ends up equal even where it held old data;
            # holes go as write-zeroes commands (block status of the snapshot), data as writes
            extents = [(0, params.size)]
        else:
            extents = [(e["offset"], e["length"]) for e in run_op(vol, "diff", from_name=base, to_name=snapshot)]
        dr_dirty: list[tuple[int, int]] = []
        if base is not None and target["blockrep"]:
            # writes made at the DR site since the base: the delta must put those blocks back too
            dr_dirty = dr_changes(to, base)
            extents = merge_extents(extents, dr_dirty)
        total = sum(n for _, n in extents)
        resume = 0
        prog = tstate.get("in_progress") or {}
        if prog.get("snapshot") == snapshot and prog.get("base") == base:
            resume = int(prog.get("done_upto", 0))
            suppress = bool(prog.get("suppress"))
        else:
            # Rewrite suppression skips blocks equal to the base: safe only while the target's
            # head is known to hold exactly the base (an interrupted transfer of another snapshot
            # may have left newer data there, which a skipped block would keep).
            suppress = base is not None and tstate.get("head") == base and not dr_dirty
        tstate["head"] = None  # from here until success the target head is in between
        tstate["in_progress"] = {"snapshot": snapshot, "base": base, "done_upto": resume, "suppress": suppress}
        save_state(vol, state)

        def save_progress(stats, confirmed):
            tstate["in_progress"] = {"snapshot": snapshot, "base": base, "done_upto": confirmed,
                                     "suppress": suppress}
            save_state(vol, state)
            show(stats, confirmed)

        show = Progress(total, progress)
        t0 = time.monotonic()
        local_sums = LocalSums(src, snapshot, extents, params.size) if target["blockrep"] else None
        attempt, sent = 0, {"bytes_sent": 0, "bytes_zeroed": 0, "bytes_skipped": 0, "extents": 0}
        while True:
            try:
                st = copy_extents(src, "@" + snapshot, to, None, extents,
                                  base_export=f"@{base}" if suppress and base else None, rate=rate,
                                  resume_from=resume, on_progress=save_progress)
                for k in sent:
                    sent[k] += st.as_dict()[k]
                break
            except TransferError as e:
                tstate["last_error"] = str(e)
                save_state(vol, state)
                attempt += 1
                if not e.transient or attempt > retries:
                    show.done()
                    raise TransferError(f"replication of {snapshot} to {to} failed after {attempt} attempt(s): {e}",
                                        transient=e.transient) from None
                time.sleep(min(30, 2 ** (attempt - 1)))
                resume = int((tstate.get("in_progress") or {}).get("done_upto", resume))
        show.done()
        if target["blockrep"]:
            # Checksummed delta: the DR snapshot is committed only once the DR head's digest of
            # every chunk the delta touched equals the primary's. A mismatch (bytes damaged on the
            # way, a write at the DR meanwhile) is sent again once, then the run fails uncommitted.
            mine = local_sums.get() if local_sums else None
            for attempt_no in range(2):
                bad = mismatched_chunks(src, snapshot, to, extents, params.size, mine)
                if not bad:
                    break
                tstate["last_error"] = f"{len(bad)} chunk(s) differ at the DR after the transfer"
                save_state(vol, state)
                if attempt_no == 1:
                    raise TransferError(f"replication of {snapshot} to {to}: the DR copy of {len(bad)} chunk(s) "
                                        "still differs after sending them again; DR snapshot not committed",
                                        transient=False)
                st = copy_extents(src, "@" + snapshot, to, None, bad, rate=rate)
                sent["bytes_sent"] += st.bytes_sent
            dr_command(to, "commit", snapshot)
        seconds = time.monotonic() - t0
        tstate.update({"snapshot": snapshot, "head": snapshot, "replicated_at": _now(),
                       "bytes_sent": sent["bytes_sent"],
                       "rate": round(sent["bytes_sent"] / seconds) if seconds else 0, "last_error": None,
                       "blockrep": target["blockrep"]})
        tstate.pop("in_progress", None)
        save_state(vol, state)
        result = {"snapshot": snapshot, "base": base, "full": base is None, "delta_bytes": total,
                  **sent, "seconds": round(seconds, 3), "target": to, "target_is_blockrep": target["blockrep"]}
        if keep_local is not None:
            # never prune the snapshot just shipped: it is the next run's common base
            result["pruned_local"] = run_op(vol, "snapshot_prune", keep=max(keep_local, 1))
        if keep_remote is not None and target["blockrep"]:
            remote = list_exports(to)  # oldest first
            doomed = remote[: max(0, len(remote) - max(keep_remote, 1))]
            for n in doomed:
                dr_command(to, "delete", n)
            result["pruned_remote"] = doomed
        return result


# ---------- verify ----------

def _local_sums(src_uri: str, snapshot: str) -> bytes:
    h = connect(src_uri, f"!sums@{snapshot}")
    try:
        return h.pread(h.get_size(), 0) if h.get_size() else b""
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def _remote_sums(uri: str, size: int) -> bytes:
    """Digests of the export the URI names: from a blockrep server's checksum export (only
    checksums cross the network), else by reading and hashing the data here."""
    h = connect(uri)
    try:
        desc = ""
        with contextlib.suppress(nbd.Error):
            desc = h.get_export_description() or ""
        name = h.get_export_name()
        if desc.startswith("blockrep volume") and name.startswith("@"):
            s = connect(uri, f"!sums{name}")
            try:
                return s.pread(s.get_size(), 0)
            finally:
                with contextlib.suppress(nbd.Error):
                    s.shutdown()
        out = bytearray()
        for o in range(0, size, dr.SUM_CHUNK):
            n = min(dr.SUM_CHUNK, size - o, max(0, h.get_size() - o))
            out += dr.chunk_sum(h.pread(n, o) if n else b"") if n == min(dr.SUM_CHUNK, size - o) else b"\0" * 16
        return bytes(out)
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def verify(volume: str, snapshot: str, against: str) -> list[dict]:
    """Differing extents (by SUM_CHUNK) between local snapshot and the export `against`."""
    vol = Path(volume).resolve()
    params = read_params(vol)
    with source_server(vol) as src:
        names = [s["name"] for s in run_op(vol, "snapshot_list")]
        if snapshot not in names:
            raise NotFound(f"no snapshot named {snapshot!r} in {vol}")
        local = _local_sums(src, snapshot)
    try:
        remote = _remote_sums(against, params.size)
    except TransferError as e:
        raise TransferError(f"cannot read {against}: {e}", transient=False) from None
    bad: list[dict] = []
    for i in range(0, len(local), dr.SUM_BYTES):
        if local[i:i + dr.SUM_BYTES] != remote[i:i + dr.SUM_BYTES]:
            off = i // dr.SUM_BYTES * dr.SUM_CHUNK
            n = min(dr.SUM_CHUNK, params.size - off)
            if bad and bad[-1]["offset"] + bad[-1]["length"] == off:
                bad[-1]["length"] += n
            else:
                bad.append({"offset": off, "length": n})
    return bad


# ---------- status ----------

def status(volume: str) -> list[dict]:
    vol = Path(volume).resolve()
    read_params(vol)
    state = load_state(vol)
    snaps = {s["name"]: s for s in run_op(vol, "snapshot_list")} if state else {}
    out = []
    for target, t in state.items():
        row = {"target": target, "snapshot": t.get("snapshot"), "replicated_at": t.get("replicated_at"),
               "last_rate": t.get("rate"), "last_error": t.get("last_error"), "rpo_seconds": None,
               "pending_bytes": None, "in_progress": t.get("in_progress")}
        s = snaps.get(t.get("snapshot") or "")
        if s:
            created = _dt.datetime.fromisoformat(s["created"].replace("Z", "+00:00"))
            row["rpo_seconds"] = round((_dt.datetime.now(_dt.UTC) - created).total_seconds())
            row["pending_bytes"] = run_op(vol, "pending", since=s["name"])
        out.append(row)
    return out


__all__ = ["replicate", "verify", "status", "BlockrepError"]
