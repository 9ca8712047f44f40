"""The control socket: how CLI commands reach the server that owns a volume.

Notes on the design:
- A Unix stream socket `VOL/ctl.sock`, mode 0600 (created under umask 077, then chmod): only the
  volume's owner (root here) can connect. Never a network listener.
- One request per connection: the client sends one JSON object and shuts its side down, the
  server answers with one JSON object: {"ok": true, "result": …} or {"ok": false, "error": "…",
  "errno": N}. Requests: {"cmd": NAME, "args": {…}} where NAME is a key of ops.COMMANDS.
- The server runs in a thread of the nbdkit process (started in the plugin's after_fork); each
  command is one or a few Volume calls (C, GIL released), so requests keep flowing meanwhile.
- Each connection is read by a thread of its own with a deadline for the whole request
  (REQUEST_DEADLINE), so a client that trickles bytes (or sends nothing) holds up nobody; the
  commands themselves run one at a time (`_run_lock`). `stop()` waits for a running command
  to finish, so the plugin never frees the volume under one.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
import socket
import threading
import time
from functools import partial
from pathlib import Path

from . import ops
from .errors import BlockrepError, CorruptionError, ServerError, from_errno

log = logging.getLogger("blockrep.control")
MAX_REQUEST = 1 << 20
REQUEST_DEADLINE = 10.0  # seconds for a client to send its whole request
MAX_CLIENTS = 32  # connections being read at once; more wait in the listen backlog


def socket_path(vol: Path) -> Path:
    return vol / "ctl.sock"


class ControlServer:
    def __init__(self, vol, path: Path, extra: dict | None = None):
        """extra: commands of the server beside ops.COMMANDS (name -> function of its args only),
        e.g. the DR server's hold on the live export."""
        self.vol = vol
        self.path = path
        self.extra = dict(extra or {})
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self._run_lock = threading.Lock()  # one command at a time
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = False

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self.sock = s
        self.thread = threading.Thread(target=self._loop, name="blockrep-control", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Close the socket and wait for a running command (the caller frees the volume next)."""
        self._stopping = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        if self.thread is not None:
            self.thread.join(timeout=5)
        self._run_lock.acquire()  # no command runs after this; the lock is never released
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # Too many clients being read at once: wait for a slot (each frees within
            # REQUEST_DEADLINE), so that later clients queue in the backlog instead of failing.
            while not self._clients.acquire(timeout=1):
                if self._stopping:
                    conn.close()
                    return
            threading.Thread(target=self._client, args=(conn,), name="blockrep-control-client",
                             daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        except (OSError, TimeoutError) as e:
            log.debug("control client went away: %s", e)  # e.g. `serve`'s readiness probe
        except Exception:  # one bad client must not stop the control socket
            log.exception("control request failed")
        finally:
            self._clients.release()

    def _read_request(self, conn: socket.socket) -> bytes | None:
        """The whole request within REQUEST_DEADLINE, or None (too slow, too big)."""
        deadline = time.monotonic() + REQUEST_DEADLINE
        data = b""
        while len(data) <= MAX_REQUEST:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return data
            data += chunk
        return None

    def _serve(self, conn: socket.socket) -> None:
        data = self._read_request(conn)
        if data is None:
            log.warning("control client sent no complete request within %.0fs (or more than %d bytes): "
                        "closed", REQUEST_DEADLINE, MAX_REQUEST)
            return
        if not data:
            return  # a connect-and-close probe
        try:
            req = json.loads(data)
            name = req["cmd"]
            fn = self.extra[name] if name in self.extra else partial(ops.COMMANDS[name], self.vol)
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}", "errno": _errno.EINVAL}
        else:
            with self._run_lock:
                if self._stopping:
                    reply = {"ok": False, "error": "the server is stopping", "errno": _errno.ESHUTDOWN}
                else:
                    reply = self._run(fn, args)
        conn.settimeout(REQUEST_DEADLINE)
        conn.sendall(json.dumps(reply).encode())

    def _run(self, fn, args: dict) -> dict:
        try:
            return {"ok": True, "result": fn(**args)}
        except CorruptionError as e:
            return {"ok": False, "error": str(e), "errno": _errno.EBADMSG}
        except BlockrepError as e:
            return {"ok": False, "error": str(e), "errno": e.errno}
        except TypeError as e:
            return {"ok": False, "error": f"bad arguments: {e}", "errno": _errno.EINVAL}


def call(vol: Path, cmd: str, timeout: float = 600, **args):
    """Run one command in the server that owns vol; raises the same error class it raised."""
    path = socket_path(vol)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise ServerError(f"cannot reach the server of {vol} on {path}: {e.strerror or e}") from None
        try:
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ServerError(f"the server of {vol} did not answer {cmd!r} within {timeout:.0f}s") from None
        except OSError as e:
            raise ServerError(f"the control connection to the server of {vol} failed: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ServerError(f"the server of {vol} closed the control connection without an answer") from None
    if not reply.get("ok"):
        raise from_errno(int(reply.get("errno") or _errno.EIO), reply.get("error", "unknown error"))
    return reply.get("result")
