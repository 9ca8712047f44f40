"""Regression tests for the shutdown and start-up defects of issue 8, end to end: a real nbdkit
started by `blockrep serve`, real clients (libnbd's `nbd` module, raw sockets on VOL/ctl.sock, the
`blockrep` command).

- The control socket: a client that trickles a request a byte at a time, or many idle
  connections, hold up neither `blockrep stop` nor `blockrep snapshot create`.
- Disk full: `stop` refuses to throw away acknowledged writes it cannot make durable (the server
  keeps running, nothing is lost); `stop --force` stops anyway with a warning.
- A `serve` that fails to become ready leaves no nbdkit behind; `stop` finds a server whose pid
  file is empty (/proc).
- A damaged volume.json, or a volume the user may not read: one `blockrep: error:` line.
- serve + stop leaves no traceback in server.log (the readiness probe's BrokenPipeError).
- io_fault= (engine/faults.py) through a real nbdkit: a request whose disk I/O failed gets an
  error reply, never success; later requests work; everything acknowledged and flushed survives.

- The refusal holds while every control-socket client slot is taken (stop waits for a slot).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd
import pytest
from conftest import BLOCKREP, pid_alive, run_blockrep, tree_state
from test_enospc import take_space

from engine import server as engine_server
from engine.errors import ServerError

MiB = 1 << 20
BS = 4096

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs (as in test_enospc.py): the volume on it, a ballast file takes the space."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,mode=0700", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        kill_all_serving(mnt / "vol")
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)


def one_error_line(proc: subprocess.CompletedProcess, what: str) -> str:
    """The command failed with exit 1 and exactly one line on stderr, `blockrep: error: …`."""
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr, f"{what}: a traceback instead of an error line:\n{proc.stderr}"
    assert proc.returncode == 1, f"{what}: exit {proc.returncode}, stderr {proc.stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("blockrep: error: "), \
        f"{what}: expected one 'blockrep: error:' line, got {proc.stderr!r}"
    return lines[0]


def nbdkits_serving(vol: Path) -> list[int]:
    """Live nbdkit processes whose command line serves vol (volume=VOL), found in /proc."""
    want = f"volume={vol}".encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and b"nbdkit" in os.path.basename(args[0]) and want in args and pid_alive(int(d)):
            found.append(int(d))
    return found


def kill_all_serving(vol: Path) -> None:
    """Last resort at teardown: no nbdkit of this test outlives it, pid file or not."""
    for pid in nbdkits_serving(vol):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while nbdkits_serving(vol) and time.monotonic() < deadline:
        time.sleep(0.02)


def assert_no_traceback_in_log(vol: Path) -> None:
    log = vol / "server.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    assert "Traceback" not in text, f"{log} has a traceback:\n{text[-3000:]}"


def timed_blockrep(*args, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = run_blockrep(*args, timeout=timeout)
    return r, time.monotonic() - t0


def nbdkit_wrapper(tmp_path: Path, name: str, body: str) -> Path:
    """An executable standing in for nbdkit (BLOCKREP_NBDKIT / engine.server.NBDKIT) that
    rewrites the command line and execs the real nbdkit (so /proc shows nbdkit)."""
    w = tmp_path / name
    w.write_text(f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\n{body}\n"
                 f"os.execv({shutil.which('nbdkit')!r}, [{shutil.which('nbdkit')!r}, *args])\n")
    w.chmod(0o755)
    return w


def connect_unix(path: Path, timeout: float = 10) -> socket.socket:
    """A connected Unix socket; retries while the listen backlog is full (EAGAIN)."""
    deadline = time.monotonic() + timeout
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        try:
            c.connect(str(path))
            return c
        except BlockingIOError:
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Trickler(threading.Thread):
    """A control-socket client that sends a (valid) request one byte every `every` seconds and
    never finishes it. `closed_at`: when the server closed the connection (monotonic), or None."""

    def __init__(self, path: Path, every: float = 2.0):
        super().__init__(daemon=True)
        self.sock = connect_unix(path)
        self.connected_at = time.monotonic()
        self.every = every
        self.sent = 0
        self.closed_at: float | None = None
        self.done = threading.Event()

    def run(self):
        payload = json.dumps({"cmd": "snapshot_create", "args": {"name": "trickled"}}).encode()
        try:
            for b in payload[:-1]:  # never the last byte, never a shutdown(SHUT_WR)
                self.sock.send(bytes([b]))
                self.sent += 1
                if self.done.wait(self.every):
                    return
            self.done.wait()
        except OSError:
            self.closed_at = time.monotonic()
        finally:
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# 1. the control socket: nobody holds up stop or snapshot create

def test_stop_is_not_held_up_by_a_client_trickling_bytes_on_the_control_socket(make_server):
    s = make_server()
    h = s.connect()
    data = random.randbytes(256 * 1024)
    h.pwrite(data, 0)  # acknowledged, not flushed: stop must make it durable
    t = Trickler(s.vol / "ctl.sock")
    t.start()
    try:
        time.sleep(0.5)
        snap, took = timed_blockrep("snapshot", "create", s.vol, "--name", "while-trickling", timeout=15)
        assert snap.returncode == 0, f"snapshot create failed while a client trickled: {snap.stderr}"
        assert took < 5, f"snapshot create took {took:.1f}s while a client trickled bytes"
        s.close_handles()
        pid = s.pid
        stop, took = timed_blockrep("stop", s.vol, timeout=30)
        assert "Traceback" not in stop.stderr, stop.stderr
        assert stop.returncode == 0, f"stop failed while a client trickled: {stop.stderr}"
        assert took < 15, f"stop took {took:.1f}s"
        assert not pid_alive(pid), "stop returned 0 but nbdkit still runs"
        # both finished while the trickler was still sending, well before the server's request
        # deadline (control.REQUEST_DEADLINE, 10 s) would have dropped it: neither waited for it
        assert t.sent >= 1 and t.closed_at is None
        assert time.monotonic() - t.connected_at < 9, "snapshot create + stop waited for the trickler"
    finally:
        t.done.set()
        t.join(5)
    assert_no_traceback_in_log(s.vol)
    s.start()
    names = [x["name"] for x in json.loads(run_blockrep("snapshot", "list", s.vol, "--json",
                                                        check=True).stdout)]
    assert names == ["while-trickling"]  # and not the trickled request
    assert s.connect().pread(len(data), 0) == data


def test_stop_works_with_40_idle_connections_on_the_control_socket(make_server):
    s = make_server()
    h = s.connect()
    data = random.randbytes(128 * 1024)
    h.pwrite(data, 4096)
    idle = []
    try:
        for _ in range(40):
            idle.append(connect_unix(s.vol / "ctl.sock"))
        time.sleep(0.3)
        s.close_handles()
        pid = s.pid
        stop, took = timed_blockrep("stop", s.vol, timeout=30)
        assert "Traceback" not in stop.stderr, stop.stderr
        assert stop.returncode == 0, f"stop failed with 40 idle control clients: {stop.stderr}"
        assert took < 15, f"stop took {took:.1f}s"
        assert not pid_alive(pid)
    finally:
        for c in idle:
            c.close()
    assert_no_traceback_in_log(s.vol)
    s.start()
    assert s.connect().pread(len(data), 4096) == data


# ---------------------------------------------------------------------------------------------
# 2. disk full: stop never throws acknowledged writes away unless --force

def _write_unflushed(h, rnd: random.Random, mib: int = 3, base: int = 0) -> bytes:
    """mib MiB written and acknowledged, never flushed: they sit in the engine's 8 MiB window."""
    data = rnd.randbytes(mib * MiB)
    for i in range(mib):
        h.pwrite(data[i * MiB:(i + 1) * MiB], base + i * MiB)
    return data


