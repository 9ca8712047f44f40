"""Run fuzz targets in a subprocess, so that a segfault, a hang or a runaway allocation in the C
engine is caught, reported and its input saved, and the fuzzing goes on in a fresh worker.

Protocol (one JSON line each way): {"target": NAME, "data": HEX} -> {"outcome": STR} or
{"violation": STR} or {"error": "Type: text"} (an exception escaped the target: a finding).
The worker runs under RLIMIT_AS (BLOCKREP_FUZZ_MEM_MB, default 3072): an allocation beyond it
fails and shows as ENOMEM, which the oracle counts as unbounded memory.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MEM_MB = int(os.environ.get("BLOCKREP_FUZZ_MEM_MB", "3072"))
FINDINGS = Path(os.environ.get("BLOCKREP_FUZZ_FINDINGS", REPO / "tests" / "fuzz_corpus" / "findings"))


def main() -> None:  # the worker side
    if MEM_MB:  # 0: no address-space limit (ASan reserves terabytes of shadow; it bounds RSS itself)
        resource.setrlimit(resource.RLIMIT_AS, (MEM_MB << 20, MEM_MB << 20))
    sys.path.insert(0, str(REPO))
    from tests.fuzz.targets import TARGETS, Violation
    out = sys.stdout
    sys.stdout = sys.stderr  # targets' prints never mix with the protocol
    for line in sys.stdin:
        req = json.loads(line)
        if req["target"] == "__crash__":  # the harness's own test: die as a segfault would
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            res = {"outcome": TARGETS[req["target"]](bytes.fromhex(req["data"]))}
        except Violation as e:
            res = {"violation": str(e)[:2000]}
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"[:1000] + "\n" + traceback.format_exc()[-2000:]}
        out.write(json.dumps(res) + "\n")
        out.flush()


class Finding(Exception):
    def __init__(self, target: str, data: bytes, kind: str, detail: str, saved: Path | None):
        super().__init__(f"{target}: {kind}: {detail}" + (f" (input saved to {saved})" if saved else ""))
        self.target, self.data, self.kind, self.detail, self.saved = target, data, kind, detail, saved


def save(target: str, data: bytes, kind: str) -> Path:
    import hashlib
    d = FINDINGS / target
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{kind}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    p.write_bytes(data)
    return p


class Runner:
    """One worker subprocess, restarted after a crash or a hang."""

    def __init__(self, timeout: float = 30.0, save_findings: bool = True):
        self.timeout = timeout
        self.save_findings = save_findings
        self.proc: subprocess.Popen | None = None
        self.execs = 0

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()
            self.proc = None

    def _kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def run(self, target: str, data: bytes) -> str:
        """The target's outcome; raises Finding on a violation, escape, crash or hang."""
        import select
        if self.proc is None:
            self._start()
        p = self.proc
        assert p is not None and p.stdin is not None and p.stdout is not None
        self.execs += 1
        try:
            p.stdin.write(json.dumps({"target": target, "data": data.hex()}) + "\n")
            p.stdin.flush()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + self.timeout
        line = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise self._finding(target, data, "hang", f"no answer within {self.timeout:.0f} s")
            r, _, _ = select.select([p.stdout], [], [], left)
            if r:
                line = p.stdout.readline()
                break
        if not line:  # the worker died
            rc = p.wait()
            self.proc = None
            what = f"killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exited {rc}"
            raise self._finding(target, data, "crash", what)
        res = json.loads(line)
        if "violation" in res:
            raise self._finding(target, data, "violation", res["violation"])
        if "error" in res:
            raise self._finding(target, data, "escape", res["error"])
        return res["outcome"]

    def _finding(self, target, data, kind, detail) -> Finding:
        saved = save(target, data, kind) if self.save_findings else None
        return Finding(target, data, kind, detail, saved)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    main()
