"""`blockrep verify`: prove a DR copy equals a local snapshot, block for block, by digests (DESIGN M9).

Against a blockrep server only digests cross the network (its `!sums` export); the DR snapshot
must also carry the local snapshot's uuid (a copy of something else is not "identical", even
when the bytes happen to match). Against any other NBD server the data is read here in bounded
requests, holes skipped by block status. `quick` compares only the chunks of the last delta
(the extents changed since the previous snapshot).
"""

from __future__ import annotations

from pathlib import Path

from ..access import run_op
from ..errors import InvalidArgument, NotFound
from ..volume import read_params, validate_snapshot_name
from . import checksums as C
from . import drclient
from . import protocol as P
from .nbdio import TransferError
from .replicate import source_server


def _server_uri(uri: str) -> str:
    """The URI of the same server's live export (a blockrep server's @NAME URI names a snapshot)."""
    head, q, query = uri.partition("?")
    scheme, _, rest = head.partition("://")
    host, _, _export = rest.partition("/")
    return f"{scheme}://{host}/" + (q + query if q else "")


def verify(volume: str, snapshot: str, against: str, quick: bool = False) -> dict:
    vol = Path(volume).resolve()
    params = read_params(vol)
    validate_snapshot_name(snapshot)
    size = params.size
    snaps = run_op(vol, "snapshot_list")
    snap = next((s for s in snaps if s["name"] == snapshot), None)
    if snap is None:
        raise NotFound(f"no snapshot named {snapshot!r} in {vol}")
    runs = None
    if quick:
        i = snaps.index(snap)
        prev = snaps[i - 1]["name"] if i else None
        delta = [(e["offset"], e["length"]) for e in run_op(vol, "diff", from_name=prev, to_name=snapshot)]
        runs = C.runs_of(C.chunks_of(delta, P.FULL_SHIFT))
    try:
        info, is_br = drclient.is_blockrep(against)
    except TransferError as e:
        raise TransferError(f"cannot read {against}: {e}", transient=False) from None
    remote_name = error = None
    if is_br:
        export = info["export"]
        if export not in ("",) and not export.startswith("@"):
            raise InvalidArgument(f"{against} names {export!r}: give the DR server or its @SNAPSHOT export")
        remote_name = export[1:] if export.startswith("@") else snapshot
        server_uri = _server_uri(against)
        dr = drclient.hello(server_uri)
        theirs_snap = next((s for s in dr["snapshots"] if s["name"] == remote_name), None)
        if theirs_snap is None:
            raise NotFound(f"the DR {server_uri} has no snapshot named {remote_name}")
        if theirs_snap["uuid"] != snap["uuid"]:  # still compared: name what differs
            error = (f"the DR snapshot {remote_name} is not a copy of {snapshot} "
                     f"(uuid {theirs_snap['uuid']}, here {snap['uuid']})")
        theirs = C.blockrep_sums(server_uri, remote_name, P.FULL_SHIFT, runs, size)
    elif info["size"] < size:
        return {"snapshot": snapshot, "against": against, "identical": False, "differing": [(0, size)],
                "error": f"{against} is smaller ({info['size']} bytes) than the volume"}
    else:
        theirs = C.nbd_sums(against, P.FULL_SHIFT, size, runs)
    with source_server(vol) as src:
        mine = C.blockrep_sums(src, snapshot, P.FULL_SHIFT, runs, size)
    pos = C.differing(mine, theirs)
    all_runs = runs if runs is not None else [(0, P.nchunks(size, P.FULL_SHIFT))]
    bad = C.coalesce(C.positions_to_chunks(all_runs, pos), P.FULL_SHIFT, size)
    compared = sum(c for _, c in runs) if runs is not None else P.nchunks(size, P.FULL_SHIFT)
    res = {"snapshot": snapshot, "uuid": snap["uuid"], "against": against, "identical": not bad and not error,
           "differing": [{"offset": o, "length": n} for o, n in bad], "chunks_compared": compared,
           "quick": quick}
    if error:
        res["error"] = error
    return res
