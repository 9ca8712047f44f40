"""`blockrep psk create FILE USER` makes a PSK file nbdkit and libnbd accept (a real TLS server
and client use it), mode 0600, never replacing one; `serve --tls-psk` refuses a malformed file
with one line before nbdkit starts (GnuTLS itself would only fail every handshake, silently)."""

from __future__ import annotations

import os
import re
import stat

import nbd
import pytest
from conftest import run_blockrep, tree_state
from test_cli_errors import assert_fails_cleanly
from test_tls import free_port


def test_psk_create_writes_one_user_hexkey_line_mode_0600(tmp_path):
    f = tmp_path / "psk"
    old = os.umask(0)  # the mode does not depend on the caller's umask
    try:
        r = run_blockrep("psk", "create", f, "alice", check=True)
    finally:
        os.umask(old)
    assert r.stderr == "" and str(f) in r.stdout and "nbds://alice@" in r.stdout
    assert re.fullmatch(r"alice:[0-9a-f]{64}\n", f.read_text()), f.read_text()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    g = tmp_path / "psk2"
    run_blockrep("psk", "create", g, "alice", check=True)
    assert f.read_text() != g.read_text()  # a fresh random key each time


def test_psk_create_refuses_to_overwrite(tmp_path):
    f = tmp_path / "psk"
    f.write_text("precious\n")
    msg = assert_fails_cleanly(["psk", "create", f, "alice"], tmp_path)
    assert "already exists" in msg and f.read_text() == "precious\n"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")  # a dangling symlink is not followed either
    assert_fails_cleanly(["psk", "create", link, "alice"], tmp_path)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("user", ["", "a:b", "al ice", "tab\there", "new\nline", "x" * 65, "é"])
def test_psk_create_refuses_a_bad_user(tmp_path, user):
    msg = assert_fails_cleanly(["psk", "create", tmp_path / "psk", user], tmp_path)
    assert "PSK user" in msg
    assert not (tmp_path / "psk").exists()


def test_psk_create_in_a_missing_directory_fails_in_one_line(tmp_path):
    assert_fails_cleanly(["psk", "create", tmp_path / "no" / "psk", "alice"], tmp_path)


def test_a_created_psk_file_serves_tls_and_its_user_connects(make_server, tmp_path):
    f = tmp_path / "psk"
    run_blockrep("psk", "create", f, "bob", check=True)
    port = free_port()
    s = make_server(start=False, serve_args=["--listen", f"127.0.0.1:{port}", "--tls-psk", f])
    r = run_blockrep("serve", s.vol, *s.serve_args, check=True)
    assert r.stderr == ""  # 0600: no warning
    uri = f"nbds://bob@127.0.0.1:{port}/?tls-psk-file={f}"
    assert r.stdout == uri + "\n"  # serve names the PSK's user in the URI it prints
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"k" * 4096, 0)
        assert h.pread(4096, 0) == b"k" * 4096
    finally:
        h.shutdown()


KEY = "ab" * 32


@pytest.mark.parametrize("content, words", [
    ("", "no USER:HEXKEY"),
    ("\n\n", "no USER:HEXKEY"),
    (f"{KEY}\n", "line 1"),                      # no user
    (f":{KEY}\n", "line 1"),                     # empty user
    (f"alice {KEY}\n", "line 1"),                # no colon
    (f"al ice:{KEY}\n", "line 1"),               # whitespace in the user
    ("alice:\n", "hex"),                         # empty key
    ("alice:abc\n", "hex"),                      # odd number of hex digits
    ("alice:zz11\n", "hex"),                     # not hex
    (f"alice:{KEY} \n", "hex"),                  # trailing space is part of the key to GnuTLS
    (f"alice:{KEY}\nbob:12345\n", "line 2"),
    (f"alice:{KEY}\nalice:{KEY}\n", "twice"),
    ("alice:\xe9\xe9\n", "not text"),
])
def test_serve_refuses_a_malformed_psk_file(make_server, tmp_path, content, words):
    s = make_server(start=False)
    f = tmp_path / "psk"
    f.write_bytes(content.encode("latin-1"))
    f.chmod(0o600)
    msg = assert_fails_cleanly(["serve", s.vol, "--listen", f"127.0.0.1:{free_port()}", "--tls-psk", f],
                               s.vol, tmp_path / "psk")
    assert words in msg and str(f) in msg, msg
    assert not s.running


def test_serve_refuses_a_missing_or_non_file_psk(make_server, tmp_path):
    s = make_server(start=False)
    msg = assert_fails_cleanly(["serve", s.vol, "--tls-psk", tmp_path / "nope"], s.vol)
    assert "does not exist" in msg
    msg = assert_fails_cleanly(["serve", s.vol, "--tls-psk", tmp_path], s.vol)
    assert "not a regular file" in msg
    assert not s.running


def test_serve_warns_about_a_psk_file_others_can_read_but_serves(make_server, tmp_path):
    f = tmp_path / "psk"
    f.write_text(f"alice:{KEY}\n")
    f.chmod(0o644)
    before = tree_state(f)
    s = make_server(start=False)
    r = run_blockrep("serve", s.vol, "--tls-psk", f, check=True)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockrep: warning:") and "0644" in lines[0], lines
    assert r.stdout.startswith("nbds+unix://alice@/") and s.running
    assert tree_state(f) == before  # a warning, not a fix behind the owner's back
