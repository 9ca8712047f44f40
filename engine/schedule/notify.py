"""systemd's notify protocol (sd_notify(3)): datagrams of KEY=VALUE lines to $NOTIFY_SOCKET, which
may be an abstract socket ('@…'). Nothing happens outside systemd (the variable is unset)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        env: Mapping[str, str] = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or ""
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None

    def send(self, **fields: str | int) -> None:
        if not self.addr:
            return
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(msg, self.addr)
        except OSError:
            pass  # systemd went away: nothing to tell

    def status(self, text: str) -> None:
        self.send(STATUS=text.replace("\n", " ")[:200])
