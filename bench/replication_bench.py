#!/usr/bin/env python3
"""Replication figures of DESIGN §5, each against its anchor in the same run:

1. bytes written at the target per changed byte, for scattered 4 KiB writes (target <= 1.05);
   anchor: a full copy with nbdcopy moves (volume / changed) times as much.
2. loopback throughput of an incremental replication vs nbdcopy of the same bytes (>= 0.8):
   the seed of a volume holding DATA_MIB of data, replicated to `nbdkit memory` vs nbdcopy of the
   same snapshot export to the same kind of target.

Run: .venv/bin/python bench/replication_bench.py [--size-mib 1024] [--data-mib 512]
Targets are `nbdkit --filter=stats memory` on Unix sockets; the primary is `blockrep serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKREP = str(ROOT / ".venv" / "bin" / "blockrep")
sys.path.insert(0, str(ROOT))


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def wait_socket(path: Path, timeout=20):
    t = time.monotonic()
    while not path.exists():
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)
    time.sleep(0.1)


class MemoryTarget:
    def __init__(self, d: Path, size_mib: int):
        self.sock = d / "t.sock"
        self.stats = d / "stats.txt"
        self.p = subprocess.Popen(["nbdkit", "-f", "-U", str(self.sock), "--filter=stats", "memory",
                                   f"{size_mib}M", f"statsfile={self.stats}"])
        wait_socket(self.sock)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> dict:
        self.p.terminate()
        self.p.wait()
        out = {}
        for line in self.stats.read_text().splitlines():
            line = line.strip()
            for op in ("write", "zero", "trim"):
                if line.startswith(op + ":"):
                    # "write: 819 ops, 0.001 s, 51.20 MiB, ..." -> bytes from the MiB/GiB field
                    for part in line.split(","):
                        part = part.strip()
                        for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
                            if part.endswith(unit) and part.split()[0].replace(".", "").isdigit():
                                out[op] = float(part.split()[0]) * mult
                        if part.endswith(" bytes"):
                            out[op] = float(part.split()[0])
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--changed-blocks", type=int, default=5000)
    args = ap.parse_args()
    import nbd
    with tempfile.TemporaryDirectory(prefix="blockrep-rbench-") as td:
        d = Path(td)
        vol = d / "p"
        sh(BLOCKREP, "create", vol, "--size", f"{args.size_mib}M")
        sh(BLOCKREP, "serve", vol)
        try:
            uri = f"nbd+unix:///?socket={vol / 'nbd.sock'}"
            h = nbd.NBD()
            h.connect_uri(uri)
            chunk = os.urandom(1 << 20)
            for i in range(args.data_mib):
                h.pwrite(chunk, i << 20)
            h.flush()
            sh(BLOCKREP, "snapshot", "create", vol, "--name", "seed")
            rows = []

            # -- throughput: seed replication vs nbdcopy of the same export, same target kind
            (d / "t1").mkdir()
            t1 = MemoryTarget(d / "t1", args.size_mib)
            t0 = time.monotonic()
            res = json.loads(sh(BLOCKREP, "replicate", vol, "--to", t1.uri, "--snapshot", "seed", "--json").stdout)
            rep_s = time.monotonic() - t0
            t1.stop()
            (d / "t2").mkdir()
            t2 = MemoryTarget(d / "t2", args.size_mib)
            t0 = time.monotonic()
            sh("nbdcopy", f"nbd+unix:///@seed?socket={vol / 'nbd.sock'}", t2.uri)
            copy_s = time.monotonic() - t0
            t2.stop()
            rows.append((f"seed of {args.data_mib} MiB of data: replicate vs nbdcopy (s)",
                         f"{rep_s:.2f} vs {copy_s:.2f}", f"{copy_s / rep_s:.2f}x nbdcopy's speed", ">= 0.8"))

            # -- bytes per changed byte: seed a stats target, then ship scattered 4 KiB changes;
            # the stats filter counts every write at exit, so delta writes = total - seed data
            (d / "t3").mkdir()
            t3 = MemoryTarget(d / "t3", args.size_mib)
            sh(BLOCKREP, "replicate", vol, "--to", t3.uri, "--snapshot", "seed", "--json")
            rnd = random.Random(1)
            for b in rnd.sample(range(args.size_mib * 256), args.changed_blocks):
                h.pwrite(os.urandom(4096), b * 4096)
            h.flush()
            sh(BLOCKREP, "snapshot", "create", vol, "--name", "delta")
            res = json.loads(sh(BLOCKREP, "replicate", vol, "--to", t3.uri, "--snapshot", "delta", "--json").stdout)
            st = t3.stop()
            changed = args.changed_blocks * 4096
            delta_written = st.get("write", 0) - (args.data_mib << 20)
            rows.append(("bytes written at the target per changed byte (scattered 4 KiB)",
                         f"{delta_written / changed:.3f} ({res['bytes_sent']} sent, {changed} changed)",
                         f"nbdcopy full copy: {(args.size_mib << 20) / changed:.0f}", "<= 1.05"))
            h.shutdown()
        finally:
            sh(BLOCKREP, "stop", vol)
    print("| figure | measured | anchor | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
