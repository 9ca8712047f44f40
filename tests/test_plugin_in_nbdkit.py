"""The plugin inside nbdkit's own embedded interpreter (NBDKIT.md "Interpreter and imports").

nbdkit embeds Debian's /usr/bin/python3; `blockrep serve` makes the repository and the venv
importable there through PYTHONPATH (engine.server.plugin_env). These tests start nbdkit
directly, the way production does, and check that the compiled cffi extension loads and works in
that interpreter, that the plugin serves a round trip, and that it runs under
THREAD_MODEL_SERIALIZE_REQUESTS (per connection: no client holds up another).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run_blockrep

from engine.server import PLUGIN, plugin_env

PROBE = '''
import json, os, sys
import nbdkit

API_VERSION = 2
_info = {}
_vol = None


def config(key, value):
    global _vol
    assert key == "volume", key
    _vol = value


def get_ready():
    import engine
    import engine._native as native
    from engine.volume import Volume

    _info["executable"] = sys.executable
    _info["prefix"] = sys.prefix
    _info["version"] = list(sys.version_info[:2])
    _info["engine"] = engine.__file__
    _info["native"] = native.__file__
    _info["crc"] = native.lib.crc32c_extend(0, b"123456789", 9)
    with Volume.open(_vol) as v:  # a real round trip through the C engine, in nbdkit
        v.write(b"inside nbdkit!" * 4096, 8192, fua=True)
        _info["readback_ok"] = v.read(14 * 4096, 8192) == b"inside nbdkit!" * 4096
        _info["uuid"] = v.params.uuid


def open(readonly):
    return 1


def get_size(h):
    return 4096


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))


def export_description(h):
    return json.dumps(_info)
'''


def nbdkit(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdkit", *map(str, args)], capture_output=True, text=True,
                          env=plugin_env(), timeout=timeout)


@pytest.fixture
def volume(tmp_path) -> Path:
    vol = tmp_path / "vol"
    run_blockrep("create", vol, "--size", "16M", check=True)
    return vol


def test_compiled_extension_loads_and_works_inside_nbdkit(tmp_path, volume):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    r = nbdkit("-U", "-", "python", probe, f"volume={volume}",
               "--run", 'nbdinfo --json "$uri"')
    assert r.returncode == 0, r.stderr
    desc = json.loads(json.loads(r.stdout)["exports"][0]["description"])
    # nbdkit's embedded interpreter is Debian's, not the venv's, yet finds our modules
    assert desc["prefix"] == "/usr", desc
    assert desc["version"] == [3, 11]
    assert Path(desc["engine"]).resolve() == REPO / "engine" / "__init__.py"
    native = Path(desc["native"]).resolve()
    assert native.parent == REPO / "engine" and native.suffix == ".so", native
    assert desc["crc"] == 0xE3069283, "CRC-32C check value of '123456789'"
    assert desc["readback_ok"] is True
    # what the probe wrote inside nbdkit is in the volume, seen from this interpreter
    from engine.volume import Volume

    with Volume.open(volume) as v:
        assert v.params.uuid == desc["uuid"]
        assert v.read(14 * 4096, 8192) == b"inside nbdkit!" * 4096


def test_plugin_round_trip_in_captive_nbdkit(volume):
    r = nbdkit("-U", "-", "python", PLUGIN, f"volume={volume}", "--run",
               'qemu-io -f raw -c "write -P 0x3c 1000 70000" -c "flush" '
               '-c "read -P 0x3c 1000 70000" -c "read -P 0 0 1000" "$uri" && '
               'nbdinfo --map "$uri"')
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    assert "data" in r.stdout and "hole" in r.stdout
    # and the data is on disk after nbdkit exited (cleanup closed the volume)
    from engine.volume import Volume

    with Volume.open(volume) as v:
        assert v.read(70000, 1000) == b"\x3c" * 70000


def test_dump_plugin_shows_serialize_requests():
    r = nbdkit("--dump-plugin", "python", PLUGIN)
    assert r.returncode == 0, r.stderr
    fields = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
    assert fields["thread_model"] == "serialize_requests"
    assert fields["api_version"] == "2"
    for cb in ("has_thread_model", "has_get_ready", "has_after_fork", "has_cleanup",
               "has_list_exports", "has_export_description", "has_extents", "has_zero",
               "has_trim", "has_flush", "has_can_multi_conn", "has_block_size"):
        assert fields.get(cb) == "1", cb


def test_effective_thread_model_is_serialize_requests(volume):
    """The model nbdkit actually uses after asking the plugin (nbdkit -v says it)."""
    r = nbdkit("-v", "-U", "-", "python", PLUGIN, f"volume={volume}",
               "--run", 'nbdinfo "$uri"')
    assert r.returncode == 0, r.stderr
    assert "using thread model: serialize_requests" in r.stderr, r.stderr[-2000:]
    assert "processing requests serially" in r.stderr


def test_thread_model_comes_from_the_plugin(volume):
    """The plugin's thread_model() decides (not the Python plugin's default): a measurement
    override gives another model, so the default above is the plugin's own choice."""
    r = nbdkit("-v", "-U", "-", "python", PLUGIN, f"volume={volume}", "thread_model=parallel",
               "--run", 'nbdinfo "$uri"')
    assert r.returncode == 0, r.stderr
    assert "using thread model: parallel" in r.stderr


def test_blockrep_serve_uses_the_default_thread_model(volume):
    run_blockrep("serve", volume, check=True)
    try:
        pid = int((volume / "nbdkit.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert not any(a.startswith(b"thread_model=") for a in cmdline), cmdline
        assert str(PLUGIN).encode() in cmdline
    finally:
        run_blockrep("stop", volume, check=True)


def test_plugin_rejects_unknown_parameter_and_missing_volume(volume):
    r = nbdkit("-U", "-", "python", PLUGIN, f"volume={volume}", "colour=blue",
               "--run", "true")
    assert r.returncode != 0 and "colour" in r.stderr
    r = nbdkit("-U", "-", "python", PLUGIN, "--run", "true")
    assert r.returncode != 0 and "volume" in r.stderr


def test_plugin_refuses_volume_already_served(volume):
    run_blockrep("serve", volume, check=True)
    try:
        r = nbdkit("-U", "-", "python", PLUGIN, f"volume={volume}", "--run", "true")
        assert r.returncode != 0
        assert "in use" in r.stderr
    finally:
        run_blockrep("stop", volume, check=True)


def test_served_nbdkit_runs_debian_python_with_repo_on_path(volume):
    """`blockrep serve` starts nbdkit with PYTHONPATH = repository root + venv site-packages."""
    env = plugin_env()["PYTHONPATH"].split(":")
    assert str(REPO) == env[0]
    assert any("site-packages" in p for p in env)
    run_blockrep("serve", volume, check=True)
    try:
        pid = int((volume / "nbdkit.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        pp = [e for e in environ if e.startswith(b"PYTHONPATH=")]
        assert pp and pp[0].split(b"=", 1)[1].split(b":")[0] == str(REPO).encode()
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_native" in maps, "the cffi extension is mapped into the served nbdkit"
        assert "libpython3.11" in maps
    finally:
        run_blockrep("stop", volume, check=True)
