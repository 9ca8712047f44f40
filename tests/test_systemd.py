"""scripts/systemd/: the units pass `systemd-analyze verify` (pointed at this checkout instead of
/opt/blockrep), the scheduler unit has the settings the daemon relies on, and the serve unit's
ExecStart/ExecStop, expanded as systemd expands them for an escaped volume path, really serve
the volume and stop it. (No systemd runs as PID 1 here, so systemctl itself is not exercised.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from conftest import REPO, pid_alive, unix_socket_accepts
from test_tls import free_port

from engine.server import tcp_accepts

UNITS = REPO / "scripts" / "systemd"
SERVE = "blockrep-serve@.service"
SCHEDULE = "blockrep-schedule.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def _settings(unit: Path) -> dict[str, list[str]]:
    """key -> values (in order) over all sections; comments and blank lines skipped."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _here(tmp_path: Path, name: str, replace: tuple[str, str] | None = None) -> Path:
    """A copy of the unit whose paths point at this checkout's venv."""
    text = (UNITS / name).read_text().replace("/opt/blockrep", str(REPO))
    if replace:
        text = text.replace(*replace)
    dst = tmp_path / name
    dst.write_text(text)
    return dst


def _verify(unit: Path) -> subprocess.CompletedProcess:
    assert os.access(ANALYZE, os.X_OK), "systemd-analyze missing: run scripts/bootstrap.sh (installs systemd)"
    env = {**os.environ, "MANPATH": str(REPO / ".venv" / "share" / "man")}  # Documentation=man:blockrep(1)
    return subprocess.run([ANALYZE, "verify", unit.name], cwd=unit.parent, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("name", [SERVE, SCHEDULE])
def test_unit_passes_systemd_analyze_verify(tmp_path, name):
    r = _verify(_here(tmp_path, name))
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", (r.stdout, r.stderr)


def test_verify_catches_a_missing_binary_and_an_unknown_key(tmp_path):
    """The check above can fail: verify refuses an ExecStart that does not exist and names a key
    systemd does not know."""
    bad = _here(tmp_path, SERVE, (f"{REPO}/.venv/bin/blockrep serve", "/nonexistent/blockrep serve"))
    r = _verify(bad)
    assert r.returncode != 0 and "/nonexistent/blockrep" in r.stderr, r.stderr
    odd = _here(tmp_path, SCHEDULE, ("Restart=on-failure", "Restart=on-failure\nRestrat=always"))
    assert "Restrat" in _verify(odd).stderr


def test_schedule_unit_is_notify_with_watchdog_reload_and_restart():
    s = _settings(UNITS / SCHEDULE)
    want = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "60", "KillSignal": "SIGTERM",
            "TimeoutStopSec": "30", "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID",
            "ExecStart": "/opt/blockrep/.venv/bin/blockrep schedule run /etc/blockrep/schedule.toml"}
    assert {k: s.get(k, [None])[-1] for k in want} == want


def _escape(path: Path) -> str:
    return subprocess.run(["systemd-escape", "--path", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _expand(line: str, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: %i the instance, %f its unescaped path, $VAR split on
    whitespace (an unset one is dropped)."""
    unescaped = subprocess.run(["systemd-escape", "--unescape", "--path", instance], capture_output=True,
                               text=True, check=True).stdout.strip()
    words = shlex.split(line.replace("%i", instance).replace("%f", unescaped))
    out: list[str] = []
    for w in words:
        out += env.get(w[1:], "").split() if w.startswith("$") else [w]
    return [w.replace("/opt/blockrep", str(REPO)) for w in out]


def _wait(pred, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("listen", [False, True])
def test_serve_unit_commands_serve_the_escaped_volume_and_stop_it(make_server, tmp_path, listen):
    s = make_server("dr-vol", size="16M", start=False)  # a '-' that systemd-escape turns into \x2d
    instance = _escape(s.vol)
    assert "\\x2d" in instance and "/" not in instance
    unit = _settings(UNITS / SERVE)
    assert unit["Type"] == ["exec"] and unit["EnvironmentFile"] == ["-/etc/blockrep/serve-%i.env"]
    port = free_port()
    env = {"BLOCKREP_SERVE_ARGS": f"--listen 127.0.0.1:{port}"} if listen else {}
    start = _expand(unit["ExecStart"][0], instance, env)
    assert start[:4] == [f"{REPO}/.venv/bin/blockrep", "serve", "--foreground", str(s.vol)], start
    proc = subprocess.Popen(start, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        uri = f"nbd://127.0.0.1:{port}/" if listen else s.uri
        up = (lambda: tcp_accepts("127.0.0.1", port)) if listen else (lambda: unix_socket_accepts(s.sock))
        assert _wait(lambda: s.running and up()), proc.stderr
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\x42" * 4096, 0)
        h.flush()
        h.shutdown()
        assert proc.poll() is None and s.pid == proc.pid  # systemd's main process is nbdkit itself
        stop = _expand(unit["ExecStop"][0], instance, env)
        r = subprocess.run(stop, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=30)
        assert proc.returncode in (0, -15), proc.returncode  # SIGTERM's exit counts as clean to systemd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not pid_alive(proc.pid) and not s.running
    s.start()
    assert s.connect().pread(4096, 0) == b"\x42" * 4096  # durable across the unit's stop
