"""The control socket: how CLI commands reach the server that owns a volume.

Notes on the design:
- A Unix stream socket `VOL/ctl.sock`, mode 0600 (created under umask 077, then chmod): only the
  volume's owner (root here) can connect. Never a network listener.
- One request per connection: the client sends one JSON object and shuts its side down, the
  server answers with one JSON object: {"ok": true, "result": …} or {"ok": false, "error": "…",
  "errno": N}. Requests: {"cmd": NAME, "args": {…}} where NAME is a key of ops.COMMANDS.
- The server runs in a thread of the nbdkit process (started in the plugin's after_fork); each
  command is one or a few Volume calls (C, GIL released), so requests keep flowing meanwhile.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
import socket
import threading
from pathlib import Path

from . import ops
from .errors import BlockrepError, ServerError, from_errno

log = logging.getLogger("blockrep.control")
MAX_REQUEST = 1 << 20


def socket_path(vol: Path) -> Path:
    return vol / "ctl.sock"


class ControlServer:
    def __init__(self, vol, path: Path):
        self.vol = vol
        self.path = path
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

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
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    log.debug("control client went away")  # e.g. `serve`'s readiness probe
                except Exception:  # one bad client must not stop the control socket
                    log.exception("control request failed")

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        data = b""
        while len(data) <= MAX_REQUEST:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        try:
            req = json.loads(data)
            fn = ops.COMMANDS[req["cmd"]]
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}", "errno": _errno.EINVAL}
        else:
            try:
                reply = {"ok": True, "result": fn(self.vol, **args)}
            except BlockrepError as e:
                reply = {"ok": False, "error": str(e), "errno": e.errno}
            except TypeError as e:
                reply = {"ok": False, "error": f"bad arguments: {e}", "errno": _errno.EINVAL}
        conn.sendall(json.dumps(reply).encode())


def call(vol: Path, cmd: str, timeout: float = 600, **args):
    """Run one command in the server that owns vol; raises the same error class it raised."""
    path = socket_path(vol)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise ServerError(f"cannot reach the server of {vol} on {path}: {e.strerror}") from None
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ServerError(f"the server of {vol} closed the control connection without an answer") from None
    if not reply.get("ok"):
        raise from_errno(int(reply.get("errno") or _errno.EIO), reply.get("error", "unknown error"))
    return reply.get("result")
