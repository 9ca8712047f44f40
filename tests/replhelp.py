"""Helpers shared by the replication tests: real servers (Target), clients, comparisons.

Imported by tests/test_replication.py and tests/test_dr_trust.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from conftest import BLOCKREP, pid_alive, run_blockrep, unix_socket_accepts

KiB = 1 << 10
MiB = 1 << 20
VOL_SIZE = 64 * MiB
ERROR_PREFIX = "blockrep: error:"


# ------------------------------------------------------------------------------------ helpers

def sh(*cmd, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def uri(sock, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@contextlib.contextmanager
def connected(u: str):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(u)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def digest(u: str, size: int) -> str:
    """sha256 of an export's first `size` bytes, read through libnbd."""
    h = hashlib.sha256()
    with connected(u) as c:
        for off in range(0, size, 4 * MiB):
            h.update(c.pread(min(4 * MiB, size - off), off))
    return h.hexdigest()


def snap_uri(server, name: str) -> str:
    return f"nbd+unix:///@{name}?socket={server.sock}"


def nbd_exports(u: str) -> list[str]:
    """Export names a server lists (NBD_OPT_LIST)."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    names: list[str] = []
    h.connect_uri(u)
    try:
        h.opt_list(lambda name, desc: names.append(name) or 0)
        h.opt_abort()
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
    return names


def dr_snapshots(dr) -> list[str]:
    return [n[1:] for n in nbd_exports(dr.uri) if n.startswith("@")]


def local_snapshots(vol) -> list[str]:
    return [s["name"] for s in json.loads(run_blockrep("snapshot", "list", vol, "--json", check=True).stdout)]


def snapshot(vol, name: str) -> str:
    return run_blockrep("snapshot", "create", vol, "--name", name, check=True).stdout.strip()


def replicate(vol, to: str, *args, timeout: float = 60) -> dict:
    r = run_blockrep("replicate", vol, "--to", to, "--json", *args, timeout=timeout, check=True)
    return json.loads(r.stdout)


def status(vol) -> list[dict]:
    return json.loads(run_blockrep("status", vol, "--json", check=True).stdout)


def assert_one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert r.stdout == "", r.stdout
    return lines[0]


def nbdcopy_to(u: str, path: Path) -> Path:
    sh("nbdcopy", u, path)
    return path


def assert_cmp(a: Path, b: Path, n: int = VOL_SIZE) -> None:
    """Byte for byte over the first n bytes (cmp), and the same sha256 (R13)."""
    r = sh("cmp", "-n", n, a, b, check=False)
    assert r.returncode == 0, f"{a} != {b}: {r.stdout}{r.stderr}"
    ha, hb = (hashlib.sha256(p.read_bytes()[:n]).hexdigest() for p in (a, b))
    assert ha == hb


def assert_export_equals(u_a: str, u_b: str, work: Path, tag: str, n: int = VOL_SIZE) -> None:
    a = nbdcopy_to(u_a, work / f"{tag}.a.img")
    b = nbdcopy_to(u_b, work / f"{tag}.b.img")
    try:
        assert_cmp(a, b, n)
    finally:
        a.unlink()
        b.unlink()


def write_blocks(u: str, blocks: dict[int, bytes]) -> None:
    with connected(u) as h:
        for off, data in sorted(blocks.items()):
            h.pwrite(data, off)
        if h.can_flush():
            h.flush()


def scattered_offsets(rnd: random.Random, n: int, size: int = VOL_SIZE, step: int = 16 * KiB,
                      avoid=()) -> list[int]:
    """n distinct 4 KiB-aligned offsets, none adjacent to another (so each is its own extent),
    none inside the (offset, length) ranges of `avoid` (or a dict {offset: data})."""
    ranges = [(o, len(d)) for o, d in avoid.items()] if isinstance(avoid, dict) else list(avoid)
    slots = [o for o in range(0, size, step)
             if not any(a - 4 * KiB < o < a + n_ + 4 * KiB for a, n_ in ranges)]
    return sorted(rnd.sample(slots, n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 30, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def replication_state(vol: Path) -> dict:
    """The per-target records of VOL/replication.json (docs/REPLICATION.md §5): {uri: record}."""
    try:
        return json.loads((vol / "replication.json").read_text()).get("targets") or {}
    except (FileNotFoundError, ValueError):
        return {}


class Target:
    """A plain NBD server run in the foreground (nbdkit -f, qemu-nbd) or a daemon with a pid file
    (nbd-server). stop() waits for the process to exit (nbdkit writes its statsfile then)."""

    def __init__(self, cmd: list, uri: str, sock: Path | None = None, pidfile: Path | None = None,
                 tcp: tuple[str, int] | None = None):
        self.cmd, self.uri, self.sock, self.pidfile, self.tcp = [str(c) for c in cmd], uri, sock, pidfile, tcp
        self.proc: subprocess.Popen | None = None
        self.daemon_pid: int | None = None

    def start(self) -> Target:
        if self.sock:
            self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        if self.pidfile:  # a forking daemon: the parent exits once it has bound
            self.proc.wait(timeout=30)
            self.daemon_pid = int(wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(),
                                           what=f"{self.cmd[0]} pid file"))

        def ready():
            if self.proc.poll() is not None and not self.pidfile:
                raise AssertionError(f"{self.cmd} exited: {self.proc.stdout.read().decode()}")
            if self.sock:
                return unix_socket_accepts(self.sock)
            with contextlib.suppress(OSError), socket.create_connection(self.tcp, timeout=1):
                return True
            return False
        wait_for(ready, what=f"{self.cmd[0]} to accept connections")
        return self

    @property
    def pid(self) -> int | None:
        return self.daemon_pid if self.pidfile else (self.proc.pid if self.proc else None)

    def kill(self, sig=signal.SIGKILL) -> None:
        pid = self.pid
        if pid and pid_alive(pid):
            os.kill(pid, sig)
        if self.proc and not self.pidfile:
            self.proc.wait(timeout=30)
        elif pid:
            wait_for(lambda: not pid_alive(pid), what=f"pid {pid} to exit")

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def targets():
    """Factory for Target objects; every one is killed at teardown."""
    made: list[Target] = []

    def make(*args, **kw) -> Target:
        t = Target(*args, **kw)
        made.append(t)
        return t.start()
    yield make
    for t in made:
        with contextlib.suppress(Exception):
            t.kill()


@pytest.fixture
def procs():
    """Background `blockrep` processes (Popen); SIGKILLed at teardown if still running."""
    made: list[subprocess.Popen] = []

    def start(*args) -> subprocess.Popen:
        p = subprocess.Popen([BLOCKREP, *map(str, args)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        made.append(p)
        return p
    yield start
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait()


def nbdkit_target(tmp_path: Path, name: str, plugin: list, filters: list = ()) -> tuple[list, str, Path]:
    sock = tmp_path / f"{name}.sock"
    cmd = ["nbdkit", "-f", "-U", sock, *[f"--filter={f}" for f in filters], *plugin]
    return cmd, uri(sock), sock


def parse_stats(path: Path) -> dict[str, dict]:
    """nbdkit stats filter output -> {"write": {"ops": N, "bytes": B}, "zero": …}. The filter prints
    sizes with two decimals (e.g. "800.00 KiB"): exact to within 0.5%."""
    units = {"bytes": 1, "KiB": KiB, "MiB": MiB, "GiB": 1 << 30}
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"(\w+): (\d+) ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)\b", line)
        if m:
            out[m.group(1)] = {"ops": int(m.group(2)), "bytes": round(float(m.group(3)) * units[m.group(4)])}
    return out


