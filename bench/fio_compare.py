#!/usr/bin/env python3
"""fio (nbd engine) comparison of blockrep against NBD anchor servers.

Every figure is a ratio to anchors measured in the same run (DESIGN.md §5,
anchors/perf-baseline.md).  Each server gets its own Unix socket and a 1 GiB
export, and only one server runs at a time:

  (a) memory    nbdkit memory 1G                        (C, the NBD speed limit)
  (b) ceiling   bench/anchor_bytearray_plugin.py under nbdkit's Python plugin,
                THREAD_MODEL_SERIALIZE_ALL_REQUESTS     (the Python-plugin ceiling)
  (c) qemu      qemu-nbd -f qcow2 --cache=writeback --shared=8 over a fresh qcow2
  (d) blockrep  blockrep create VOL --size 1G; blockrep serve VOL --socket SOCK
  (e) blockrep-zstd  the same with --compress zstd      (only with --with-compress)
  (i) blockrep-image blockrep create VOL --size 1G --backend image --journal DIR
                (the image backend: writes go to the change log, reads of moved blocks
                come from image.raw; DIR is on the same disk here, there is one)

For each server: start it, wait until its socket accepts, prefill the whole
export with 1 MiB sequential writes (once, if any read test is selected), run
the selected tests (fio --ioengine=nbd, --time_based, JSON output), stop it.
With --repeat N each cell is the run with the median IOPS.

The report (Markdown) is printed and written to bench/results/fio-<timestamp>.md.
Standard library only: run it with /usr/bin/python3 or .venv/bin/python.

  bench/fio_compare.py --quick --servers memory,ceiling,qemu
  bench/fio_compare.py --repeat 3 --with-compress
  bench/fio_compare.py --tests 'randread-*' --servers b,d

Exit status: 0 if every server started and every fio run succeeded, 1 if not
(the report is written either way), 2 on bad arguments.  Missed §5 targets
change the exit status only with --strict.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EXPORT_SIZE = "1G"
EXPORT_BYTES = 1024**3
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- tests


@dataclasses.dataclass(frozen=True)
class Test:
    name: str
    rw: str  # fio --rw
    bs: str  # fio --bs
    iodepth: int
    numjobs: int = 1  # >1: one NBD connection per job (needs multi-conn)
    default: bool = True  # part of the default selection

    @property
    def reads(self) -> bool:
        return "read" in self.rw

    @property
    def side(self) -> str:
        """Which half of fio's JSON job holds the numbers."""
        return "read" if self.reads else "write"


TESTS = [
    Test("randwrite-4k-qd16", "randwrite", "4k", 16),
    Test("randread-4k-qd16", "randread", "4k", 16),
    Test("randwrite-4k-qd1", "randwrite", "4k", 1),
    Test("randread-4k-qd1", "randread", "4k", 1),
    Test("randwrite-64k-qd16", "randwrite", "64k", 16),
    Test("seqwrite-1M-qd16", "write", "1M", 16),
    Test("seqread-1M-qd16", "read", "1M", 16),
    # Not run unless named in --tests; skipped on servers without multi-conn.
    Test("randwrite-4k-qd16-2conn", "randwrite", "4k", 16, numjobs=2, default=False),
    Test("randread-4k-qd16-2conn", "randread", "4k", 16, numjobs=2, default=False),
]

# DESIGN.md §5 targets: test -> [(anchor key, minimum ratio)]
TARGETS: dict[str, list[tuple[str, float]]] = {
    "randwrite-4k-qd16": [("ceiling", 0.9), ("qemu", 1.0)],
    "randread-4k-qd16": [("ceiling", 0.9), ("qemu", 1.0)],
    "seqwrite-1M-qd16": [("file", 1.0), ("qemu", 1.0)],
    "seqread-1M-qd16": [("memory", 0.9)],
}


# ------------------------------------------------------------------------- servers


class ServerError(Exception):
    """A server failed to start or died; its remaining tests are skipped."""


def wait_for_socket(path: Path, timeout: float, alive=lambda: True) -> None:
    """Poll until a Unix socket accepts a connection (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        if socket_accepts(path):
            return
        if not alive():
            raise ServerError(f"server exited before {path} accepted connections")
        if time.monotonic() > deadline:
            raise ServerError(f"{path} did not accept connections within {timeout:.0f} s")
        time.sleep(0.05)


def socket_accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def proc_cpu_seconds(pids: list[int]) -> float | None:
    """utime+stime of the given processes (all their threads), in seconds."""
    total, seen = 0, False
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
        seen = True
    return total / CLK_TCK if seen else None


def pids_with_arg(needle: str) -> list[int]:
    """Our processes whose command line mentions `needle` (a path unique to this run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each pid, then SIGKILL whatever is still alive after `grace` s."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Server:
    key = ""
    letter = ""
    label = ""
    settings = ""  # how it is started, for the report

    def __init__(self, workdir: Path):
        self.dir = workdir / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "nbd.sock"
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"({self.letter}) {self.label}"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: list[str], timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            log.write(("$ " + shlex.join(argv) + "\n").encode())
            log.flush()
            # Own session: a Ctrl-C on the terminal reaches us, and we stop it.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        wait_for_socket(self.sock, timeout, self.alive)

    def after_prefill(self, ingest_mibs: float, seconds: float) -> None:
        """Called once the prefill is written (the image backend waits for its mover)."""

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class NbdkitMemory(Server):
    key, letter, label = "memory", "a", "nbdkit memory"
    settings = f"nbdkit -f --exit-with-parent -U SOCK memory {EXPORT_SIZE}"

    def start(self) -> None:
        self._spawn(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "memory", EXPORT_SIZE]
        )


