"""Start and stop the nbdkit process that serves a volume (`blockrep serve` / `blockrep stop`).

Notes on the design:
- The server is nbdkit running nbd_plugin/plugin.py under Debian's /usr/bin/python3 (nbdkit embeds
  it); PYTHONPATH carries the repository root and this interpreter's site-packages (the venv),
  so the plugin imports engine/ and its dependencies (NBDKIT.md).
- Runtime files live in the volume directory: nbd.sock (default socket), nbdkit.pid, server.log.
- Without --foreground nbdkit binds its socket, then forks; we wait for its exit status and then
  for the socket to accept a connection. Errors from the plugin's get_ready (e.g. volume in use,
  unsupported format) surface as nbdkit's exit status and stderr, turned into one error line.
- Stale runtime files after a crash: the pid file names a dead process (or not an nbdkit), or the
  socket refuses connections; both are removed before starting. The volume lock (flock) dies with
  the crashed process, so it needs no cleanup.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from . import control
from .errors import BlockrepError, InvalidArgument, ServerError, VolumeBusy
from .psk import check as check_psk
from .volume import Lock, read_params

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "nbd_plugin" / "plugin.py"
NBDKIT = os.environ.get("BLOCKREP_NBDKIT", "nbdkit")


def default_socket(vol: Path) -> Path:
    return vol / "nbd.sock"


def pid_file(vol: Path) -> Path:
    return vol / "nbdkit.pid"


def runtime_info(vol: Path) -> dict | None:
    """What the running server was started with (VOL/serve.json), or None."""
    try:
        return json.loads((vol / "serve.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _served_socket(vol: Path) -> Path:
    rt = runtime_info(vol)
    return Path(rt["socket"]) if rt and rt.get("socket") else default_socket(vol)


def read_pid(vol: Path) -> int | None:
    try:
        return int(pid_file(vol).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether pid is an nbdkit that still holds its files (socket, lock). Identified by the
    command name in /proc/PID/stat, which stays while the process exits (its cmdline reads empty
    once its memory is gone, which made a dying nbdkit look dead and then alive again)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state = stat.rsplit(")", 1)[1].split()[0]
        if not comm.startswith("nbdkit"):
            return False
        if state in ("Z", "X", "x"):
            # A killed multi-threaded process shows its leader as a zombie while its other
            # threads are still exiting and still hold its files (the socket, the lock).
            return len(os.listdir(f"/proc/{pid}/task")) > 1
        return True
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return False


def find_nbdkit(vol: Path) -> int | None:
    """An nbdkit process whose command line serves vol (our plugin, volume=VOL), found in /proc:
    for when its pid file is missing or empty (a full disk) and it must still be stopped."""
    want = f"volume={vol}".encode()
    plugin = str(PLUGIN).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and b"nbdkit" in os.path.basename(args[0]) and want in args and plugin in args:
            return int(d)
    return None


def running_pid(vol: Path) -> int | None:
    """The pid of the nbdkit serving vol, or None."""
    pid = read_pid(vol)
    if pid and _alive(pid):
        return pid
    pid = find_nbdkit(vol)
    return pid if pid and _alive(pid) else None


def socket_accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid --listen {text!r}: use HOST:PORT with a port 1-65535")
    host = host.strip("[]") or "0.0.0.0"
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidArgument(f"invalid --listen {text!r}: cannot resolve host {host!r}") from None
    return host, int(port)


def _check_can_listen(host: str, port: int) -> None:
    """Bind (without listening) every address nbdkit would bind, so that a port in use or an
    address not on this machine is one clear error before nbdkit (and the plugin) start."""
    for family, type_, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ServerError(f"port {port} on {host} is already in use") from None
                raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plugin_env() -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _cleanup_stale(vol: Path, sock: Path) -> None:
    pid = read_pid(vol)
    if pid and not _alive(pid):
        pid_file(vol).unlink(missing_ok=True)
    if sock.exists() and not running_pid(vol) and not socket_accepts(sock):
        sock.unlink()


def client_uri(hp: tuple[str, int] | None, sock: Path, psk: Path | None) -> str:
    """The libnbd URI of the live export; with TLS it carries the PSK file and its first
    username, so local tools (replicate, verify) can connect as they are."""
    if not psk:
        return f"nbd://{hp[0]}:{hp[1]}/" if hp else f"nbd+unix:///?socket={sock}"
    try:
        user = psk.read_text().split(":", 1)[0].strip() or "blockrep"
    except OSError:
        user = "blockrep"
    host = "127.0.0.1" if hp and hp[0] in ("0.0.0.0", "::") else (hp[0] if hp else "")
    if hp:
        return f"nbds://{user}@{host}:{hp[1]}/?tls-psk-file={psk}"
    return f"nbds+unix://{user}@/?socket={sock}&tls-psk-file={psk}"


def nbdkit_command(vol: Path, sock: Path | None, listen: tuple[str, int] | None,
                   tls_psk: Path | None, foreground: bool, keep: int | None = None,
                   allow_remote_prune: bool = False, keep_min_age: int = 86400,
                   gfs: dict | None = None) -> list[str]:
    cmd = [NBDKIT, "-P", str(pid_file(vol))]
    if foreground:
        cmd.append("-f")
    if listen:
        cmd += ["-i", listen[0], "-p", str(listen[1])]
    else:
        cmd += ["-U", str(sock)]
    if tls_psk:
        cmd += ["--tls=require", f"--tls-psk={tls_psk}"]
    cmd += ["python", str(PLUGIN), f"volume={vol}", f"logfile={vol / 'server.log'}"]
    if tls_psk:
        cmd.append(f"tls_psk={tls_psk}")
    if keep is not None:
        cmd.append(f"keep={keep}")
    cmd += [f"keep_{p}={n}" for p, n in (gfs or {}).items() if n]  # the DR's GFS counts
    if allow_remote_prune:
        cmd.append("allow_remote_prune=1")
    cmd.append(f"keep_min_age={keep_min_age}")
    return cmd


def serve(vol_path: str, socket_path: str | None = None, listen: str | None = None,
          tls_psk: str | None = None, foreground: bool = False, timeout: float = 30.0,
          private: bool = False, keep: int | None = None, allow_remote_prune: bool = False,
          keep_min_age: int = 86400, gfs: dict | None = None) -> str:
    """Start serving; returns the NBD URI clients use. Raises BlockrepError with one clear line.
    private: a child of this process that dies with it (nbdkit --exit-with-parent), for commands
    that serve an unserved volume while they run (replicate, verify). keep, gfs ({"hourly": H, …}),
    keep_min_age, allow_remote_prune: the retention of a DR (docs/REPLICATION.md §4)."""
    vol = Path(vol_path).resolve()
    read_params(vol)  # NotFound / UnsupportedFormat before anything starts
    if not os.access(vol, os.R_OK | os.W_OK | os.X_OK):
        raise InvalidArgument(f"volume directory {vol} is not readable and writable by this user")
    sock = Path(socket_path).resolve() if socket_path else default_socket(vol)
    hp = parse_listen(listen) if listen is not None else None
    if socket_path and listen is not None:
        raise InvalidArgument("use either --socket or --listen, not both")
    psk = None
    if tls_psk:
        psk = Path(tls_psk).resolve()
        check_psk(psk)  # GnuTLS would only fail each client's handshake, saying nothing
    pid = running_pid(vol)
    if pid:
        raise VolumeBusy(f"volume {vol} is already being served (nbdkit pid {pid})")
    if Lock.held(vol):
        raise VolumeBusy(f"volume {vol} is in use by another process")
    _cleanup_stale(vol, sock)
    if not hp and sock.exists():
        raise ServerError(f"socket {sock} is in use by another server")
    if hp:
        _check_can_listen(*hp)
    if hp and not psk and not _is_loopback(hp[0]):
        print(f"blockrep: warning: serving {vol} on {hp[0]}:{hp[1]} without TLS; "
              "anyone who can reach it can read and write the volume (use --tls-psk)",
              file=sys.stderr)
    uri = client_uri(hp, sock, psk)
    if keep is not None and keep < 1:
        raise InvalidArgument("--keep must be at least 1 (the newest snapshot is the next common base)")
    from .replication.gfs import check_counts
    gfs = check_counts(gfs)
    cmd = nbdkit_command(vol, sock, hp, psk, foreground or private, keep, allow_remote_prune, keep_min_age, gfs)
    (vol / "serve.json").write_text(json.dumps({"uri": uri, "socket": None if hp else str(sock)}) + "\n")
    if foreground:
        os.execvpe(cmd[0], cmd, plugin_env())
    if private:
        cmd.insert(1, "--exit-with-parent")
        proc = subprocess.Popen(cmd, env=plugin_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _PRIVATE[vol] = proc
        return _wait_ready(vol, uri, hp, sock, timeout)
    try:
        r = subprocess.run(cmd, env=plugin_env(), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError:
        (vol / "serve.json").unlink(missing_ok=True)
        raise ServerError("nbdkit is not installed (run scripts/bootstrap.sh)") from None
    except subprocess.TimeoutExpired:
        raise ServerError(f"nbdkit did not start within {timeout:.0f}s") from None
    if r.returncode != 0:
        (vol / "serve.json").unlink(missing_ok=True)  # a failed start leaves nothing behind
        raise ServerError(_nbdkit_error(r.stderr.decode(errors="replace")))
    try:
        return _wait_ready(vol, uri, hp, sock, timeout)
    except ServerError:
        _kill_failed_start(vol)  # never leave a half-started server behind
        raise


_PRIVATE: dict[Path, subprocess.Popen] = {}


def _wait_ready(vol: Path, uri: str, hp, sock: Path, timeout: float) -> str:
    """nbdkit binds its socket before it forks and writes its pid file after; the plugin starts
    the control socket after the fork: wait for all three, so that `stop`, `snapshot` (and
    scripts) find the server as soon as `serve` returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = read_pid(vol)  # read once: a second read could see a pid file written in between
        pid = raw if raw and _alive(raw) else None
        if raw and not pid:
            break  # the pid file appeared (stale ones were removed first) and its process died
        ready = pid and (tcp_accepts("127.0.0.1" if hp[0] in ("0.0.0.0", "::") else hp[0], hp[1])
                         if hp else socket_accepts(sock)) and socket_accepts(control.socket_path(vol))
        if ready:
            return uri
        time.sleep(0.02)
    raise ServerError(f"server for {vol} did not start accepting connections (see {vol}/server.log)")


