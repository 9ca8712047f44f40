"""`blockrep send` / `blockrep receive`: a snapshot (or the changes between two) as a
self-describing, checksummed, zstd-compressed stream, resumable after an interrupted receive.
Format and checks: docs/STREAM.md.

Both sides go through a server of their volume (its own, or a private one, as replicate does):
send reads the snapshot export `@B` (block status finds the holes, sent as ZERO records);
receive writes the live export through `!restore?token=T` while it holds the head (backseed.py),
so no client sees a half-received volume, and creates B (with B's uuid) only after END verified.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import nbd
import zstandard

from .. import control
from ..access import run_op
from ..errors import AlreadyExists, BlockrepError, CorruptionError, InvalidArgument, NotFound
from ..volume import read_params
from . import protocol as P
from .backseed import exclusive_head
from .copy import CHUNK, plan_chunks
from .drserver import read_role
from .nbdio import connection
from .replicate import source_server
from .state import parse_time

MAGIC = b"BLOCKREP-STREAM\0"
VERSION = 1
DATA, ZERO, END = 1, 2, 9
REC = struct.Struct("<BBHIQQ")  # type, 0, 0, payload length, offset, length
DIG = 16
MAX_HEADER = 1 << 16
PROGRESS = "receive.json"
SAVE_EVERY = 64 << 20  # plan bytes between flush + receive.json updates


class StreamError(CorruptionError):
    """The stream is damaged, truncated or does not belong here: nothing was committed."""


def _dig(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIG).digest()


def plan_digest(extents: list[tuple[int, int]]) -> str:
    return hashlib.sha256(json.dumps([list(e) for e in extents]).encode()).hexdigest()


# ---------------------------------------------------------------- tokens

def make_token(rec: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(rec, separators=(",", ":")).encode()).decode().rstrip("=")


def read_token(token: str) -> dict:
    try:
        rec = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(rec, dict) and isinstance(rec.get("target"), str) and isinstance(rec.get("upto"), int)
                and isinstance(rec.get("plan"), str) and rec["upto"] >= 0):
            raise ValueError
        return rec
    except (ValueError, binascii.Error):
        raise InvalidArgument("not a resume token of `blockrep receive`") from None


# ---------------------------------------------------------------- send

def _find(snaps: list[dict], *, name: str | None = None, uuid: str | None = None) -> dict:
    for s in snaps:
        if (name is not None and s["name"] == name) or (uuid is not None and s["uuid"] == uuid):
            return s
    raise NotFound(f"no snapshot {'named ' + repr(name) if name else 'with uuid ' + str(uuid)} here")


def send(volume: str, to_name: str | None, from_name: str | None = None, out: BinaryIO | None = None,
         resume: str | None = None, level: int = 3) -> dict:
    """Write the stream of snapshot to_name (since from_name) to out; returns counts."""
    vol = Path(volume).resolve()
    params = read_params(vol)
    snaps = run_op(vol, "snapshot_list")
    start = 0
    tok: dict = {}
    if resume is not None:
        tok = read_token(resume)
        target = _find(snaps, uuid=tok["target"])
        if to_name is not None and to_name != target["name"]:
            raise InvalidArgument(f"the token resumes a stream of {target['name']}, not of {to_name}")
        base = _find(snaps, uuid=tok["base"]) if tok.get("base") else None
        start = tok["upto"]
    else:
        if to_name is None:
            raise InvalidArgument("say which snapshot to send (or --resume TOKEN)")
        target = _find(snaps, name=to_name)
        base = _find(snaps, name=from_name) if from_name else None
    if base is not None and snaps.index(base) >= snaps.index(target):
        raise InvalidArgument(f"--from {base['name']} is not older than {target['name']}")
    extents = ([(e["offset"], e["length"]) for e in run_op(vol, "diff", from_name=base["name"],
                                                           to_name=target["name"])]
               if base else [(0, params.size)])
    plan = plan_digest(extents)
    if resume is not None and plan != tok["plan"]:
        raise InvalidArgument("the token is of another plan (were the snapshots replaced?)")
    out = out if out is not None else sys.stdout.buffer
    header = json.dumps({
        "format": "blockrep-stream", "version": VERSION, "volume": params.uuid, "size": params.size,
        "base": base and {"name": base["name"], "uuid": base["uuid"]},
        "target": {"name": target["name"], "uuid": target["uuid"], "created": target["created"]},
        "plan": plan, "resume_from": start, "chunk": CHUNK}).encode()
    out.write(MAGIC + struct.pack("<II", VERSION, len(header)) + header + _dig(header))
    chain, records, data_bytes, wire = bytes(DIG), 0, 0, 0
    with source_server(vol) as src, connection(src, "@" + target["name"]) as h:
        for off, n, payload in _compressed(h, plan_chunks(h, extents, start), level):
            kind = ZERO if payload is None else DATA
            if payload is None:
                payload = b""
            else:
                data_bytes += n
            head = REC.pack(kind, 0, 0, len(payload), off, n)
            d = _dig(head + payload)
            out.write(head + payload + d)
            chain = _dig(chain + d)
            records += 1
            wire += len(head) + len(payload) + DIG
    end = json.dumps({"records": records, "data_bytes": data_bytes, "digest": chain.hex()}).encode()
    head = REC.pack(END, 0, 0, len(end), 0, 0)
    out.write(head + end + _dig(head + end))
    out.flush()
    return {"snapshot": target["name"], "base": base and base["name"], "records": records,
            "data_bytes": data_bytes, "stream_bytes": wire + len(header) + 48 + len(end)}


def _compressed(h, chunks, level: int, workers: int = 2, depth: int = 8):
    """(offset, length, zstd payload or None for a hole) in plan order, reading the next chunks
    while earlier ones compress on `workers` threads (python-zstandard releases the GIL; one
    compressor per thread: they are not thread-safe). At most `depth` chunks are in memory."""
    local = threading.local()

    def compress(data: bytes) -> bytes:
        c = getattr(local, "cctx", None)
        if c is None:
            c = local.cctx = zstandard.ZstdCompressor(level=level)
        return c.compress(data)
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="blockrep-send") as pool:
        for _plan_off, off, n, zero in chunks:
            pending.append((off, n, None if zero else pool.submit(compress, h.pread(n, off))))
            if len(pending) >= depth:
                o, k, fut = pending.popleft()
                yield o, k, None if fut is None else fut.result()
        while pending:
            o, k, fut = pending.popleft()
            yield o, k, None if fut is None else fut.result()


# ---------------------------------------------------------------- receive

def _read(f: BinaryIO, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise StreamError(f"the stream ends inside {what} (truncated)")
        buf += chunk
    return bytes(buf)


def read_header(f: BinaryIO) -> dict:
    if _read(f, len(MAGIC), "its magic") != MAGIC:
        raise StreamError("not a blockrep stream (bad magic)")
    version, length = struct.unpack("<II", _read(f, 8, "its header"))
    if version != VERSION:
        raise StreamError(f"stream version {version}; this blockrep reads version {VERSION}")
    if not 0 < length <= MAX_HEADER:
        raise StreamError(f"header length {length} out of range")
    raw = _read(f, length, "its header")
    if _dig(raw) != _read(f, DIG, "its header digest"):
        raise StreamError("the stream header is damaged (digest)")
    try:
        h = json.loads(raw)
        assert isinstance(h, dict) and h.get("format") == "blockrep-stream"
        assert isinstance(h["size"], int) and isinstance(h["target"]["uuid"], str)
        assert isinstance(h["target"]["name"], str) and isinstance(h["plan"], str)
        assert isinstance(h.get("resume_from", 0), int)
        P.canonical_uuid(h["target"]["uuid"])
        if h.get("base") is not None:
            P.canonical_uuid(h["base"]["uuid"])
    except (ValueError, KeyError, TypeError, AssertionError):
        raise StreamError("the stream header is not a blockrep stream header") from None
    return h


def records(f: BinaryIO, size: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, offset, length, payload) of each record, verified, ending with END (checked)."""
    chain, count, data = bytes(DIG), 0, 0
    dctx = zstandard.ZstdDecompressor()
    while True:
        head = _read(f, REC.size, f"record {count + 1}")
        kind, z1, z2, plen, off, n = REC.unpack(head)
        if kind not in (DATA, ZERO, END) or z1 or z2 or plen > 2 * CHUNK + 4096:
            raise StreamError(f"record {count + 1} is damaged (bad header)")
        payload = _read(f, plen, f"record {count + 1}")
        d = _read(f, DIG, f"record {count + 1}'s digest")
        if _dig(head + payload) != d:
            raise StreamError(f"record {count + 1} is damaged (digest)")
        if kind == END:
            try:
                end = json.loads(payload)
                ok = end["records"] == count and end["data_bytes"] == data and end["digest"] == chain.hex()
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise StreamError("the stream's end record does not match what came before")
            yield END, 0, 0, b""
            return
        if n == 0 or off + n > size or (kind == DATA and n > CHUNK) or (kind == ZERO and plen):
            raise StreamError(f"record {count + 1} is outside the volume or malformed")
        if kind == DATA:
            try:
                payload = dctx.decompress(payload, max_output_size=n)
            except zstandard.ZstdError:
                raise StreamError(f"record {count + 1}'s data does not decompress") from None
            if len(payload) != n:
                raise StreamError(f"record {count + 1}'s data has {len(payload)} bytes, not {n}")
            data += n
        chain = _dig(chain + d)
        count += 1
        yield kind, off, n, payload