class PythonCeiling(Server):
    key, letter, label = "ceiling", "b", "py bytearray SER_ALL_REQ (ceiling)"
    settings = (
        f"nbdkit -f --exit-with-parent -U SOCK python "
        f"bench/anchor_bytearray_plugin.py size={EXPORT_SIZE}"
    )

    def start(self) -> None:
        self._spawn_plugin(BENCH_DIR / "anchor_bytearray_plugin.py")

    def _spawn_plugin(self, plugin) -> None:
        self._spawn(["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "python", str(plugin),
                     f"size={EXPORT_SIZE}"])


class QemuNbd(Server):
    key, letter, label = "qemu", "c", "qemu-nbd qcow2 wb"
    settings = (
        "qemu-img create -f qcow2 IMG 1G; qemu-nbd -f qcow2 --cache=writeback "
        "--shared=8 --persistent -k SOCK IMG"
    )

    def start(self) -> None:
        img = self.dir / "disk.qcow2"
        run_checked(["qemu-img", "create", "-q", "-f", "qcow2", str(img), EXPORT_SIZE])
        self._spawn(
            [
                "qemu-nbd",
                "-f",
                "qcow2",
                "--cache=writeback",
                "--shared=8",
                "--persistent",
                "-k",
                str(self.sock),
                str(img),
            ]
        )