def test_stop_on_a_full_disk_refuses_and_keeps_the_server_and_its_data(small_fs, make_server):
    rnd = random.Random(8)
    s = make_server(base=small_fs, size="128M")
    h = s.connect()
    flushed = rnd.randbytes(MiB)
    h.pwrite(flushed, 32 * MiB)
    h.flush()
    data = _write_unflushed(h, rnd)
    ballast = small_fs / "ballast"
    take_space(ballast, leave=0)
    pid = s.pid
    r = run_blockrep("stop", s.vol, timeout=60)
    line = one_error_line(r, "stop on a full disk")
    assert "durable" in line, line
    assert pid_alive(pid) and s.pid == pid, "stop failed but took the server down anyway"
    # still serving: what was acknowledged reads back, from memory
    assert h.pread(len(data), 0) == data
    assert h.pread(MiB, 32 * MiB) == flushed
    # space comes back: stop now makes everything durable and stops
    ballast.unlink()
    s.close_handles()
    stop = run_blockrep("stop", s.vol, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not pid_alive(pid)
    s.start()
    h = s.connect()
    assert h.pread(len(data), 0) == data, "acknowledged writes were lost across stop + restart"
    assert h.pread(MiB, 32 * MiB) == flushed
    assert_no_traceback_in_log(s.vol)


def test_stop_force_on_a_full_disk_stops_with_a_warning(small_fs, make_server):
    rnd = random.Random(9)
    s = make_server(base=small_fs, size="128M")
    h = s.connect()
    flushed = rnd.randbytes(MiB)
    h.pwrite(flushed, 32 * MiB)
    h.flush()
    _write_unflushed(h, rnd)
    ballast = small_fs / "ballast"
    take_space(ballast, leave=0)
    s.close_handles()
    pid = s.pid
    r, took = timed_blockrep("stop", s.vol, "--force", timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, f"stop --force on a full disk: exit {r.returncode}: {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockrep: warning: "), r.stderr
    assert not pid_alive(pid) and not s.running
    assert not nbdkits_serving(s.vol)
    assert took < 30
    # what was flushed before is there after a restart (with space back)
    ballast.unlink()
    s.start()
    assert s.connect().pread(MiB, 32 * MiB) == flushed


# ---------------------------------------------------------------------------------------------
# 3. no nbdkit left behind; a server with an empty pid file is still found

@pytest.mark.slow
def test_a_serve_that_never_becomes_ready_leaves_no_nbdkit_behind(make_server, tmp_path, monkeypatch):
    """nbdkit starts, but its pid file never appears where serve waits for it (here: a wrapper
    sends it elsewhere; in life, a full disk): serve gives up and must kill that nbdkit, which
    it can only find in /proc."""
    s = make_server(start=False)
    elsewhere = tmp_path / "elsewhere.pid"
    wrapper = nbdkit_wrapper(tmp_path, "nbdkit-pid-elsewhere",
                             f"args[args.index('-P') + 1] = {str(elsewhere)!r}")
    monkeypatch.setattr(engine_server, "NBDKIT", str(wrapper))
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="did not start accepting connections"):
            engine_server.serve(str(s.vol), timeout=3)
        assert time.monotonic() - t0 < 20
        # nbdkit did start (its pid file, left behind by SIGKILL, names it) and is gone
        started = int(elsewhere.read_text())
        assert not pid_alive(started), f"serve failed but left nbdkit {started} running"
        left = nbdkits_serving(s.vol)
        assert not left, f"serve failed but left nbdkit {left} serving {s.vol}"
        assert not (s.vol / "serve.json").exists()
    finally:
        kill_all_serving(s.vol)
    monkeypatch.undo()
    # and the volume is free: a normal serve works
    s.start()
    s.stop()