def _check_target(vol: Path, h: dict, force: bool, progress: dict | None) -> list[dict]:
    params = read_params(vol)
    if h["size"] != params.size:
        raise StreamError(f"the stream is of a {h['size']}-byte volume; {vol} has {params.size} bytes")
    created = h["target"].get("created")
    try:
        if created is not None:
            parse_time(created).timestamp()
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise StreamError(f"the stream's header has a bad creation time {str(created)[:40]!r}") from None
    role = read_role(vol)
    if role["role"] in ("promoted", "promoting"):  # its live data is in use: a receive would make it a DR
        raise InvalidArgument(f"{vol} was promoted (failover, from {(role['promoted'] or {}).get('from')}): its live "
                              "volume is in use and takes no stream; `blockrep demote` it first")
    if role["bound_to"] and role["bound_to"] != h["volume"]:
        raise InvalidArgument(f"{vol} is a DR of another primary ({role['bound_to']}); the stream is from "
                              f"{h['volume']}")
    snaps = run_op(vol, "snapshot_list")
    if any(s["uuid"] == h["target"]["uuid"] for s in snaps):
        raise AlreadyExists(f"{vol} already holds snapshot {h['target']['name']} (that uuid): nothing to receive")
    if any(s["name"] == h["target"]["name"] for s in snaps):
        raise AlreadyExists(f"{vol} already has another snapshot named {h['target']['name']}")
    resuming = h.get("resume_from", 0) > 0
    if resuming:
        if not progress or (progress.get("target"), progress.get("plan")) != (h["target"]["uuid"], h["plan"]) \
                or progress.get("upto", 0) < h["resume_from"]:
            raise StreamError("a resumed stream, but this volume has not received its beginning "
                              f"({vol / PROGRESS} does not match)")
        return snaps
    if h.get("base"):
        base = next((s for s in snaps if s["uuid"] == h["base"]["uuid"]), None)
        if base is None:
            raise StreamError(f"the stream is an increment on {h['base']['name']} ({h['base']['uuid']}), which "
                              f"{vol} does not hold: send a full stream, or from a base it holds")
        if run_op(vol, "changes_since", since=base["name"]) and not force:
            raise InvalidArgument(f"{vol} changed since {base['name']}: an increment on it would mix both; "
                                  f"`blockrep snapshot rollback {vol} {base['name']}` first, or --force")
    elif (snaps or run_op(vol, "info").get("live_bytes")) and not force:
        raise InvalidArgument(f"{vol} holds data or snapshots of its own: a full stream goes into an empty "
                              "volume (--force replaces its live data)")
    return snaps


