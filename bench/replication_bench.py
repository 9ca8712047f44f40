#!/usr/bin/env python3
"""Replication figures of DESIGN §5, each against its anchor in the same run:

1. bytes written at the target per changed byte, for scattered 4 KiB writes (target <= 1.05);
   anchor: a full copy with nbdcopy moves (volume / changed) times as much.
2. (a) loopback: the copy loop (engine.replication.copy.copy_extents) shipping the seed snapshot
   (DATA_MIB of data, the rest holes) over Unix sockets to `nbdkit memory`, vs `nbdcopy` of the
   same `@seed` export to the same kind of target (target >= 1.0x nbdcopy's speed);
   (b) the same to `nbdkit memory` with multi-conn disabled and 10 ms per write and per zero
   (`--filter=multi-conn multi-conn-mode=disable --filter=delay delay-write=10ms delay-zero=10ms`):
   both tools get one connection there (target >= 1.0x).
3. (c) incremental replication of scattered writes over a 100 Mbit/s tbf link between two
   network namespaces joined by a veth pair (made with pyroute2; 10.213.0.1/24 and 10.213.0.2/24
   exist only inside them, and both are deleted at the end): wall time of copy_extents divided by
   (changed bytes / 12.5e6 B/s) (target <= 1.05). Beside it, nbdcopy of as many bytes of data over
   the same link (what a C client gets from this TCP path) and the TCP/IPv4 framing floor.

Run: .venv/bin/python bench/replication_bench.py [--size-mib 1024] [--data-mib 512] [--repeat 3] [--no-link]
As root (namespaces). The primary is a real blockrep volume (`blockrep create/serve`, snapshot
exports `@NAME`); targets are nbdkit on Unix sockets, or on TCP inside the second namespace.
Each (a)/(b) cell is the median of --repeat runs, the two tools alternating which goes first.
Results are printed as Markdown and saved to bench/results/replication-<timestamp>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKREP = str(ROOT / ".venv" / "bin" / "blockrep")
sys.path.insert(0, str(ROOT))

LINK_RATE = 100e6 / 8  # tbf rate 100mbit, bytes per second
NS_A, NS_B = "brbenchA", "brbenchB"  # the namespaces this bench creates (and deletes)
VETH_A, VETH_B = "vbrbenchA", "vbrbenchB"
ADDR_A, ADDR_B, PORT = "10.213.0.1", "10.213.0.2", 10809


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Nbdkit:
    """`nbdkit -f -P PIDFILE [-U SOCK | -i ADDR -p PORT] ARGS` in the background (in namespace
    `netns` if given); ready once the pid file is written and it accepts a connection."""

    def __init__(self, d: Path, args: list, netns: str | None = None):
        d.mkdir(exist_ok=True)
        self.sock, self.pidfile, self.statsfile = d / "t.sock", d / "t.pid", d / "stats.txt"
        self.sock.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        where = ["-i", ADDR_B, "-p", str(PORT)] if netns else ["-U", str(self.sock)]
        args = [str(a).replace("STATSFILE", str(self.statsfile)) for a in args]
        with open(d / "nbdkit.log", "ab") as log:  # (readiness probes make it complain there)
            self.p = subprocess.Popen(["nbdkit", "-f", "-P", str(self.pidfile), *where, *args],
                                      stdout=log, stderr=log, preexec_fn=(lambda: _setns(netns)) if netns else None)
        self.uri = f"nbd://{ADDR_B}:{PORT}/" if netns else f"nbd+unix:///?socket={self.sock}"
        t = time.monotonic()
        while not self.pidfile.exists():
            if self.p.poll() is not None or time.monotonic() - t > 20:
                raise RuntimeError(f"nbdkit {args} did not start")
            time.sleep(0.02)
        from engine.server import socket_accepts, tcp_accepts
        if netns:
            with in_netns(NS_A):
                while not tcp_accepts(ADDR_B, PORT):
                    time.sleep(0.02)
        else:
            while not socket_accepts(self.sock):
                time.sleep(0.02)

    def stop(self) -> dict:
        """SIGTERM its own pid and wait (the stats filter writes its file at exit)."""
        self.p.terminate()
        self.p.wait(timeout=30)
        out = {}
        if self.statsfile.exists():
            units = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
            for line in self.statsfile.read_text().splitlines():
                parts = line.strip().split(", ")
                op = parts[0].split(":")[0]
                if op in ("write", "zero", "trim") and len(parts) > 2:
                    num, unit = parts[2].split()[:2]
                    out[op] = float(num) * units.get(unit, 1)
        return out


def _setns(name: str) -> None:
    from pyroute2 import netns
    netns.setns(name, flags=0)


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block in network namespace `name` (this thread: copy_extents' sockets)."""
    from pyroute2 import netns
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