def test_stop_finds_a_server_whose_pid_file_is_empty(make_server):
    s = make_server()
    h = s.connect()
    data = random.randbytes(64 * 1024)
    h.pwrite(data, 0)
    pid = s.pid
    s.close_handles()
    os.truncate(s.pid_file, 0)  # what a full disk can leave
    try:
        info = json.loads(run_blockrep("info", s.vol, "--json", check=True).stdout)
        assert info["served"] and info["server_pid"] == pid
        again = run_blockrep("serve", s.vol)
        one_error_line(again, "serve of a volume already served")
        assert nbdkits_serving(s.vol) == [pid], "a second nbdkit was started"
        stop, took = timed_blockrep("stop", s.vol, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert "was not being served" not in stop.stderr, \
            "stop did not find the server whose pid file is empty"
        assert not pid_alive(pid), "stop returned but the server still runs"
        assert not nbdkits_serving(s.vol)
    finally:
        kill_all_serving(s.vol)
    s.start()
    assert s.connect().pread(len(data), 0) == data


# ---------------------------------------------------------------------------------------------
# 4. a damaged volume.json, an unreadable volume: one error line

BAD_FIELDS = [
    ("segment_size", -5),
    ("granularity", 3),
    ("size", "x"),
    ("block_size", 512),
    ("uuid", "zz"),
    ("compress", "lz4"),
    ("segment_size", True),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in BAD_FIELDS])
def test_a_damaged_volume_json_is_one_error_line_for_info_serve_and_snapshot_list(
        make_server, field, value):
    s = make_server(start=False)
    meta = s.vol / "volume.json"
    params = json.loads(meta.read_text())
    params[field] = value
    meta.write_text(json.dumps(params))
    before = tree_state(s.vol)
    try:
        for cmd in (["info", s.vol], ["info", s.vol, "--json"], ["serve", s.vol],
                    ["snapshot", "list", s.vol]):
            line = one_error_line(run_blockrep(*cmd, timeout=60), f"{' '.join(map(str, cmd))} ({field}={value!r})")
            assert field in line, f"the error does not name the bad field {field}: {line}"
        assert not nbdkits_serving(s.vol), "serve started nbdkit on a damaged volume"
    finally:
        kill_all_serving(s.vol)
    assert tree_state(s.vol) == before, "a command changed a volume it refused"