class NbdkitFile(Server):
    """nbdkit's C `file` plugin over a fresh sparse file: pwrite/pread into the page cache,
    the same path a log in segment files takes (anchor for 1 MiB sequential write)."""

    key, letter, label = "file", "f", "nbdkit file"
    settings = f"truncate -s {EXPORT_SIZE} IMG; nbdkit -f --exit-with-parent -U SOCK file IMG"

    def start(self) -> None:
        img = self.dir / "disk.img"
        img.unlink(missing_ok=True)
        run_checked(["truncate", "-s", EXPORT_SIZE, str(img)])
        self._spawn(["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "file", str(img)])


class Blockrep(Server):
    key, letter, label = "blockrep", "d", "blockrep"
    create_args: ClassVar[list[str]] = []
    blockrep_bin = REPO_DIR / ".venv" / "bin" / "blockrep"

    @property
    def settings(self) -> str:  # type: ignore[override]
        extra = " ".join(self.create_args)
        return (
            f"blockrep create VOL --size {EXPORT_SIZE}{' ' + extra if extra else ''}; "
            f"blockrep serve VOL --socket SOCK"
        )

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.vol = self.dir / "vol"
        self.started = False
        self.env: dict | None = None  # environment of `blockrep serve` (None: ours)

    def _blockrep(self, *args: str, timeout: float) -> tuple[int, str]:
        """Run a blockrep command; (exit status, its stderr).  Output goes to a file,
        not a pipe: a daemonising `serve` must not be able to hold our pipe open."""
        argv = [str(self.blockrep_bin), *args]
        errfile = self.dir / "cmd.err"
        with open(self.log, "ab") as log, open(errfile, "wb") as err:
            log.write(("$ " + shlex.join(argv) + "\n").encode())
            log.flush()
            try:
                rc = subprocess.run(
                    argv,
                    check=False,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=err,
                    timeout=timeout,
                    env=self.env,
                ).returncode
            except subprocess.TimeoutExpired as e:
                raise ServerError(f"{shlex.join(argv)} timed out after {timeout:.0f} s") from e
        errtext = errfile.read_text(errors="replace")
        with open(self.log, "a") as log:
            log.write(errtext)
        return rc, one_line(errtext)

    def start(self) -> None:
        self.create()
        self.serve()

    def create(self) -> None:
        if not os.access(self.blockrep_bin, os.X_OK):
            raise ServerError(f"{self.blockrep_bin} not found (run scripts/bootstrap.sh)")
        rc, err = self._blockrep(
            "create", str(self.vol), "--size", EXPORT_SIZE, *self.create_args, timeout=120
        )
        if rc != 0:
            raise ServerError(f"blockrep create failed (exit {rc}): {err}")

    def serve(self) -> None:
        self.started = True  # from here on, stop() must run
        rc, err = self._blockrep("serve", str(self.vol), "--socket", str(self.sock), timeout=120)
        if rc != 0:
            raise ServerError(f"blockrep serve failed (exit {rc}): {err}")
        wait_for_socket(self.sock, 30, self.alive)

    def pids(self) -> list[int]:
        # The daemon is not our child: find it by the paths of this run on its command line.
        return pids_with_arg(str(self.vol)) or pids_with_arg(str(self.sock))

    def alive(self) -> bool:
        return bool(self.pids()) or socket_accepts(self.sock)

    def log_tail(self, lines: int = 5) -> str:
        # `blockrep serve` keeps its own log in the volume directory.
        try:
            text = (self.vol / "server.log").read_text(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        except OSError:
            return super().log_tail(lines)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            rc, err = self._blockrep("stop", str(self.vol), timeout=60)
            if rc != 0:
                print(f"warning: blockrep stop exited {rc}: {err}", file=sys.stderr)
        except ServerError as e:
            print(f"warning: {e}", file=sys.stderr)
        # Whatever still runs with our volume path on its command line is ours.
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.pids()
        if left:
            print(
                f"warning: blockrep server still running after stop, killing {left}",
                file=sys.stderr,
            )
            kill_pids(left)


class BlockrepBase(Blockrep):
    """Another blockrep build (--blockrep-base PATH), e.g. the commit before a change, measured
    in the same run as (d) so that before/after is one comparison."""

    key, letter, label = "blockrep-base", "g", "blockrep (base build)"
    blockrep_bin = Path("blockrep")


class BlockrepZstd(Blockrep):
    key, letter, label = "blockrep-zstd", "e", "blockrep zstd"
    create_args: ClassVar[list[str]] = ["--compress", "zstd"]


class BlockrepImage(Blockrep):
    """The image backend (docs/IMAGE.md): the change log in a directory beside the volume.
    The prefill is moved into the image before the read tests (the mover runs while fio
    prefills and drains when clients are quiet), so reads measure image.raw."""

    key, letter, label = "blockrep-image", "i", "blockrep image"

    @property
    def settings(self) -> str:  # type: ignore[override]
        return (f"blockrep create VOL --size {EXPORT_SIZE} --backend image --journal DIR; "
                "blockrep serve VOL --socket SOCK")

    mover_note = ""

    def after_prefill(self, ingest_mibs: float, seconds: float) -> None:
        """Wait until the mover has moved the prefill into the image (reads then measure the
        image) and report its sustained rate: bytes moved from the start of the prefill to the
        moment the change log is empty, against the prefill's ingest rate."""
        t0 = time.monotonic()
        info: dict = {}
        while time.monotonic() - t0 < 300:
            out = subprocess.run([str(self.blockrep_bin), "info", str(self.vol), "--json"], check=False,
                                 capture_output=True, text=True, timeout=60)
            info = json.loads(out.stdout) if out.returncode == 0 else {}
            if info.get("image_current"):
                break
            time.sleep(0.2)
        total = seconds + time.monotonic() - t0
        moved = info.get("image_moved_bytes", 0) / (1 << 20)
        BlockrepImage.mover_note = (
            f"image backend mover: {moved:.0f} MiB moved in {total:.1f} s from the start of the prefill "
            f"= {moved / total:.0f} MiB/s sustained, vs ingest {ingest_mibs:.0f} MiB/s "
            f"(ratio {moved / total / ingest_mibs:.2f}); change log and image on the same disk")
        say("   " + BlockrepImage.mover_note)

    def create(self) -> None:
        shutil.rmtree(self.dir / "journal", ignore_errors=True)
        rc, err = self._blockrep("create", str(self.vol), "--size", EXPORT_SIZE, "--backend", "image",
                                 "--journal", str(self.dir / "journal"), timeout=120)
        if rc != 0:
            raise ServerError(f"blockrep create failed (exit {rc}): {err}")


# ------------------------------------------------------- thread models (--thread-models)

THREAD_MODELS = ("serialize_all_requests", "serialize_requests", "parallel")
TM_SHORT = {
    "serialize_all_requests": "SER_ALL_REQ",
    "serialize_requests": "SER_REQ",
    "parallel": "PARALLEL",
}
TM_TESTS = (
    "randwrite-4k-qd16",
    "randread-4k-qd16",
    "randwrite-4k-qd16-2conn",
    "randread-4k-qd16-2conn",
)


class PythonCeilingTM(PythonCeiling):
    """The ceiling plugin under a given thread model. SERIALIZE_ALL_REQUESTS runs the anchor
    file itself; another model runs a copy of it in the run's directory with thread_model()
    redefined at its end (nothing else differs)."""

    def __init__(self, workdir: Path, thread_model: str):
        self.thread_model = thread_model
        self.key = f"ceiling:{thread_model}"
        self.label = f"py bytearray {TM_SHORT[thread_model]}"
        super().__init__(workdir)

    @property
    def settings(self) -> str:  # type: ignore[override]
        return PythonCeiling.settings + (
            ""
            if self.thread_model == "serialize_all_requests"
            else f" (copy, thread_model() -> THREAD_MODEL_{self.thread_model.upper()})"
        )

    def start(self) -> None:
        plugin = BENCH_DIR / "anchor_bytearray_plugin.py"
        if self.thread_model != "serialize_all_requests":
            src = plugin.read_text()
            plugin = self.dir / plugin.name
            plugin.write_text(
                src + "\n\n# fio_compare.py --thread-models: the same plugin under another model\n"
                "def thread_model():\n"
                f"    return nbdkit.THREAD_MODEL_{self.thread_model.upper()}\n"
            )
        self._spawn_plugin(plugin)


class BlockrepTM(Blockrep):
    """One blockrep volume, served by `blockrep serve` under the plugin's thread_model= of the
    cell being measured: `use(model)` restarts the server when the model changes, so every
    model sees the same volume. BLOCKREP_NBDKIT points `serve` at a two-line wrapper that
    execs nbdkit with `thread_model=MODEL` appended to the plugin's parameters."""

    key, letter, label = "blockrep", "d", "blockrep"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.thread_model: str | None = None

    @property
    def settings(self) -> str:  # type: ignore[override]
        return (
            f"blockrep create VOL --size {EXPORT_SIZE}; blockrep serve VOL --socket SOCK with "
            f"thread_model=MODEL appended to nbdkit's plugin parameters (BLOCKREP_NBDKIT wrapper)"
        )

    def start(self) -> None:
        self.create()

    def stop(self) -> None:
        super().stop()
        self.thread_model = None

    def use(self, thread_model: str) -> None:
        if self.thread_model == thread_model and self.alive():
            return
        self.stop()
        wrapper = self.dir / f"nbdkit-{thread_model}"
        nbdkit = shutil.which("nbdkit") or "nbdkit"
        wrapper.write_text(f'#!/bin/sh\nexec {nbdkit} "$@" thread_model={thread_model}\n')
        wrapper.chmod(0o755)
        self.env = dict(os.environ, BLOCKREP_NBDKIT=str(wrapper))
        self.serve()
        self.thread_model = thread_model


SERVERS: list[type[Server]] = [
    NbdkitMemory, PythonCeiling, QemuNbd, NbdkitFile, Blockrep, BlockrepImage, BlockrepBase, BlockrepZstd
]
BLOCKREP_KEYS = ("blockrep", "blockrep-image", "blockrep-base", "blockrep-zstd")


# ----------------------------------------------------------------------------- fio


@dataclasses.dataclass
class Result:
    iops: float = 0.0
    mibs: float = 0.0
    lat_mean_us: float = 0.0
    lat_p99_us: float = 0.0
    cpu_us_per_op: float | None = None
    error: str = ""
    runs: list[float] = dataclasses.field(default_factory=list)  # IOPS of every repeat


def run_checked(argv: list[str], timeout: float = 120) -> str:
    cp = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise ServerError(f"{shlex.join(argv)} failed: {cp.stderr.strip()}")
    return cp.stdout


def fio(server: Server, test: Test, runtime: int | None, out: Path, extra: list[str]) -> Result:
    """One fio run; runtime None = a single pass over the whole export (prefill)."""
    argv = [
        "fio",
        f"--name={test.name}",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        f"--rw={test.rw}",
        f"--bs={test.bs}",
        f"--iodepth={test.iodepth}",
        f"--numjobs={test.numjobs}",
        "--group_reporting",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--output={out}",
        *extra,
    ]
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime}"]
    pids = server.pids()
    cpu0 = proc_cpu_seconds(pids)
    out.unlink(missing_ok=True)
    try:
        cp = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=(runtime or 120) + 120,
        )
    except subprocess.TimeoutExpired:
        return Result(error="fio timed out")
    cpu1 = proc_cpu_seconds(pids)
    try:
        text = out.read_text()
        data = json.loads(text[text.index("{") :])  # fio may print notes before the JSON
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return Result(error=f"fio exit {cp.returncode}, no JSON: {one_line(cp.stderr)}")
    side = job[test.side]
    lat = side.get("lat_ns", {})
    r = Result(
        iops=float(side["iops"]),
        mibs=float(side["bw"]) / 1024.0,  # fio reports KiB/s
        lat_mean_us=float(lat.get("mean", 0.0)) / 1000.0,
        lat_p99_us=float(lat.get("percentile", {}).get("99.000000", 0.0)) / 1000.0,
    )
    ios = int(side.get("total_ios", 0))
    if cpu0 is not None and cpu1 is not None and ios:
        r.cpu_us_per_op = (cpu1 - cpu0) * 1e6 / ios
    if cp.returncode != 0 or job.get("error"):
        r.error = f"fio exit {cp.returncode}, job error {job.get('error')}: {one_line(cp.stderr)}"
    elif ios == 0:
        r.error = "fio completed no I/O"
    r.runs = [r.iops]
    return r


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def can_multi_conn(server: Server) -> bool | None:
    if not shutil.which("nbdinfo"):
        return None
    try:
        out = subprocess.run(
            ["nbdinfo", "--json", server.uri],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        exports = json.loads(out)["exports"]
        return bool(exports[0].get("can_multi_conn"))
    except (ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None


def median_run(results: list[Result]) -> Result:
    """The run with the median IOPS (the lower middle one for an even count)."""
    ok = [r for r in results if not r.error]
    if not ok:
        return results[-1]
    ok.sort(key=lambda r: r.iops)
    chosen = dataclasses.replace(ok[(len(ok) - 1) // 2])
    chosen.runs = [r.iops for r in results if not r.error]
    errors = [r.error for r in results if r.error]
    if errors:
        chosen.error = f"{len(errors)} of {len(results)} runs failed: {errors[0]}"
    return chosen


def bench_server(
    server: Server, tests: list[Test], args, extra: list[str], results: dict, notes: list[str]
) -> None:
    name = server.name
    say(f"== {name}: starting")
    t0 = time.monotonic()
    server.start()
    say(f"   socket accepts after {time.monotonic() - t0:.1f} s: {server.uri}")
    multi = None
    if any(t.numjobs > 1 for t in tests):
        multi = can_multi_conn(server)
    prepare(server, tests, args, extra)
    out = server.dir / "fio.json"
    logged = False
    for test in tests:
        if test.numjobs > 1 and multi is False:
            results[(test.name, server.key)] = Result(error="skipped: no multi-conn")
            continue
        runs = []
        for i in range(args.repeat):
            if not server.alive():
                raise ServerError(f"server died before {test.name}; log: {server.log_tail()}")
            r = fio(server, test, args.runtime, out, extra)
            runs.append(r)
            status = f"ERROR {r.error}" if r.error else ""
            say(
                f"   {test.name:<24} run {i + 1}/{args.repeat}: {r.iops:>9.0f} IOPS "
                f"{r.mibs:>8.1f} MiB/s {status}"
            )
        results[(test.name, server.key)] = median_run(runs)
        if any(r.error for r in runs) and not logged:
            logged = True
            notes.append(f"{name}: server log after the first fio error: {server.log_tail()}")
    if not server.alive():
        notes.append(
            f"{name}: server was no longer running after the last test; log: {server.log_tail()}"
        )


def _report_head(title: str, meta: dict) -> list[str]:
    """The first lines of a report: what ran, where, with which tools."""
    return [f"# {title}, {meta['timestamp']}", "", f"- command: `{meta['command']}`", f"- host: {meta['host']}",
            f"- tools: {meta['tools']}", f"- blockrep: {meta['blockrep']}"]


def prepare(server: Server, tests: list[Test], args, extra: list[str]) -> None:
    """Prefill (if a read test is selected, or before preconditioning), then precondition."""
    out = server.dir / "fio.json"

    def run(test: Test, what: str) -> tuple[Result, float]:
        t0 = time.monotonic()
        r = fio(server, test, None, out, extra)
        if r.error:
            raise ServerError(f"{what} failed: {r.error}")
        return r, time.monotonic() - t0

    if any(t.reads for t in tests) or args.precondition:
        r, dt = run(Test("prefill-1M", "write", "1M", 16), "prefill")
        say(f"   prefill: 1 GiB in {dt:.1f} s ({r.mibs:.0f} MiB/s)")
        server.after_prefill(r.mibs, dt)
    if args.precondition:
        # Steady state, as SNIA's performance test spec asks of any storage under test: one
        # random overwrite pass of the whole export, for every server alike. A log-structured
        # store reaches its steady state (live data, collector, recycled segment files) only
        # after overwrites; an in-place store is unaffected.
        _, dt = run(Test("precondition-64k", "randwrite", "64k", 16), "preconditioning")
        say(f"   precondition: 1 GiB random overwrite in {dt:.1f} s")


def bench_thread_models(
    workdir: Path,
    tests: list[Test],
    args,
    extra: list[str],
    results: dict,
    notes: list[str],
    servers: list,
) -> list[tuple[str, str]]:
    """--thread-models: the ceiling under SERIALIZE_ALL_REQUESTS and SERIALIZE_REQUESTS and
    blockrep under each of THREAD_MODELS, interleaved: every repeat runs every variant once
    (in an order rotated by one each repeat), each variant running all the tests. The two
    ceilings stay up for the whole run (idle, they use no CPU); blockrep is one volume,
    restarted under the model of the variant measured, so no idle blockrep server (collector,
    checkpoints) runs beside a measurement. Results are keyed (test, variant key); returns the
    variants as (key, label), in the report's order."""
    ceilings = {}
    for tm in ("serialize_all_requests", "serialize_requests"):
        c = PythonCeilingTM(workdir, tm)
        servers.append(c)
        say(f"== {c.name}: starting")
        c.start()
        prepare(c, tests, args, extra)
        ceilings[tm] = c
    br = BlockrepTM(workdir)
    servers.append(br)
    say(f"== {br.name}: creating the volume")
    br.start()
    br.use(THREAD_MODELS[0])
    prepare(br, tests, args, extra)
    br.stop()
    variants: list[tuple[str, str, Server, str | None]] = [
        (c.key, c.name, c, None) for c in ceilings.values()
    ] + [(f"blockrep:{tm}", f"(d) blockrep {TM_SHORT[tm]}", br, tm) for tm in THREAD_MODELS]
    runs: dict[tuple[str, str], list[Result]] = {}
    out = br.dir / "fio.json"
    for i in range(args.repeat):
        k = i % len(variants)
        for key, name, server, tm in variants[k:] + variants[:k]:
            if tm is not None:
                t0 = time.monotonic()
                br.use(tm)
                say(f"== {name}: served after {time.monotonic() - t0:.1f} s")
            else:
                br.stop()  # an idle blockrep server (collector, checkpoints) is not idle
            for test in tests:
                if not server.alive():
                    raise ServerError(f"{name} died before {test.name}; log: {server.log_tail()}")
                r = fio(server, test, args.runtime, out, extra)
                runs.setdefault((test.name, key), []).append(r)
                say(
                    f"   {name:<28} {test.name:<24} run {i + 1}/{args.repeat}: "
                    f"{r.iops:>9.0f} IOPS {('ERROR ' + r.error) if r.error else ''}"
                )
    for cell, rs in runs.items():
        results[cell] = median_run(rs)
        if any(r.error for r in rs):
            notes.append(f"{cell[1]} {cell[0]}: {next(r.error for r in rs if r.error)}")
    return [(key, name) for key, name, _, _ in variants]


def tm_report(
    results: dict, tests: list[Test], variants, args, meta: dict, notes, start_errors
) -> str:
    """The --thread-models report: IOPS per variant and test, ratios to the ceiling (the anchor
    bytearray plugin under SERIALIZE_ALL_REQUESTS, 1 connection) and 2 connections / 1."""
    base = "ceiling:serialize_all_requests"
    L = _report_head("blockrep thread models, fio comparison", meta)
    L.append(
        f"- fio: `--ioengine=nbd --uri=nbd+unix:///?socket=SOCK --time_based "
        f"--runtime={args.runtime}`, 1 GiB exports prefilled and preconditioned once; "
        f"2conn = numjobs=2 (one NBD connection per job, iodepth 16 each)"
    )
    L.append(
        f"- repeats: {args.repeat}, interleaved (each repeat runs every variant); each cell is "
        f"the run with the median IOPS"
    )
    L.append(f"- load average before / after: {meta['load_before']} / {meta['load_after']}")
    L.append("")
    L.append(
        "| server | " + " | ".join(t.name for t in tests) + " | 2conn ÷ 1conn (w / r) |"
    )
    L.append("|---|" + "---:|" * (len(tests) + 1))

    def iops(test: str, key: str) -> float | None:
        r = results.get((test, key))
        return r.iops if r and r.iops and not r.error else None

    for key, name in variants:
        cells = []
        for t in tests:
            v = iops(t.name, key)
            one = iops(t.name.removesuffix("-2conn"), base)
            cells.append(
                "—" if v is None else f"{v / 1000:.1f}k" + (f" ({v / one:.2f})" if one else "")
            )
        two = []
        for rw in ("randwrite", "randread"):
            a, b = iops(f"{rw}-4k-qd16", key), iops(f"{rw}-4k-qd16-2conn", key)
            two.append("—" if not a or not b else f"{b / a:.2f}")
        L.append(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(two)} |")
    L.append("")
    L.append(
        "In brackets: IOPS ÷ the ceiling's (b) single-connection IOPS of the same rw "
        "(the anchor bytearray plugin under SERIALIZE_ALL_REQUESTS, 1 connection)."
    )
    L.append("")
    L.append("| test | server | IOPS | lat mean µs | lat p99 µs | server CPU µs/op | IOPS of each run |")
    L.append("|---|---|---:|---:|---:|---:|---|")
    for t in tests:
        for key, name in variants:
            r = results.get((t.name, key))
            if r is None:
                continue
            cpu = "—" if r.cpu_us_per_op is None else f"{r.cpu_us_per_op:.1f}"
            L.append(
                f"| {t.name} | {name} | {fmt_iops(r.iops)} | {r.lat_mean_us:.1f} | "
                f"{r.lat_p99_us:.1f} | {cpu} | {', '.join(fmt_iops(x) for x in r.runs)}"
                + (f" ({r.error})" if r.error else "")
                + " |"
            )
    L.append("")
    if notes or start_errors:
        L.append("## Anomalies")
        L.append("")
        L.extend(f"- {k}: {e}" for k, e in start_errors.items())
        L.extend(f"- {n}" for n in notes)
        L.append("")
    return "\n".join(L)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------- report


def short_status(r: Result) -> str:
    """Table cell for a result that has no numbers."""
    for word in ("skipped", "not run"):
        if r.error.startswith(word):
            return word
    return "ERR"


def fmt_iops(v: float) -> str:
    return f"{v:.0f}"


def ratio(results: dict, test: str, num: str, den: str) -> float | None:
    a, b = results.get((test, num)), results.get((test, den))
    if not a or not b or a.error or b.error or not b.iops:
        return None
    return a.iops / b.iops


def verdict(results: dict, test: str, key: str) -> tuple[str, str, bool | None]:
    """(target text, result text, passed) for a blockrep variant on a test."""
    targets = TARGETS.get(test)
    if not targets:
        return "—", "—", None
    names = {"ceiling": "(b)", "qemu": "(c)", "memory": "(a)", "file": "(f)"}
    text = ", ".join(f"≥ {m:.1f}× {names[a]}" for a, m in targets)
    misses, unknown = [], False
    for anchor, minimum in targets:
        r = ratio(results, test, key, anchor)
        if r is None:
            unknown = True
        elif r < minimum:
            misses.append(f"{r:.2f}× {names[anchor]} < {minimum:.1f}")
    if misses:
        return text, "**FAIL** (" + "; ".join(misses) + ")", False
    if unknown:
        return text, "n/a", None
    return text, "pass", True


def report(
    results: dict,
    tests: list[Test],
    servers: list[Server],
    args,
    meta: dict,
    notes: list[str],
    start_errors: dict[str, str],
) -> str:
    L = _report_head("blockrep fio comparison", meta)
    L.append(
        f"- fio: `--ioengine=nbd --uri=nbd+unix:///?socket=SOCK --time_based "
        f"--runtime={args.runtime} --lat_percentiles=1`, 1 GiB exports, one server at a time; "
        f"1 MiB sequential prefill of the whole export before the tests"
        + (
            f"; `--buffer_compress_percentage={args.compressible} --refill_buffers`"
            if args.compressible is not None
            else "; fio's default (incompressible) buffers"
        )
    )
    L.append(f"- repeats: {args.repeat} (each cell is the run with the median IOPS)")
    L.append(f"- load average before / after: {meta['load_before']} / {meta['load_after']}")
    L.append("")
    L.append("Servers:")
    L.append("")
    for s in servers:
        line = f"- {s.name}: `{s.settings}`"
        if s.key in start_errors:
            line += f" — **error: {start_errors[s.key]}**"
        L.append(line)
    L.append("")

    # Table 1: per test, IOPS and MiB/s per server.
    L.append("## IOPS and MiB/s per server")
    L.append("")
    L.append("| test | " + " | ".join(s.name for s in servers) + " |")
    L.append("|---|" + "---:|" * len(servers))
    for t in tests:
        cells = []
        for s in servers:
            r = results.get((t.name, s.key))
            if r is None:
                cells.append("—")
            elif r.error and not r.iops:
                cells.append(short_status(r))
            else:
                cells.append(
                    f"{fmt_iops(r.iops)} IOPS · {r.mibs:.1f} MiB/s" + (" (ERR)" if r.error else "")
                )
        L.append(f"| {t.name} | " + " | ".join(cells) + " |")
    L.append("")

    # Table 2: blockrep ratios and DESIGN §5 targets.
    brs = [s for s in servers if s.key in BLOCKREP_KEYS]
    passed = failed = 0
    if brs:
        L.append("## blockrep against the anchors (DESIGN.md §5 targets)")
        L.append("")
        L.append(
            "Ratios are IOPS ratios (equal to MiB/s ratios, same block size). "
            "(a) nbdkit memory, (b) Python-plugin ceiling, (c) qemu-nbd qcow2, (f) nbdkit file."
        )
        L.append("")
        L.append(
            "| test | server | IOPS | MiB/s | ÷ (b) ceiling | ÷ (c) qemu-nbd | ÷ (a) memory "
            "| ÷ (f) file | §5 target | result |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
        for t in tests:
            for s in brs:
                r = results.get((t.name, s.key))
                if r is None:
                    continue
                rs = [ratio(results, t.name, s.key, a) for a in ("ceiling", "qemu", "memory", "file")]
                target, res, ok = verdict(results, t.name, s.key)
                if r.error and not r.iops:
                    res = short_status(r)
                    if res != "skipped" and t.name in TARGETS:
                        ok, res = False, f"**FAIL** ({res})"
                    else:
                        ok = None
                passed += ok is True
                failed += ok is False
                L.append(
                    f"| {t.name} | {s.name} | "
                    + (f"{fmt_iops(r.iops)} | {r.mibs:.1f}" if r.iops else "— | —")
                    + " | "
                    + " | ".join("—" if x is None else f"{x:.2f}" for x in rs)
                    + f" | {target} | {res} |"
                )
        L.append("")
        L.append(f"Targets: {passed} pass, {failed} fail.")
        L.append("")
    meta["targets_failed"] = failed

    # Table 3: the detail, as in anchors/perf-baseline.md.
    L.append("## Detail")
    L.append("")
    L.append(
        "| test | server | IOPS | MiB/s | lat mean µs | lat p99 µs | server CPU µs/op "
        "| IOPS ratio to (a) | IOPS of each run |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for t in tests:
        for s in servers:
            r = results.get((t.name, s.key))
            if r is None:
                continue
            if r.error and not r.iops:
                why = short_status(r) if s.key in start_errors else r.error
                L.append(f"| {t.name} | {s.name} | — | — | — | — | — | — | {why} |")
                continue
            ra = ratio(results, t.name, s.key, "memory")
            cpu = "—" if r.cpu_us_per_op is None else f"{r.cpu_us_per_op:.1f}"
            runs = ", ".join(fmt_iops(x) for x in r.runs)
            if r.error:
                runs += f" ({r.error})"
            L.append(
                f"| {t.name} | {s.name} | {fmt_iops(r.iops)} | {r.mibs:.1f} | "
                f"{r.lat_mean_us:.1f} | {r.lat_p99_us:.1f} | {cpu} | "
                f"{'—' if ra is None else f'{ra:.2f}'} | {runs} |"
            )
    L.append("")
    if notes or start_errors:
        L.append("## Anomalies")
        L.append("")
        for k, e in start_errors.items():
            L.append(f"- {k}: {e}")
        for n in notes:
            L.append(f"- {n}")
        for (tname, skey), r in results.items():
            if r.error and short_status(r) == "ERR" or (r.iops and r.error):
                L.append(f"- {tname} on {skey}: {r.error}")
        L.append("")
        L.append("Server logs are in the temporary directory (kept with --keep).")
        L.append("")
    return "\n".join(L)


def tool_versions() -> str:
    def first(argv):
        try:
            return (
                subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return f"{argv[0]} ?"

    return ", ".join(
        [
            first(["fio", "--version"]),
            first(["nbdkit", "--version"]),
            first(["qemu-nbd", "--version"]),
        ]
    )


def blockrep_version() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        rev = ""
    return f"git {rev or '(no commit)'}, {Blockrep.blockrep_bin}"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="fio (nbd engine) comparison of blockrep against anchor NBD servers.",
        epilog="servers: "
        + ", ".join(f"{s.letter}={s.key}" for s in SERVERS)
        + "; tests: "
        + ", ".join(t.name for t in TESTS),
    )
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--quick", action="store_true", help="runtime 3 s")
    p.add_argument(
        "--no-precondition",
        dest="precondition",
        action="store_false",
        help="skip the steady-state random overwrite pass before the tests (done for every server)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per cell, median IOPS (default 1)")
    p.add_argument("--tests", default="", help="comma-separated test names or globs")
    p.add_argument("--servers", default="", help="comma-separated server keys or letters")
    p.add_argument(
        "--with-compress",
        action="store_true",
        help="also run (e) blockrep created with --compress zstd",
    )
    p.add_argument(
        "--compressible",
        type=int,
        metavar="PCT",
        help="make fio's buffers PCT%% compressible (default: fio's random buffers)",
    )
    p.add_argument(
        "--blockrep",
        type=Path,
        default=Blockrep.blockrep_bin,
        help="blockrep executable (default: .venv/bin/blockrep)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the temporary directory for images and sockets",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.md")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--strict", action="store_true", help="exit 1 if a §5 target is missed")
    p.add_argument("--list", action="store_true", help="list tests and servers and exit")
    p.add_argument(
        "--blockrep-base",
        type=Path,
        help="also run (g): blockrep from this executable (another build), same settings as (d)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="every repeat starts every server afresh (fresh image / volume) and runs all the "
        "tests, servers in an order rotated each repeat; the cell is the median run",
    )
    p.add_argument(
        "--thread-models",
        action="store_true",
        help="instead of the servers: the ceiling under SERIALIZE_ALL_REQUESTS and "
        "SERIALIZE_REQUESTS and blockrep under each thread_model=, interleaved "
        f"(default tests: {', '.join(TM_TESTS)})",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.runtime = 3
    if args.runtime < 1 or args.repeat < 1:
        p.error("--runtime and --repeat must be at least 1")

    if args.tests:
        pats = [x.strip() for x in args.tests.split(",") if x.strip()]
        tests = [t for t in TESTS if any(fnmatch.fnmatchcase(t.name, pat) for pat in pats)]
        unknown = [pat for pat in pats if not any(fnmatch.fnmatchcase(t.name, pat) for t in TESTS)]
        if unknown or not tests:
            p.error(f"unknown tests {unknown or pats}; known: {', '.join(t.name for t in TESTS)}")
    elif args.thread_models:
        tests = [t for t in TESTS if t.name in TM_TESTS]
    else:
        tests = [t for t in TESTS if t.default]
    if args.servers:
        wanted = [x.strip() for x in args.servers.split(",") if x.strip()]
        by = {s.key: s for s in SERVERS} | {s.letter: s for s in SERVERS}
        unknown = [w for w in wanted if w not in by]
        if unknown:
            p.error(
                f"unknown servers {unknown}; known: "
                + ", ".join(f"{s.letter}={s.key}" for s in SERVERS)
            )
        keys = {by[w].key for w in wanted}
        if args.with_compress:
            keys.add("blockrep-zstd")
        servers = [s for s in SERVERS if s.key in keys]
    else:
        servers = [s for s in SERVERS if s.key != "blockrep-zstd" or args.with_compress]
        servers = [s for s in servers if s.key != "blockrep-base" or args.blockrep_base]
    if args.blockrep_base and BlockrepBase not in servers:
        servers.append(BlockrepBase)
    return args, tests, servers


def main(argv=None) -> int:
    args, tests, server_classes = parse_args(argv)
    if args.list:
        for t in TESTS:
            print(
                f"test   {t.name:<26} rw={t.rw} bs={t.bs} iodepth={t.iodepth} "
                f"numjobs={t.numjobs}{'' if t.default else '  (not run by default)'}"
            )
        for s in SERVERS:
            print(f"server {s.letter} {s.key:<14} {s.label}")
        return 0
    missing = [x for x in ("fio", "nbdkit", "qemu-nbd", "qemu-img") if not shutil.which(x)]
    if missing:
        print(
            f"fio_compare: error: missing {', '.join(missing)} (apt install fio nbdkit "
            f"nbdkit-plugin-python qemu-utils)",
            file=sys.stderr,
        )
        return 2
    Blockrep.blockrep_bin = args.blockrep.resolve() if args.blockrep.exists() else args.blockrep
    if args.blockrep_base:
        BlockrepBase.blockrep_bin = args.blockrep_base.resolve()

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below stops every server.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with INT ignored
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, _raise)

    workdir = Path(tempfile.mkdtemp(prefix="blockrep-fio-", dir=args.workdir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(
            ["bench/fio_compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "host": f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()} ({sys.executable})",
        "tools": tool_versions(),
        "blockrep": blockrep_version(),
        "load_before": loadavg(),
    }
    results: dict[tuple[str, str], Result] = {}
    notes: list[str] = []
    start_errors: dict[str, str] = {}
    servers: list[Server] = []
    interrupted = False
    variants: list[tuple[str, str]] = []
    try:
        if args.thread_models:
            server_classes = []
            try:
                variants = bench_thread_models(
                    workdir, tests, args, fio_extra(args), results, notes, servers
                )
            except ServerError as e:
                say(f"   {e}")
                start_errors["thread-models"] = one_line(str(e))
        if args.interleave:
            # Every repeat starts every server afresh (new image/volume, own directory) and
            # runs all the tests once, in an order rotated by one each repeat.
            per_run: dict[tuple[str, str], list[Result]] = {}
            reps = args.repeat
            args.repeat = 1
            try:
                for i in range(reps):
                    k = i % len(server_classes)
                    for cls in server_classes[k:] + server_classes[:k]:
                        server = cls(workdir / f"r{i}")
                        servers.append(server)
                        one: dict[tuple[str, str], Result] = {}
                        say(f"-- repeat {i + 1}/{reps}")
                        try:
                            bench_server(server, tests, args, fio_extra(args), one, notes)
                        except ServerError as e:
                            say(f"   {server.name}: {e}")
                            start_errors[server.key] = one_line(str(e))
                        finally:
                            server.stop()
                            say(f"   {server.name}: stopped")
                        for cell, r in one.items():
                            per_run.setdefault(cell, []).append(r)
            finally:
                args.repeat = reps
                for cell, rs in per_run.items():
                    results[cell] = median_run(rs)
                servers[:] = [cls(workdir / "r0") for cls in server_classes] + servers
                del servers[len(server_classes):]
        for cls in server_classes if not args.interleave else []:
            server = cls(workdir)
            servers.append(server)
            try:
                bench_server(server, tests, args, fio_extra(args), results, notes)
            except ServerError as e:
                say(f"   {server.name}: {e}")
                start_errors[server.key] = one_line(str(e))
                for t in tests:
                    results.setdefault((t.name, server.key), Result(error=f"not run: {e}"))
            finally:
                server.stop()
                say(f"   {server.name}: stopped")
    except KeyboardInterrupt as e:
        interrupted = True
        say(f"interrupted ({e or 'Ctrl-C'}); stopping servers")
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as e:  # noqa: BLE001 -- keep stopping the others
                say(f"warning: stopping {server.name}: {e}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta["load_after"] = loadavg()
    if BlockrepImage.mover_note:
        notes.append(BlockrepImage.mover_note)
    if interrupted:
        notes.append("run interrupted; the tables are incomplete")
    if args.thread_models:
        text = tm_report(results, tests, variants, args, meta, notes, start_errors)
    else:
        text = report(results, tests, servers, args, meta, notes, start_errors)
    print(text)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"fio-{'thread-models-' if args.thread_models else ''}{stamp}.md"
        path.write_text(text + "\n")
        say(f"wrote {path}")
    if interrupted:
        return 130
    errors = start_errors or any(
        r.error and not r.error.startswith("skipped") for r in results.values()
    )
    if errors:
        return 1
    if args.strict and meta.get("targets_failed"):
        return 1
    return 0


def fio_extra(args) -> list[str]:
    if args.compressible is None:
        return []
    return [f"--buffer_compress_percentage={args.compressible}", "--refill_buffers"]


if __name__ == "__main__":
    sys.exit(main())
