"""send/receive streams (issue 10, docs/STREAM.md): stream bytes per changed byte on text-like and
on random data, and send / receive speed against nbdcopy moving the same bytes, in one run.

    .venv/bin/python bench/stream_bench.py [--mib 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BR = str(ROOT / ".venv" / "bin" / "blockrep")
MiB = 1 << 20
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no what up out can more "
         "volume snapshot replica block disk extent server client write read flush").split()


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def text_like(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    out, size = [], 0
    while size < n:
        line = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14))) + f" {rnd.randint(0, 99999)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def run_once(d: Path, mib: int, seed: int) -> dict:
    n = mib * MiB
    p, r1, r2 = d / "p", d / "r1", d / "r2"
    for v in (p, r1, r2):
        sh(BR, "create", v, "--size", f"{4 * mib}M")
    sh(BR, "serve", p, "--socket", d / "p.sock")
    uri = f"nbd+unix:///?socket={d / 'p.sock'}"
    try:
        (d / "text").write_bytes(text_like(n, seed))
        (d / "rand").write_bytes(os.urandom(n))
        sh("qemu-io", "-f", "raw", "-c", f"write -s {d / 'text'} 0 {n}", uri)
        sh(BR, "snapshot", "create", p, "--name", "a")
        sh("qemu-io", "-f", "raw", "-c", f"write -s {d / 'rand'} {2 * n} {n}", uri)
        sh(BR, "snapshot", "create", p, "--name", "b")
        t_send = timed(lambda: sh(BR, "send", p, "a", "-o", d / "a.bs"))
        sh(BR, "send", p, "b", "--from", "a", "-o", d / "ab.bs")
        t_anchor_read = timed(lambda: sh("nbdcopy", f"nbd+unix:///@a?socket={d / 'p.sock'}", d / "a.raw"))
        t_recv = timed(lambda: sh(BR, "receive", r1, "-i", d / "a.bs"))
        sh(BR, "serve", r2, "--socket", d / "r2.sock")
        t_anchor_write = timed(lambda: sh("nbdcopy", d / "a.raw", f"nbd+unix:///?socket={d / 'r2.sock'}"))
        sh(BR, "stop", r2)
        return {"text_ratio": (d / "a.bs").stat().st_size / n, "random_ratio": (d / "ab.bs").stat().st_size / n,
                "send_s": t_send, "nbdcopy_read_s": t_anchor_read, "receive_s": t_recv,
                "nbdcopy_write_s": t_anchor_write}
    finally:
        subprocess.run([BR, "stop", str(p)], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB of text-like and of random data (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs, median reported (default 3)")
    a = ap.parse_args()
    runs = []
    for i in range(a.repeat):
        with tempfile.TemporaryDirectory(prefix="blockrep-stream-bench-") as d:
            runs.append(run_once(Path(d), a.mib, seed=i))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    n = a.mib
    print(f"Streams, {n} MiB of text-like data (snapshot a, full stream) and {n} MiB of random data "
          f"(b since a), median of {a.repeat}; load {os.getloadavg()[0]:.2f}\n")
    print("| figure | measured | anchor / target |\n|---|---|---|")
    print(f"| stream bytes per changed byte, text-like (full stream of a) | {med['text_ratio']:.3f} | target ≤ 0.5 |")
    print(f"| stream bytes per changed byte, random (b since a) | {med['random_ratio']:.4f} | target ≤ 1.01 |")
    print(f"| send a to a file | {n / med['send_s']:.0f} MiB/s of data ({med['send_s']:.2f} s) | "
          f"nbdcopy @a to a file: {n / med['nbdcopy_read_s']:.0f} MiB/s: "
          f"**{med['nbdcopy_read_s'] / med['send_s']:.2f}×** its speed |")
    print(f"| receive it into a new volume | {n / med['receive_s']:.0f} MiB/s ({med['receive_s']:.2f} s) | "
          f"nbdcopy of the raw file into a new served volume: {n / med['nbdcopy_write_s']:.0f} MiB/s: "
          f"**{med['nbdcopy_write_s'] / med['receive_s']:.2f}×** its speed |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