@contextlib.contextmanager
def shaped_link():
    """Two namespaces joined by a veth pair, tbf 100mbit on both ends; removed afterwards
    (deleting a namespace deletes its end of the veth, and so the pair)."""
    from pyroute2 import IPRoute, NetNS, netns
    for ns in (NS_A, NS_B):
        if ns in netns.listnetns():
            netns.remove(ns)
    netns.create(NS_A)
    netns.create(NS_B)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=VETH_A, kind="veth", peer={"ifname": VETH_B, "net_ns_fd": NS_B})
            ipr.link("set", index=ipr.link_lookup(ifname=VETH_A)[0], net_ns_fd=NS_A)
        for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
            with NetNS(ns) as n:
                idx = n.link_lookup(ifname=dev)[0]
                n.addr("add", index=idx, address=addr, prefixlen=24)
                n.link("set", index=idx, state="up")
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
                n.tc("add", "tbf", idx, handle="1:", rate="100mbit", burst=64 * 1024, latency="100ms")
        yield
    finally:
        for ns in (NS_A, NS_B):
            with contextlib.suppress(Exception):
                netns.remove(ns)


def timed(fn, *a, **kw) -> float:
    t = time.monotonic()
    fn(*a, **kw)
    return time.monotonic() - t


def versus(d: Path, target_args: list, ours, theirs, repeat: int) -> tuple[list[float], list[float]]:
    """Wall times of ours(uri) and theirs(uri), each against a fresh target, alternating which
    goes first; one untimed run of each before."""
    mine, anchor = [], []
    for i in range(repeat + 1):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = Nbdkit(d / f"t{which}", target_args)
            try:
                took = timed((ours, theirs)[which], t.uri)
            finally:
                t.stop()
            if i:
                (mine if which == 0 else anchor).append(took)
    return mine, anchor


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}–{max(xs):.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--changed-blocks", type=int, default=5000, help="4 KiB blocks rewritten for figures 1 and (c)")
    ap.add_argument("--changed-64k", type=int, default=768, help="64 KiB blocks rewritten for the second (c) row")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--link-repeat", type=int, default=3)
    ap.add_argument("--no-link", action="store_true", help="skip (c), the shaped link (needs root)")
    args = ap.parse_args()
    import nbd

    from engine.replication.copy import copy_extents
    size = args.size_mib << 20
    load_before = loadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="blockrep-rbench-") as td:
        d = Path(td)
        vol = d / "p"
        sh(BLOCKREP, "create", vol, "--size", f"{args.size_mib}M")
        sh(BLOCKREP, "serve", vol)
        try:
            src = f"nbd+unix:///?socket={vol / 'nbd.sock'}"
            h = nbd.NBD()
            h.connect_uri(src)
            for i in range(args.data_mib):
                h.pwrite(os.urandom(1 << 20), i << 20)
            h.flush()
            sh(BLOCKREP, "snapshot", "create", vol, "--name", "seed")
            seed_uri = f"nbd+unix:///@seed?socket={vol / 'nbd.sock'}"

            def ours(uri):
                st = copy_extents(src, "@seed", uri, None, [(0, size)])
                assert st.bytes_sent == args.data_mib << 20, st

            def nbdcopy(uri):
                sh("nbdcopy", seed_uri, uri)

            # -- (a) loopback, (b) one slow connection: the copy loop vs nbdcopy, same targets
            mem = ["memory", f"{args.size_mib}M"]
            slow = ["--filter=multi-conn", "--filter=delay", *mem, "multi-conn-mode=disable",
                    "delay-write=10ms", "delay-zero=10ms"]
            for key, what, targs in (("a", "loopback, `nbdkit memory`", mem),
                                     ("b", "`nbdkit memory`, no multi-conn, 10 ms per write and zero", slow)):
                mine, anchor = versus(d, targs, ours, nbdcopy, args.repeat)
                ratio = statistics.median(anchor) / statistics.median(mine)
                rows.append((f"({key}) seed of {args.data_mib} MiB data + {args.size_mib - args.data_mib} MiB "
                             f"holes, {what}", f"{spread(mine)} vs nbdcopy {spread(anchor)}, median of {args.repeat}",
                             f"**{ratio:.2f}x** nbdcopy's speed", ">= 1.0"))

            # -- 1. bytes per changed byte: seed a stats target, then ship scattered 4 KiB changes
            # through `blockrep replicate`; the stats filter counts every write at exit, so the
            # delta's writes = total - the seed's data
            t3 = Nbdkit(d / "t3", ["--filter=stats", *mem, "statsfile=STATSFILE"])
            rnd = random.Random(1)
            changed = args.changed_blocks * 4096
            try:
                sh(BLOCKREP, "replicate", vol, "--to", t3.uri, "--snapshot", "seed", "--json")
                for b in rnd.sample(range(args.size_mib * 256), args.changed_blocks):
                    h.pwrite(os.urandom(4096), b * 4096)
                h.flush()
                sh(BLOCKREP, "snapshot", "create", vol, "--name", "delta")
                res = json.loads(sh(BLOCKREP, "replicate", vol, "--to", t3.uri, "--snapshot", "delta",
                                    "--json").stdout)
                st = t3.stop()
                delta_written = st.get("write", 0) - (args.data_mib << 20)
                rows.append(("1. bytes written at the target per changed byte (scattered 4 KiB, `blockrep replicate`)",
                             f"{delta_written / changed:.3f} ({res['bytes_sent']} sent, {changed} changed)",
                             f"nbdcopy full copy: {size / changed:.0f}", "<= 1.05"))
            except subprocess.CalledProcessError as e:
                t3.stop()
                rows.append(("1. bytes written at the target per changed byte", "n/a: `blockrep replicate` failed: "
                             + (e.stderr or "").strip().splitlines()[-1:][0] if e.stderr else "n/a", "", "<= 1.05"))
                if "delta" not in sh(BLOCKREP, "snapshot", "list", vol).stdout:
                    for b in rnd.sample(range(args.size_mib * 256), args.changed_blocks):
                        h.pwrite(os.urandom(4096), b * 4096)
                    h.flush()
                    sh(BLOCKREP, "snapshot", "create", vol, "--name", "delta")

            # -- (c) incremental over the shaped link
            if not args.no_link:
                rnd = random.Random(2)
                for b in rnd.sample(range(args.size_mib * 16), args.changed_64k):
                    h.pwrite(os.urandom(64 << 10), b << 16)
                h.flush()
                sh(BLOCKREP, "snapshot", "create", vol, "--name", "delta64")
                rows += link_rows(d, vol, src, size, args, copy_extents)
            h.shutdown()
        finally:
            sh(BLOCKREP, "stop", vol)
    load_after = loadavg()
    out = ["| figure | measured | anchor / ratio | target |", "|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append(f"\nload average before {load_before}, after {load_after} (2 vCPUs shared; above ~0.5 is suspect)")
    text = "\n".join(out)
    print(text)
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"replication-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text + "\n")
    return 0


def link_rows(d: Path, vol: Path, src: str, size: int, args, copy_extents) -> list[tuple]:
    """(c): target `nbdkit file` in namespace B on TCP over an image holding @seed (copied there
    locally before each repeat); the copy loop runs in namespace A; the source stays on its Unix
    socket. Each case: median of --link-repeat runs. The image lives in /dev/shm (tmpfs): the
    final flush is then free, so the figure is the link's and the copy loop's, not the time the
    DR's disk takes to sync the delta (on /tmp's ext4 that added 0.05-0.1 s here)."""
    sock = vol / "nbd.sock"
    shm = tempfile.TemporaryDirectory(prefix="blockrep-rbench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    img = Path(shm.name) / "dr.img"
    cases = [("seed", "delta", f"{args.changed_blocks} scattered 4 KiB writes", {}),
             ("delta", "delta64", f"{args.changed_64k} scattered 64 KiB writes", {}),
             ("seed", "delta", f"{args.changed_blocks} scattered 4 KiB writes, connections=1",
              {"connections": 1})]
    extents = {snap: [(e["offset"], e["length"]) for e in
                      json.loads(sh(BLOCKREP, "diff", vol, base, snap, "--json").stdout)]
               for base, snap, _, _ in cases}
    walls: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    written: dict[int, float] = {}
    rows = []
    with shaped_link():
        for _ in range(args.link_repeat):
            sh("nbdcopy", f"nbd+unix:///@seed?socket={sock}", img)
            for i, (base, snap, _, kw) in enumerate(cases):
                if i == 2:  # the same delta again: put the image back to @seed's state
                    sh("nbdcopy", f"nbd+unix:///@seed?socket={sock}", img)
                t = Nbdkit(d / "tc", ["--filter=stats", "file", img, "statsfile=STATSFILE"], netns=NS_B)
                try:
                    with in_netns(NS_A):
                        walls[i].append(timed(copy_extents, src, "@" + snap, t.uri, None, extents[snap],
                                              base_export="@" + base, **kw))
                finally:
                    written[i] = t.stop().get("write", 0)
                if i == 1:
                    sh("nbdcopy", f"nbd+unix:///@delta64?socket={sock}", d / "check.img")
                    assert (d / "check.img").read_bytes() == img.read_bytes(), "the DR image differs from @delta64"
        for i, (_, snap, what, _) in enumerate(cases):
            changed = sum(n for _, n in extents[snap])
            bound = changed / LINK_RATE
            per = changed / len(extents[snap])
            # TCP/IPv4 with timestamps at MTU 1500 carries 1448 of every 1514 bytes tbf counts;
            # each NBD write adds a 28-byte request header
            floor = (per + 28) / per * 1514 / 1448
            wall = statistics.median(walls[i])
            rows.append((f"(c) incremental over 100 Mbit/s tbf: {what} ({changed / 2**20:.1f} MiB, "
                         f"{len(extents[snap])} extents)",
                         f"{spread(walls[i])}, bound {bound:.2f} s; {written[i] / changed:.3f} bytes written "
                         "per changed byte", f"**{wall / bound:.3f}x** the bound (TCP+NBD framing alone: "
                         f"{floor:.3f}x)", "<= 1.05"))
        # what nbdcopy (C, 4 connections x 64 requests) gets through the same link: as many bytes
        # of data as the 64 KiB case, copied from a local file to `nbdkit memory` in namespace B
        n = args.changed_64k << 16
        data = d / "link.bin"
        data.write_bytes(os.urandom(n))
        times = []
        for _ in range(args.link_repeat):
            t = Nbdkit(d / "tl", ["memory", n], netns=NS_B)
            try:
                with in_netns(NS_A):
                    times.append(timed(sh, "nbdcopy", data, t.uri))
            finally:
                t.stop()
        rows.append((f"(c) anchor: nbdcopy of {n / 2**20:.0f} MiB of data (a local file) over the same link",
                     f"{spread(times)}, bound {n / LINK_RATE:.2f} s",
                     f"{statistics.median(times) / (n / LINK_RATE):.3f}x the bound", "—"))
    shm.cleanup()
    return rows


if __name__ == "__main__":
    sys.exit(main())