def _kill_failed_start(vol: Path) -> None:
    pid = running_pid(vol)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
    (vol / "serve.json").unlink(missing_ok=True)
    (vol / "ctl.sock").unlink(missing_ok=True)
    pid_file(vol).unlink(missing_ok=True)


def _nbdkit_error(stderr: str) -> str:
    """Reduce nbdkit's stderr (often a Python traceback) to the one line that says why."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        for marker in ("RuntimeError: ", "BlockrepError: ", "Error: "):
            if marker in ln:
                return ln.split(marker, 1)[1]
    for ln in reversed(lines):
        if "nbdkit: error:" in ln or "Address already in use" in ln:
            return ln.split("error:", 1)[-1].strip()
    return lines[-1] if lines else "nbdkit failed to start"


def stop(vol_path: str, timeout: float = 60.0, grace: float = 5.0, force: bool = False) -> bool:
    """Stop the server of a volume; returns False if it was not running. Waits for exit.
    A server that cannot make its data durable (a full or failing disk) is left running, so that
    nothing acknowledged is lost, unless force (then the writes since the last flush are lost
    and a warning says so)."""
    vol = Path(vol_path).resolve()
    read_params(vol)
    pid = running_pid(vol)
    if not pid:
        pid_file(vol).unlink(missing_ok=True)
        sock = _served_socket(vol)
        if sock.exists() and not socket_accepts(sock):
            sock.unlink()
        return False
    # nbdkit answers SIGTERM by refusing new requests but waits for connected clients to leave.
    # So: make everything durable and checkpoint first (control socket), ask nicely, and if a
    # client keeps the server alive past the grace period, SIGKILL it: nothing is lost.
    _durable_or_refuse(vol, pid, timeout, force)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        _durable_or_refuse(vol, pid, timeout, force, clients_left=True)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        if _alive(pid):
            raise ServerError(f"nbdkit pid {pid} did not exit")
    (vol / "ctl.sock").unlink(missing_ok=True)
    child = _PRIVATE.pop(vol, None)
    if child is not None:
        child.wait()
    # nbdkit removes its pid file and socket on a clean exit; make sure.
    pid_file(vol).unlink(missing_ok=True)
    sock = _served_socket(vol)
    if sock.exists() and not socket_accepts(sock):
        sock.unlink()
    # the lock is released when the process is gone
    deadline = time.monotonic() + 5
    while Lock.held(vol) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _durable_or_refuse(vol: Path, pid: int, timeout: float, force: bool, clients_left: bool = False) -> None:
    """Make the served volume durable through its control socket before it is signalled, or
    refuse (ServerError) unless force: a server that cannot flush (full or failing disk) or
    cannot be reached keeps its acknowledged writes in memory only while it runs. A server that
    is already shutting down by itself (its control socket says so, or is gone, and it exits)
    makes its volume durable on the way out: then this waits for it to exit."""
    why = None
    deadline = time.monotonic() + min(timeout, 2 * control.REQUEST_DEADLINE + 5)
    while True:
        if not _alive(pid):
            return  # it exited on its own: its close checkpointed (or logged why not)
        if not control.socket_path(vol).exists():
            if not clients_left:
                return  # no control socket (an older server, or it is dying): SIGTERM flushes on exit
            why = "its control socket is gone"
        else:
            try:
                control.call(vol, "flush", timeout=timeout)
                return
            except ServerError as e:  # busy (other clients being read), or going away: try again
                why = f"its control socket does not answer ({e})"
            except BlockrepError as e:
                if e.errno != errno.ESHUTDOWN:  # it answered: it cannot make the volume durable
                    why = f"the server cannot make its data durable ({e})"
                    break
                why = "it is shutting down"  # its own cleanup flushes: wait for it to exit
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not force:
        what = "it is shutting down but clients are still connected" if clients_left else \
            "it keeps running so that nothing is lost"
        raise ServerError(f"not stopping {vol}: {why}; {what}. Free space or fix the disk and run stop "
                          "again, or stop --force (writes since the last flush are then lost)")
    print(f"blockrep: warning: stopping {vol} without making it durable ({why}): writes since "
          "the last flush are lost", file=sys.stderr)


def ensure_not_served(vol: Path) -> None:
    pid = running_pid(vol)
    if pid:
        raise VolumeBusy(f"volume {vol} is being served (nbdkit pid {pid})")


__all__ = ["serve", "stop", "running_pid", "default_socket", "BlockrepError"]
