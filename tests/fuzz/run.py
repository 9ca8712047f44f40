"""The long fuzz tier: `make fuzz DURATION=600` (seconds per target) or
`python -m tests.fuzz.run [--duration S] [--engine atheris|hypothesis] [TARGET ...]`.

atheris (libFuzzer, coverage of the Python decoders): each target runs in its own process for
DURATION seconds, in-process; libFuzzer catches a crash (deadly signal), a hang (-timeout) and an
RSS overrun (-rss_limit_mb) itself and writes the input to tests/fuzz_corpus/findings/TARGET/.
An oracle Violation or an escaping exception is an uncaught Python exception: the same.
The working corpus grows in build/fuzz/TARGET (seeded from tests/fuzz_corpus/TARGET).
Without atheris (--engine hypothesis): random inputs through the worker subprocess
(tests/fuzz/worker.py) until DURATION, every finding saved, the run goes on.
Prints executions and findings per target; exit 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"
FINDINGS = CORPUS / "findings"


def _atheris_child(target: str, duration: int, mem_mb: int) -> None:
    import atheris
    with atheris.instrument_imports(include=["engine"]):
        import engine.control  # noqa: F401
        import engine.ops  # noqa: F401
        import engine.replication.protocol  # noqa: F401
        import engine.replication.state  # noqa: F401
        import engine.volume  # noqa: F401
    from tests.fuzz.targets import TARGETS
    fn = TARGETS[target]
    work = REPO / "build" / "fuzz" / target
    work.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    if seeds.is_dir():
        for p in seeds.glob("*.bin"):
            shutil.copy(p, work / p.name)
    out = FINDINGS / target
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(work), f"-max_total_time={duration}", "-timeout=60", f"-rss_limit_mb={mem_mb}",
            "-max_len=512", f"-artifact_prefix={out}/", "-print_final_stats=1"]
    atheris.Setup(args, lambda data: fn(data))
    atheris.Fuzz()


def run_atheris(target: str, duration: int, mem_mb: int) -> tuple[int, int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--child", target, "--duration", str(duration),
                        "--mem-mb", str(mem_mb)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=duration + 600)
    log = p.stdout + p.stderr
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"#(\d+)\s", log)
    execs = int(m[-1]) if m else 0
    found = 0 if p.returncode == 0 else 1
    tail = "\n".join(line for line in log.splitlines() if "Violation" in line or "ERROR" in line
                     or "artifact" in line or "Uncaught" in line)[-3000:]
    return execs, found, tail


def run_random(target: str, duration: int) -> tuple[int, int, str]:
    from tests.fuzz.targets import NATIVE, TARGETS
    from tests.fuzz.worker import Finding, Runner
    rnd = random.Random(int.from_bytes(os.urandom(8), "little"))
    end = time.monotonic() + duration
    execs = found = 0
    notes = []
    with Runner(timeout=60) as r:
        while time.monotonic() < end:
            data = rnd.randbytes(rnd.randrange(0, 300))
            execs += 1
            try:
                if target in NATIVE:
                    r.run(target, data)
                else:
                    TARGETS[target](data)
            except Finding as f:
                found += 1
                notes.append(str(f)[:400])
            except Exception as e:  # in-process target: save it like the worker does
                from tests.fuzz.worker import save
                found += 1
                notes.append(f"{target}: {type(e).__name__}: {str(e)[:300]} (saved {save(target, data, 'violation')})")
    return execs, found, "\n".join(notes[:20])


def main() -> int:
    from tests.fuzz.targets import TARGETS
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run")
    ap.add_argument("targets", nargs="*", default=sorted(TARGETS))
    ap.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", "60")),
                    help="seconds per target (default 60)")
    ap.add_argument("--engine", choices=["atheris", "hypothesis"], default=None)
    ap.add_argument("--mem-mb", type=int, default=3072)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _atheris_child(a.child, a.duration, a.mem_mb)
        return 0
    engine = a.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
            print("atheris is not installed (.venv/bin/pip install atheris): random inputs through the worker")
    total_e = total_f = 0
    for t in a.targets:
        t0 = time.monotonic()
        execs, found, notes = (run_atheris(t, a.duration, a.mem_mb) if engine == "atheris"
                               else run_random(t, a.duration))
        total_e += execs
        total_f += found
        print(f"{t:18s} {engine:9s} {execs:9d} execs {time.monotonic() - t0:7.1f} s  findings: {found}")
        if notes:
            print("    " + notes.replace("\n", "\n    "))
    print(f"total: {total_e} executions, {total_f} findings (inputs under {FINDINGS})")
    return 1 if total_f else 0


if __name__ == "__main__":
    sys.exit(main())