@pytest.fixture
def public_dir():
    """A directory everyone may enter (tmp_path's parents are 0700): the volume inside it is
    what refuses another user."""
    d = Path(tempfile.mkdtemp(prefix="blockrep-perm-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        kill_all_serving(d / "vol")
        shutil.rmtree(d, ignore_errors=True)


def test_commands_by_a_user_who_may_not_read_the_volume_are_one_error_line(public_dir, make_server):
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser")
    s = make_server(base=public_dir, start=False)
    s.vol.chmod(0o700)
    before = tree_state(s.vol)
    for cmd in (["info", s.vol], ["info", s.vol, "--json"], ["snapshot", "list", s.vol],
                ["serve", s.vol], ["stop", s.vol]):
        r = subprocess.run(["runuser", "-u", "nobody", "--", BLOCKREP, *map(str, cmd)],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        line = one_error_line(r, f"{' '.join(map(str, cmd))} as nobody")
        assert "permission" in line or "owner" in line, line
    assert not nbdkits_serving(s.vol)
    assert tree_state(s.vol) == before


# ---------------------------------------------------------------------------------------------
# 5. serve + stop leaves a clean log

def test_serve_and_stop_cycles_leave_no_traceback_in_server_log(make_server):
    s = make_server()
    for i in range(3):
        h = s.connect()
        h.pwrite(bytes([i + 1]) * BS, i * BS)
        h.flush()
        s.stop()
        s.start()
    assert s.connect().pread(3 * BS, 0) == b"".join(bytes([i + 1]) * BS for i in range(3))
    s.stop()
    text = (s.vol / "server.log").read_text()
    assert text.count("opened ") == 4 and text.count("closed ") == 4, text
    assert_no_traceback_in_log(s.vol)
    assert "BrokenPipe" not in text and "ERROR" not in text, text


# ---------------------------------------------------------------------------------------------
# 6. injected disk faults through a real nbdkit

def _serve_with_fault(make_server, tmp_path, monkeypatch, spec: str):
    wrapper = nbdkit_wrapper(tmp_path, "nbdkit-fault", f"args.append({'io_fault=' + spec!r})")
    s = make_server(start=False)
    with monkeypatch.context() as mp:
        mp.setenv("BLOCKREP_NBDKIT", str(wrapper))
        s.start()
    cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes().split(b"\0")
    assert f"io_fault={spec}".encode() in cmdline
    return s


@pytest.mark.parametrize("spec,says", [("fdatasync:1:EIO:persistent", "Input/output error"),
                                       ("pwrite:often", "bad io_fault")])
def test_a_serve_whose_plugin_fails_to_start_is_one_error_line_and_leaves_no_nbdkit(
        make_server, tmp_path, monkeypatch, spec, says):
    """The volume's open fails on a failing disk (or the fault spec is bad): serve says why in
    one line and nothing of it stays behind."""
    wrapper = nbdkit_wrapper(tmp_path, "nbdkit-fault", f"args.append({'io_fault=' + spec!r})")
    s = make_server(start=False)
    monkeypatch.setenv("BLOCKREP_NBDKIT", str(wrapper))
    try:
        line = one_error_line(run_blockrep("serve", s.vol, timeout=60), f"serve with io_fault={spec}")
        assert says in line, line
        assert not nbdkits_serving(s.vol)
    finally:
        kill_all_serving(s.vol)
    for leftover in ("nbdkit.pid", "serve.json", "ctl.sock", "nbd.sock"):
        assert not (s.vol / leftover).exists(), f"a failed serve left {leftover} behind"
    assert_no_traceback_in_log(s.vol)
    monkeypatch.delenv("BLOCKREP_NBDKIT")
    s.start()  # a healthy disk: it serves
    s.stop()


@pytest.mark.parametrize("spec", ["pwrite:4:EIO"])
def test_a_request_whose_disk_io_fails_gets_an_error_reply_and_later_requests_work(
        make_server, tmp_path, monkeypatch, spec):
    """One pwrite of the engine fails, once: the volume's open takes fewer, and each flush or
    FUA write writes the window out, so one of the first requests hits the fault. That request,
    and only that one, gets the error (a failed write-out keeps the window: nothing is lost).
    A failed fdatasync is different: the next test."""
    s = _serve_with_fault(make_server, tmp_path, monkeypatch, spec)
    h = s.connect()
    rnd = random.Random(spec)
    durable: dict[int, bytes] = {}  # offset -> acknowledged and made durable (flush or FUA)
    pending: dict[int, bytes] = {}  # acknowledged, no successful flush since
    failed = []
    for i in range(12):
        off = i * 16 * BS
        data = rnd.randbytes(16 * BS)
        fua = i % 3 == 2
        try:
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        except nbd.Error as e:
            failed.append(("FUA write" if fua else "write", i, e.errnum, e.string))
            continue
        if fua:
            durable[off] = data
            continue
        pending[off] = data
        try:
            h.flush()
        except nbd.Error as e:
            failed.append(("flush", i, e.errnum, e.string))
            continue
        durable.update(pending)
        pending.clear()
    assert failed, f"{spec}: every request succeeded although a write-out or sync failed"
    assert len(failed) == 1 and failed[0][2] == getattr(errno, spec.split(":")[2]), failed
    assert failed[0][1] < 6, failed
    # after the fault: a flush makes what the failed one could not durable
    h.flush()
    durable.update(pending)
    assert len(durable) == 12 - (failed[0][0] == "FUA write")
    for off, data in durable.items():
        assert h.pread(len(data), off) == data
    s.stop()
    s.start()  # without the fault
    h = s.connect()
    for off, data in durable.items():
        assert h.pread(len(data), off) == data, f"{spec}: acknowledged and flushed write at {off} lost"
    log = (s.vol / "server.log").read_text()
    assert "Input/output error" in log, log
    assert_no_traceback_in_log(s.vol)


@pytest.mark.parametrize("spec", ["fdatasync:2:EIO:persistent", "fdatasync:2:EIO"])
def test_a_failed_fdatasync_fails_every_later_flush_and_fua_write_until_restart(
        make_server, tmp_path, monkeypatch, spec):
    """Once an fdatasync failed, what reached the disk is unknown (Linux reports a write-back
    error once and may drop the pages): even when the disk answers again (the one-shot fault),
    no flush may succeed until the volume is reopened, as in PostgreSQL ("fsyncgate")."""
    s = _serve_with_fault(make_server, tmp_path, monkeypatch, spec)
    h = s.connect()
    for i in range(3):
        h.pwrite(b"w" * BS, i * BS)  # buffered: acknowledged
        with pytest.raises(nbd.Error) as e:
            h.flush()
        assert e.value.errnum == errno.EIO, e.value.string
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"f" * BS, (10 + i) * BS, nbd.CMD_FLAG_FUA)
        assert e.value.errnum == errno.EIO, e.value.string
    assert h.pread(BS, 0) == b"w" * BS
    s.close_handles()
    # the server cannot make its data durable: stop refuses, --force stops it
    pid = s.pid
    line = one_error_line(run_blockrep("stop", s.vol, timeout=60), "stop on a failing disk")
    assert "durable" in line, line
    assert pid_alive(pid)
    r = run_blockrep("stop", s.vol, "--force", timeout=60)
    assert r.returncode == 0 and r.stderr.startswith("blockrep: warning: "), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert not pid_alive(pid) and not nbdkits_serving(s.vol)
    assert_no_traceback_in_log(s.vol)
    s.start()  # a healthy disk again: the volume opens and serves
    assert len(s.connect().pread(BS, 0)) == BS


@pytest.mark.slow
def test_stop_on_a_full_disk_refuses_even_while_the_control_socket_is_saturated(small_fs, make_server):
    """The refusal must not depend on stop's flush request getting through: 40 idle clients
    fill the control socket's client slots, then the disk fills."""
    rnd = random.Random(10)
    s = make_server(base=small_fs, size="128M")
    h = s.connect()
    data = _write_unflushed(h, rnd)
    idle = [connect_unix(s.vol / "ctl.sock") for _ in range(40)]
    try:
        time.sleep(0.3)
        take_space(small_fs / "ballast", leave=0)
        pid = s.pid
        r = run_blockrep("stop", s.vol, timeout=60)
        stopped = not pid_alive(pid)
    finally:
        for c in idle:
            c.close()
    (small_fs / "ballast").unlink()
    if stopped:
        s.start()
        lost = s.connect().pread(len(data), 0) != data
        raise AssertionError(f"stop exited {r.returncode} ({r.stderr.strip()!r}) and took the server "
                             f"down on a full disk; acknowledged writes lost: {lost}")
    one_error_line(r, "stop on a full disk, control socket saturated")
    assert h.pread(len(data), 0) == data
