"""What an operator reads: `serve` prints the URI it serves (DESIGN §4), `snapshot list` has
column headers and marks the snapshot each replication target holds (its URI without a
password), and `status --max-rpo` exits 2 (not 1) when a target is behind, for monitoring."""

from __future__ import annotations

import json
import time

import nbd
import pytest
from conftest import run_blockrep
from replhelp import replicate, snapshot, write_blocks
from test_tls import free_port

from engine.replication.uris import redact_uri

MiB = 1 << 20


# ---------------------------------------------------------------------- serve prints its URI

def _serve(s, *args) -> str:
    r = run_blockrep("serve", s.vol, *args, check=True)
    assert r.stderr == "" and r.stdout.count("\n") == 1, (r.stdout, r.stderr)
    return r.stdout.strip()


def _reads(uri: str) -> bytes:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    try:
        return h.pread(4096, 0)
    finally:
        h.shutdown()


def test_serve_prints_the_unix_uri_clients_use(make_server, tmp_path):
    s = make_server(start=False)
    uri = _serve(s)
    assert uri == f"nbd+unix:///?socket={s.vol / 'nbd.sock'}"
    assert _reads(uri) == bytes(4096)
    assert s.info()["uri"] == uri  # the same as `info` says
    s.stop()
    other = tmp_path / "other.sock"
    assert _serve(s, "--socket", other) == f"nbd+unix:///?socket={other}"


def test_serve_listen_prints_the_tcp_uri(make_server):
    s = make_server(start=False)
    port = free_port()
    uri = _serve(s, "--listen", f"127.0.0.1:{port}")
    assert uri == f"nbd://127.0.0.1:{port}/"
    assert _reads(uri) == bytes(4096)


def test_a_failed_serve_prints_no_uri(server):
    r = run_blockrep("serve", server.vol)  # already served
    assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("blockrep: error:")


# ------------------------------------------------------- snapshot list: headers and targets

def _rows(vol) -> list[list[str]]:
    lines = run_blockrep("snapshot", "list", vol, check=True).stdout.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "CHANGED", "PINS", "TARGETS"], lines
    return [ln.split(None, 6) for ln in lines[1:]]


def test_snapshot_list_has_headers_even_with_no_snapshots(server):
    assert _rows(server.vol) == []


def test_snapshot_list_marks_what_each_target_holds_without_passwords(make_server):
    p = make_server("primary", size="16M")
    d1 = make_server("dr1", size="16M")
    d2 = make_server("dr2", size="16M")
    write_blocks(p.uri, {0: b"\x11" * 4096})
    snapshot(p.vol, "s1")
    write_blocks(p.uri, {MiB: b"\x22" * 4096})
    snapshot(p.vol, "s2")
    secret_uri = f"nbd+unix://joe:hunter2@/?socket={d2.sock}"  # libnbd takes user:password@
    replicate(p.vol, d1.uri, "--snapshot", "s1")
    replicate(p.vol, secret_uri, "--snapshot", "s1")
    replicate(p.vol, secret_uri, "--snapshot", "s2")

    rows = {r[0]: r for r in _rows(p.vol)}
    assert list(rows) == ["s1", "s2"]
    shown = f"nbd+unix://joe@/?socket={d2.sock}"
    # NAME CREATED CHANGED(2 words) PINS(2 words) TARGETS
    assert rows["s1"][6] == d1.uri and rows["s2"][6] == shown, rows
    out = run_blockrep("snapshot", "list", p.vol, check=True).stdout
    assert "hunter2" not in out and "CHANGED" in out

    snaps = json.loads(run_blockrep("snapshot", "list", p.vol, "--json", check=True).stdout)
    assert isinstance(snaps, list) and [s["name"] for s in snaps] == ["s1", "s2"]
    assert [s["targets"] for s in snaps] == [[d1.uri], [shown]]
    assert all("uuid" in s and "created" in s for s in snaps)

    replicate(p.vol, d1.uri, "--snapshot", "s2")  # d1 moves on to s2
    rows = {r[0]: r for r in _rows(p.vol)}
    assert rows["s1"][6] == "-" and rows["s2"][6] == f"{d1.uri}, {shown}"
    p.stop()  # not served: the same listing, read from the files
    rows = {r[0]: r for r in _rows(p.vol)}
    assert rows["s2"][6] == f"{d1.uri}, {shown}"


@pytest.mark.parametrize("uri, shown", [
    ("nbds://alice:s3cret@dr:10809/?tls-psk-file=/etc/k", "nbds://alice@dr:10809/?tls-psk-file=/etc/k"),
    ("nbds://alice@dr:10809/?tls-psk-file=/etc/k", "nbds://alice@dr:10809/?tls-psk-file=/etc/k"),
    ("nbd+unix://joe:pw@/@snap?socket=/s.sock", "nbd+unix://joe@/@snap?socket=/s.sock"),
    ("nbd://:pw@host/", "nbd://host/"),
    ("nbd+unix:///?socket=/a b.sock", "nbd+unix:///?socket=/a b.sock"),
    ("nbd://[::1]:10809/", "nbd://[::1]:10809/"),
    ("nbd://u:p@[::1:10809/", "<unparsable URI>"),
])
def test_redact_uri_drops_only_the_password(uri, shown):
    assert redact_uri(uri) == shown


# --------------------------------------------------------------- status --max-rpo: exit 2

def test_status_max_rpo_exits_2_when_behind_or_unknown_and_0_when_not(make_server, tmp_path):
    p = make_server("primary", size="16M")
    d = make_server("dr", size="16M")
    replicate(p.vol, d.uri)
    assert run_blockrep("status", p.vol, "--max-rpo", "3600").returncode == 0
    r = run_blockrep("status", p.vol, "--max-rpo", "0", "--json")
    if r.returncode == 0:  # replicated within this very second: RPO 0 is not above 0
        time.sleep(1.1)
        r = run_blockrep("status", p.vol, "--max-rpo", "0", "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"blockrep: error: RPO above 0 s for {d.uri}"]
    assert json.loads(r.stdout)[0]["target"] == d.uri  # the report is still printed
    # a target whose RPO is unknown (never succeeded) is behind too
    gone = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    assert run_blockrep("replicate", p.vol, "--to", gone, "--snapshot",
                        json.loads(r.stdout)[0]["snapshot"]).returncode == 1
    r = run_blockrep("status", p.vol, "--max-rpo", "3600")
    assert r.returncode == 2 and gone in r.stderr and d.uri not in r.stderr.split("for", 1)[1]
    # a command that fails is 1, apart from "behind"
    assert run_blockrep("status", tmp_path / "novol", "--max-rpo", "3600").returncode == 1