def resume_token(volume: str) -> str:
    """The token of the receive that stopped in VOL (killed, or failed), from VOL/receive.json."""
    vol = Path(volume).resolve()
    read_params(vol)
    try:
        rec = json.loads((vol / PROGRESS).read_text())
    except FileNotFoundError:
        raise NotFound(f"no interrupted receive in {vol}") from None
    except ValueError:
        raise BlockrepError(f"{vol / PROGRESS} is damaged: receive a full stream again (--force)") from None
    return make_token(rec)


def receive(volume: str, inp: BinaryIO | None = None, *, force: bool = False) -> dict:
    vol = Path(volume).resolve()
    inp = inp if inp is not None else sys.stdin.buffer
    h = read_header(inp)
    prog_file = vol / PROGRESS
    try:
        progress = json.loads(prog_file.read_text())
    except (OSError, ValueError):
        progress = None
    _check_target(vol, h, force, progress)
    rec = {"target": h["target"]["uuid"], "base": (h.get("base") or {}).get("uuid"), "plan": h["plan"],
           "upto": h.get("resume_from", 0)}
    applied = 0
    with source_server(vol) as dst, exclusive_head(vol, force, stream_from=h["volume"]) as token, \
            connection(dst, P.build("restore", token=token), meta=False) as w:
        def save() -> None:
            w.flush()
            prog_file.write_text(json.dumps(rec))
        plan_pos = rec["upto"]
        since_save = 0
        prog_file.write_text(json.dumps(rec))
        try:
            for kind, off, n, payload in records(inp, h["size"]):
                if kind == END:
                    break
                if kind == DATA:
                    w.pwrite(payload, off)
                else:
                    w.zero(n, off)
                plan_pos += n
                since_save += n
                applied += 1
                rec["upto"] = plan_pos
                if since_save >= SAVE_EVERY:
                    save()
                    since_save = 0
        except (StreamError, nbd.Error) as e:
            why = e.string if isinstance(e, nbd.Error) else str(e)
            with contextlib.suppress(BlockrepError, OSError, nbd.Error):
                save()
            raise StreamError(f"{why}; snapshot {h['target']['name']} was not created; resume with: blockrep send "
                              f"SOURCE {h['target']['name']} --resume {make_token(rec)} | blockrep receive {vol}"
                              ) from None
        w.flush()
        snap = run_op(vol, "snapshot_create", name=h["target"]["name"], uuid=h["target"]["uuid"], holder=token,
                      created=h["target"].get("created"))
        control.call(vol, "dr_received", primary=h["volume"], snapshot_uuid=snap["uuid"],
                     base=(h.get("base") or {}).get("uuid"))
    with contextlib.suppress(OSError):
        prog_file.unlink()
    return {"snapshot": snap["name"], "uuid": snap["uuid"], "base": (h.get("base") or {}).get("name"),
            "records": applied, "resumed_from": h.get("resume_from", 0)}
