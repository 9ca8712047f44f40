"""Bad input to the `blockrep` command line (DESIGN.md §4, §6 "Bad input").

Every failure: exit status != 0, nothing on stdout, exactly one stderr line starting with
"blockrep: error:", and nothing changed on disk (the directory tree, its modes, sizes and
content hashes are the same before and after). Also the runtime-file edge cases of serve/stop:
serving twice, ports in use, stale socket and pid file after SIGKILL.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from conftest import BLOCKREP, pid_alive, run_blockrep, tree_state, unix_socket_accepts

ERROR_PREFIX = "blockrep: error:"


def assert_fails_cleanly(args, *watch, code=None) -> str:
    """Run blockrep ARGS; assert a clean failure that changed nothing under the watched paths.
    Returns the error line."""
    before = [tree_state(w) for w in watch]
    r = run_blockrep(*args)
    after = [tree_state(w) for w in watch]
    lines = r.stderr.splitlines()
    assert r.returncode != 0, f"blockrep {args} succeeded: {r.stdout!r} {r.stderr!r}"
    if code is not None:
        assert r.returncode == code, r.stderr
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines
    assert len(lines[0]) > len(ERROR_PREFIX) + 5, "the error line must say what is wrong"
    assert r.stdout == "", f"a failing command printed to stdout: {r.stdout!r}"
    for w, b, a in zip(watch, before, after, strict=True):
        assert a == b, f"{w} changed: before {b} after {a}"
    return lines[0]


# ---------------------------------------------------------------------------------------- create

@pytest.mark.parametrize("size", ["0", "-1", "abc", "10X", "1000", "4097", "17T",
                                  str((16 << 40) + 4096), "", "1.5G", "0x1000"])
def test_create_rejects_bad_size(tmp_path, size):
    assert_fails_cleanly(["create", tmp_path / "vol", f"--size={size}"], tmp_path)
    assert not (tmp_path / "vol").exists()


def test_create_rejects_missing_size(tmp_path):
    assert_fails_cleanly(["create", tmp_path / "vol"], tmp_path, code=2)


def test_create_accepts_largest_size_16T(tmp_path):
    r = run_blockrep("create", tmp_path / "vol", "--size", "16T", check=True)
    assert r.stderr == ""
    info = json.loads(run_blockrep("info", tmp_path / "vol", "--json", check=True).stdout)
    assert info["size"] == 16 << 40


def test_create_size_suffixes_are_powers_of_1024(tmp_path):
    for i, (text, size) in enumerate([("4K", 4096), ("3M", 3 << 20), ("1G", 1 << 30),
                                      ("8192", 8192)]):
        vol = tmp_path / f"v{i}"
        run_blockrep("create", vol, "--size", text, check=True)
        info = json.loads(run_blockrep("info", vol, "--json", check=True).stdout)
        assert info["size"] == size, text


def test_create_refuses_existing_non_empty_directory(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "precious.txt").write_text("do not touch\n")
    msg = assert_fails_cleanly(["create", vol, "--size", "64M"], tmp_path)
    assert "not empty" in msg or "exists" in msg


def test_create_refuses_existing_volume(tmp_path):
    vol = tmp_path / "vol"
    run_blockrep("create", vol, "--size", "64M", check=True)
    assert_fails_cleanly(["create", vol, "--size", "128M"], tmp_path)
    assert json.loads(run_blockrep("info", vol, "--json").stdout)["size"] == 64 << 20


def test_create_refuses_existing_file(tmp_path):
    (tmp_path / "vol").write_bytes(b"a file")
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M"], tmp_path)


def test_create_refuses_missing_parent_directory(tmp_path):
    msg = assert_fails_cleanly(["create", tmp_path / "no" / "such" / "vol", "--size", "64M"],
                               tmp_path)
    assert "does not exist" in msg


@pytest.mark.parametrize("backend", ["foo", "LSFS", ""])
def test_create_rejects_unknown_backend(tmp_path, backend):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", f"--backend={backend}"],
                         tmp_path)


def test_create_image_backend_needs_a_journal(tmp_path):
    msg = assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", "--backend", "image"], tmp_path)
    assert "--journal" in msg


def test_create_image_backend_refuses_a_non_empty_journal_dir(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x").write_text("someone's file")
    msg = assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", "--backend", "image",
                                "--journal", tmp_path / "j"], tmp_path)
    assert "not empty" in msg


def test_create_image_backend_refuses_a_journal_inside_the_volume(tmp_path):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", "--backend", "image",
                          "--journal", tmp_path / "vol" / "log"], tmp_path)


def test_create_rejects_journal_for_lsfs(tmp_path):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", "--journal",
                          tmp_path / "j"], tmp_path)


@pytest.mark.parametrize("gran", ["0", "1K", "512", "3K", "6K", "2G", "abc", "-4K"])
def test_create_rejects_bad_granularity(tmp_path, gran):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", f"--granularity={gran}"],
                         tmp_path)


@pytest.mark.parametrize("seg", ["512K", "257M", "1G", "0", "x"])
def test_create_rejects_bad_segment_size(tmp_path, seg):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", f"--segment-size={seg}"],
                         tmp_path)


@pytest.mark.parametrize("comp", ["lz4", "gzip", "ZSTD2"])
def test_create_rejects_unknown_compression(tmp_path, comp):
    assert_fails_cleanly(["create", tmp_path / "vol", "--size", "64M", f"--compress={comp}"],
                         tmp_path)


def test_unknown_command_and_missing_arguments(tmp_path):
    assert_fails_cleanly(["frobnicate", tmp_path], tmp_path, code=2)
    assert_fails_cleanly(["info"], tmp_path, code=2)
    assert_fails_cleanly([], tmp_path, code=2)


# ------------------------------------------------------------------- info / serve / stop on junk

def _make_bad_volume(tmp_path, kind):
    """A path that is not a usable volume, of the given kind."""
    vol = tmp_path / "vol"
    if kind == "missing":
        return vol
    if kind == "file":
        vol.write_bytes(b"not a directory\n")
        return vol
    if kind == "empty-dir":
        vol.mkdir()
        return vol
    if kind == "other-dir":
        vol.mkdir()
        (vol / "data.txt").write_text("hello\n")
        return vol
    run_blockrep("create", vol, "--size", "16M", check=True)
    meta = vol / "volume.json"
    doc = json.loads(meta.read_text())
    if kind == "version-99":
        doc["format_version"] = 99
        meta.write_text(json.dumps(doc))
    elif kind == "version-missing":
        del doc["format_version"]
        meta.write_text(json.dumps(doc))
    elif kind == "invalid-json":
        meta.write_text('{"format": "blockrep-vol')  # torn
    elif kind == "binary-garbage":
        meta.write_bytes(bytes(range(256)))
    elif kind == "not-an-object":
        meta.write_text("[1, 2, 3]\n")
    elif kind == "wrong-format-name":
        doc["format"] = "qcow2"
        meta.write_text(json.dumps(doc))
    elif kind == "bad-size-field":
        doc["size"] = "lots"
        meta.write_text(json.dumps(doc))
    elif kind == "volume-json-is-dir":
        meta.unlink()
        meta.mkdir()
    else:
        raise AssertionError(kind)
    return vol


BAD_VOLUMES = ["missing", "file", "empty-dir", "other-dir", "version-99", "version-missing",
               "invalid-json", "binary-garbage", "not-an-object", "wrong-format-name",
               "bad-size-field", "volume-json-is-dir"]


@pytest.mark.parametrize("kind", BAD_VOLUMES)
@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["serve"], ["stop"]])
def test_command_on_unusable_volume_fails_cleanly(tmp_path, command, kind):
    vol = _make_bad_volume(tmp_path, kind)
    msg = assert_fails_cleanly([command[0], vol, *command[1:]], tmp_path)
    if kind == "version-99":
        assert "unsupported format version 99" in msg
    assert "Traceback" not in msg
    # nothing was started
    assert not (tmp_path / "vol" / "nbdkit.pid").exists() if (tmp_path / "vol").is_dir() else True


# ------------------------------------------------------------------------------------ serving

def test_serve_twice_fails_and_first_server_keeps_serving(server):
    h = server.connect()
    h.pwrite(b"\x5a" * 4096, 8192)
    h.flush()
    pid = server.pid
    msg = assert_fails_cleanly(["serve", server.vol], server.vol)
    assert "already" in msg and str(pid) in msg
    # also through another socket path: the volume is owned, not just the socket
    assert_fails_cleanly(["serve", server.vol, "--socket", server.vol.parent / "other.sock"],
                         server.vol)
    assert not (server.vol.parent / "other.sock").exists()
    assert server.pid == pid
    assert h.pread(4096, 8192) == b"\x5a" * 4096
    h2 = server.connect()
    assert h2.pread(4096, 8192) == b"\x5a" * 4096


def test_serve_refuses_volume_opened_by_another_process(make_server):
    s = make_server(start=False)
    from engine.volume import Volume

    with Volume.open(s.vol) as v:
        before = tree_state(s.vol)
        r = run_blockrep("serve", s.vol)
        assert r.returncode != 0
        assert r.stderr.splitlines() and len(r.stderr.splitlines()) == 1
        assert r.stderr.startswith(ERROR_PREFIX) and "in use" in r.stderr
        assert not s.running
        assert tree_state(s.vol) == before
        del v


def _listening_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    return s, s.getsockname()[1]


def test_serve_listen_on_port_in_use(make_server):
    s = make_server(start=False)
    busy, port = _listening_port()
    with busy:
        msg = assert_fails_cleanly(["serve", s.vol, "--listen", f"127.0.0.1:{port}"], s.vol)
        assert "in use" in msg and str(port) in msg
        # all interfaces, same port
        assert_fails_cleanly(["serve", s.vol, "--listen", f"0.0.0.0:{port}"], s.vol)
    assert not s.running


def test_serve_listen_on_port_bound_but_not_listening(make_server):
    s = make_server(start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        assert_fails_cleanly(["serve", s.vol, "--listen", f"127.0.0.1:{port}"], s.vol)
    assert not s.running


@pytest.mark.parametrize("listen", ["", "abc", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0",
                                    "127.0.0.1:65536", "127.0.0.1:70000", "127.0.0.1:-5",
                                    ":x", "127.0.0.1:80a", "256.1.1.1:10809",
                                    "host.invalid:10809", "192.0.2.77:10809"])
def test_serve_rejects_bad_listen_value(make_server, listen):
    s = make_server(start=False)
    assert_fails_cleanly(["serve", s.vol, f"--listen={listen}"], s.vol)
    assert not s.running


def test_serve_rejects_socket_and_listen_together(make_server, tmp_path):
    s = make_server(start=False)
    assert_fails_cleanly(["serve", s.vol, "--socket", tmp_path / "x.sock", "--listen",
                          "127.0.0.1:10809"], s.vol, tmp_path / "x.sock")


def test_serve_rejects_missing_tls_psk_file(make_server, tmp_path):
    s = make_server(start=False)
    msg = assert_fails_cleanly(["serve", s.vol, "--tls-psk", tmp_path / "no-such.psk"], s.vol)
    assert "no-such.psk" in msg
    assert_fails_cleanly(["serve", s.vol, "--tls-psk", tmp_path], s.vol)  # a directory
    assert not s.running


def test_serve_refuses_socket_of_another_live_server(make_server, tmp_path):
    a = make_server("a")
    b = make_server("b", start=False)
    msg = assert_fails_cleanly(["serve", b.vol, "--socket", a.sock], b.vol, a.vol)
    assert "in use" in msg
    assert unix_socket_accepts(a.sock) and a.running


def test_serve_after_sigkill_cleans_stale_socket_and_pid_file(server):
    h = server.connect()
    h.pwrite(b"\xa5" * 65536, 1 << 20)
    h.flush()
    pid = server.kill()
    # a crash leaves both runtime files behind
    assert server.sock.exists() and not unix_socket_accepts(server.sock)
    assert int((server.vol / "nbdkit.pid").read_text()) == pid
    info = server.info()
    assert info["served"] is False
    r = run_blockrep("serve", server.vol)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{server.uri}\n" and r.stderr == ""  # the URI it serves, nothing else
    assert server.pid and server.pid != pid
    h = server.connect()
    assert h.pread(65536, 1 << 20) == b"\xa5" * 65536


def test_serve_after_sigkill_with_pid_file_naming_an_unrelated_process(server):
    server.kill()
    # pid reuse: the stale pid file now names a live process that is not nbdkit
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            (server.vol / "nbdkit.pid").write_text(f"{other.pid}\n")
            run_blockrep("serve", server.vol, check=True)
            assert pid_alive(other.pid), "serve must not kill an unrelated process"
            assert server.pid and server.pid != other.pid
        finally:
            other.kill()


def test_stop_returns_after_exit_and_socket_gone(server):
    pid = server.pid
    h = server.connect()
    h.pwrite(b"x" * 4096, 0)  # unflushed: a clean stop must keep it
    server.close_handles()
    r = run_blockrep("stop", server.vol)
    assert r.returncode == 0, r.stderr
    assert not pid_alive(pid), "stop returned before nbdkit exited"
    assert not server.sock.exists(), "stop returned with the socket still there"
    assert not (server.vol / "nbdkit.pid").exists()
    assert server.info()["served"] is False
    server.start()
    assert server.connect().pread(4096, 0) == b"x" * 4096


def test_stop_with_a_client_still_connected_keeps_its_unflushed_writes(server):
    """nbdkit waits for connected clients on SIGTERM: stop flushes through the control socket,
    then ends the server anyway after a grace period, losing nothing."""
    pid = server.pid
    h = server.connect()
    h.pwrite(b"y" * 8192, 1 << 20)  # acknowledged, never flushed; the client stays connected
    t0 = time.monotonic()
    r = run_blockrep("stop", server.vol)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30
    assert not pid_alive(pid)
    server.close_handles()
    server.start()
    assert server.connect().pread(8192, 1 << 20) == b"y" * 8192


def test_stop_after_sigkill_cleans_up_and_succeeds(server):
    server.kill()
    r = run_blockrep("stop", server.vol)
    assert r.returncode == 0, r.stderr
    assert not server.sock.exists() and not (server.vol / "nbdkit.pid").exists()


def test_stop_when_not_served_changes_nothing(make_server):
    s = make_server(start=False)
    before = tree_state(s.vol)
    r = run_blockrep("stop", s.vol)
    assert r.returncode == 0
    assert not r.stderr.startswith(ERROR_PREFIX)
    assert tree_state(s.vol) == before


def test_serve_on_tcp_and_stop(make_server):
    s = make_server(start=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_blockrep("serve", s.vol, "--listen", f"127.0.0.1:{port}", check=True)
    import nbd

    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/")
    h.pwrite(b"tcp!" * 1024, 4096)
    assert h.pread(4096, 4096) == b"tcp!" * 1024
    h.shutdown()
    assert s.info()["uri"] == f"nbd://127.0.0.1:{port}/"
    run_blockrep("stop", s.vol, check=True)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ------------------------------------------------------------------------------------ info

INFO_KEYS = {"size": int, "backend": str, "granularity": int, "used_bytes": int}


def _check_info(info, size, granularity):
    for k, t in INFO_KEYS.items():
        assert k in info, f"info --json lacks {k}: {info}"
        assert isinstance(info[k], t), (k, info[k])
    assert info["size"] == size
    assert info["backend"] == "lsfs"
    assert info["granularity"] == granularity
    assert info["used_bytes"] >= 0


def test_info_json_not_served(make_server):
    s = make_server(size="32M", create_args=["--granularity", "64K"], start=False)
    info = s.info()
    _check_info(info, 32 << 20, 64 << 10)
    assert info["served"] is False


def test_info_json_served_and_used_bytes_grows(make_server):
    s = make_server(size="32M")
    info0 = s.info()
    _check_info(info0, 32 << 20, 4096)
    assert info0["served"] is True and info0["server_pid"] == s.pid
    h = s.connect()
    h.pwrite(bytes(range(256)) * 4096 * 4, 0)  # 4 MiB
    h.flush()
    info1 = s.info()
    _check_info(info1, 32 << 20, 4096)
    assert info1["used_bytes"] >= info0["used_bytes"] + (4 << 20)
    s.stop()
    info2 = s.info()
    _check_info(info2, 32 << 20, 4096)
    assert info2["served"] is False
    assert info2["used_bytes"] >= 4 << 20


def test_info_human_output_mentions_size_and_backend(make_server):
    s = make_server(size="32M", start=False)
    r = run_blockrep("info", s.vol, check=True)
    assert "lsfs" in r.stdout and "32.0 MiB" in r.stdout and r.stderr == ""


def test_blockrep_binary_is_the_venv_one(blockrep_bin):
    assert blockrep_bin == BLOCKREP
    r = subprocess.run([blockrep_bin, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "serve" in r.stdout
