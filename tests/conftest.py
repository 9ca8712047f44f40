"""Shared fixtures: run the real `blockrep` command and own the life of real servers.

In the style of ovirt-imageio's test/conftest.py: a test asks for a `Server` (a volume in its
tmp_path, served by a real nbdkit through `blockrep serve`), talks NBD to `server.uri` with any
client, and may `stop()`, `kill()` (SIGKILL, as a crash) or `restart()` it. Whatever happens in
the test, teardown stops the server, or kills it if stopping fails, so no nbdkit outlives its test.

    def test_something(server):            # a 64M volume, served
        h = server.connect()               # an nbd.NBD handle (libnbd), closed at teardown
        h.pwrite(b"x" * 4096, 0)

    def test_other(make_server):           # any number of volumes, any options
        s = make_server(size="16M", create_args=["--compress", "zstd"])
        s.kill(); s.start()

Helpers importable from tests: `run_blockrep(*args)`, `BLOCKREP`, `tree_state(path)`,
`backend_create_args(backend, base)` (tests parametrised over the lsfs and image backends).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.server import socket_accepts

REPO = Path(__file__).resolve().parents[1]


def _find_blockrep() -> str:
    env = os.environ.get("BLOCKREP_BIN")
    if env:
        return env
    beside = Path(sys.executable).with_name("blockrep")
    if beside.exists():
        return str(beside)
    venv = REPO / ".venv" / "bin" / "blockrep"
    if venv.exists():
        return str(venv)
    return shutil.which("blockrep") or str(venv)


BLOCKREP = _find_blockrep()

# BLOCKREP_TEST_BACKEND=image (`make test-image`): every volume the suite creates without naming a
# backend, through the CLI or the engine API, is an image-backend volume whose change log is on
# /dev/shm (another filesystem: no same-filesystem warning). CI runs the default (lsfs) suite with
# the image backend's own tests and parametrised variants; this runs everything else on it too.
TEST_BACKEND = os.environ.get("BLOCKREP_TEST_BACKEND", "lsfs")
_JOURNALS = Path("/dev/shm") / f"blockrep-test-journals-{os.getpid()}"


def _test_journal() -> str:
    import uuid
    _JOURNALS.mkdir(exist_ok=True)
    return str(_JOURNALS / uuid.uuid4().hex)


# A test marked lsfs_only("why") keeps the default backend under make test-image (it inspects
# VOL/segments, counts the lsfs log's storage calls, or times its collector); the reason is
# required, so each such test says why it is for one backend.
_LSFS_ONLY = False


@pytest.fixture(autouse=True)
def _lsfs_only_marker(request):
    global _LSFS_ONLY
    m = request.node.get_closest_marker("lsfs_only")
    assert m is None or (m.args and isinstance(m.args[0], str) and m.args[0]), \
        "lsfs_only needs a reason: why the test is for the lsfs backend only"
    _LSFS_ONLY = m is not None
    yield
    _LSFS_ONLY = False


def _image_mode() -> bool:
    return TEST_BACKEND == "image" and not _LSFS_ONLY


if TEST_BACKEND == "image":
    import atexit
    import shutil as _shutil

    from engine import volume as _volume

    _create = _volume.create

    def _create_image(path, size, **kw):
        if "backend" not in kw and _image_mode():
            kw.update(backend="image", journal=_test_journal())
        return _create(path, size, **kw)

    _volume.create = _create_image
    atexit.register(_shutil.rmtree, _JOURNALS, True)


def run_blockrep(*args, timeout: float = 120, input: str | None = None,
                 check: bool = False) -> subprocess.CompletedProcess:
    """Run `blockrep ARGS…`; returns the CompletedProcess (text stdout/stderr).

    With check=True a non-zero exit fails the test, showing the command's stderr."""
    if _image_mode() and args and args[0] == "create" and "--backend" not in map(str, args):
        args = (*args, "--backend", "image", "--journal", _test_journal())
    proc = subprocess.run([BLOCKREP, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=input, stdin=None if input else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"blockrep {' '.join(map(str, args))} exited {proc.returncode}: "
                    f"{proc.stderr.strip()}", pytrace=False)
    return proc


def tree_state(path: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under path -> (type, mode, size, sha256 of content). For 'nothing changed'."""
    root = Path(path)
    state: dict[str, tuple] = {}
    if not root.exists() and not root.is_symlink():
        return state
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir", st.st_mode)
        elif p.is_file():
            state[rel] = ("file", st.st_mode, st.st_size,
                          hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            state[rel] = ("other", st.st_mode)
    return state


def pid_alive(pid: int) -> bool:
    """True while pid is a live process. A zombie counts as dead once all its threads are gone
    (a killed process's leader turns zombie before its other threads release its files)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def unix_socket_accepts(path: str | os.PathLike) -> bool:
    return socket_accepts(Path(path))


class Server:
    """A volume directory plus the real nbdkit that `blockrep serve` starts for it.

    Attributes: vol (Path), sock (Path), uri (str), last_start_seconds (float: how long the last
    `blockrep serve` took until the socket accepted, i.e. open + recovery + startup)."""

    def __init__(self, vol: str | os.PathLike, *, sock: str | os.PathLike | None = None,
                 serve_args: tuple | list = ()):
        self.vol = Path(vol)
        self.sock = Path(sock) if sock else self.vol / "nbd.sock"
        self.serve_args = list(serve_args)
        self.last_start_seconds = 0.0
        self._handles: list = []

    # ---- volume ----
    def create(self, size: str | int = "64M", *create_args) -> Server:
        run_blockrep("create", self.vol, "--size", size, *create_args, check=True)
        return self

    # ---- server life ----
    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid_file(self) -> Path:
        return self.vol / "nbdkit.pid"

    @property
    def pid(self) -> int | None:
        """The pid in VOL/nbdkit.pid if that process is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, *extra) -> Server:
        args = ["serve", self.vol, *self.serve_args, *extra]
        if self.sock != self.vol / "nbd.sock" and "--socket" not in args:
            args += ["--socket", self.sock]
        t0 = time.monotonic()
        run_blockrep(*args, check=True, timeout=300)
        self.last_start_seconds = time.monotonic() - t0
        assert self.running, f"blockrep serve returned 0 but no live nbdkit pid in {self.pid_file}"
        return self

    def stop(self) -> None:
        """`blockrep stop`; asserts it worked (process gone, socket removed)."""
        self.close_handles()
        pid = self.pid
        run_blockrep("stop", self.vol, check=True)
        if pid:
            assert not pid_alive(pid), f"blockrep stop returned but nbdkit {pid} still runs"
        assert not unix_socket_accepts(self.sock)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10) -> int:
        """Send sig (default SIGKILL) to the nbdkit of this volume and wait until it is gone.
        Leaves the stale pid file and socket behind, as a crash would. Returns the pid."""
        pid = self.pid
        assert pid, f"no running nbdkit for {self.vol}"
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"nbdkit {pid} still alive {timeout}s after signal {sig}")
            time.sleep(0.005)
        self.close_handles()
        return pid

    def restart(self) -> Server:
        if self.running:
            self.stop()
        return self.start()

    # ---- clients ----
    def connect(self, uri: str | None = None, meta: bool = True):
        """A libnbd handle connected to the live export (closed at teardown); with meta, the
        base:allocation context is requested so h.block_status works."""
        import nbd

        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri or self.uri)
        self._handles.append(h)
        return h

    def close_handles(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:
                pass
            if hasattr(h, "close"):  # libnbd >= 1.16; older handles close when collected
                h.close()
        self._handles.clear()

    def info(self) -> dict:
        return json.loads(run_blockrep("info", self.vol, "--json", check=True).stdout)

    def teardown(self) -> None:
        self.close_handles()
        if not self.running:
            return
        try:
            # nbdkit 1.32 waits on SIGTERM until every client disconnects: a test that failed
            # with a connection still open must not hold teardown for a minute.
            r = run_blockrep("stop", self.vol, timeout=10)
            if r.returncode == 0 and not self.running:
                return
        except subprocess.TimeoutExpired:
            pass
        pid = self.pid
        if pid:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)


def backend_create_args(backend: str, base: str | os.PathLike, name: str = "vol") -> list[str]:
    """`create_args` for a volume of `backend`: none for lsfs; for the image backend (docs/IMAGE.md)
    `--backend image --journal BASE/NAME.journal` (the change log beside the volume: same
    filesystem, so create warns; harmless in tests)."""
    if backend == "lsfs":
        return []
    assert backend == "image", backend
    return ["--backend", "image", "--journal", str(Path(base) / f"{name}.journal")]


@pytest.fixture(scope="session")
def blockrep_bin() -> str:
    return BLOCKREP


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(name="vol", size="64M", create_args=(), serve_args=(), start=True,
    sock=None, base=tmp_path) -> Server. Every server made is stopped (or killed) at teardown."""
    made: list[Server] = []

    def make(name: str = "vol", size: str | int = "64M", create_args=(), serve_args=(),
             start: bool = True, sock=None, base=None) -> Server:
        s = Server(Path(base or tmp_path) / name, sock=sock, serve_args=serve_args)
        made.append(s)
        s.create(size, *create_args)
        if start:
            s.start()
        return s

    yield make
    errors = []
    for s in reversed(made):
        try:
            s.teardown()
        except Exception as e:  # keep tearing down the others
            errors.append(f"{s.vol}: {e}")
    assert not errors, "teardown failed: " + "; ".join(errors)


@pytest.fixture
def server(make_server) -> Server:
    """A served 64 MiB volume (defaults of `blockrep create`)."""
    return make_server()


# the replication tests' server fixtures (tests/replhelp.py); imported last: replhelp uses the above
from replhelp import procs, targets  # noqa: E402, F401
