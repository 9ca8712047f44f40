"""R17 (part): `blockrep serve --tls-psk` requires TLS; the right PSK connects, plaintext and a
wrong key are refused before any data moves. `replicate` and `verify` with a wrong key or user
say so ("TLS handshake failed: wrong PSK or user?"), not "target unreachable", and do not retry."""

import json
import os
import secrets
import socket
import subprocess
import time

import nbd
import pytest
from conftest import run_blockrep

from engine.replication import nbdio

BLOCKREP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "blockrep")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_server(tmp_path):
    vol = tmp_path / "v"
    subprocess.run([BLOCKREP, "create", str(vol), "--size", "16M"], check=True, capture_output=True)
    psk = tmp_path / "psk"
    psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    port = free_port()
    subprocess.run([BLOCKREP, "serve", str(vol), "--listen", f"127.0.0.1:{port}", "--tls-psk", str(psk)],
                   check=True, capture_output=True)
    yield port, psk, tmp_path
    subprocess.run([BLOCKREP, "stop", str(vol)], capture_output=True)


def _connect(uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h


def test_right_psk_connects_and_moves_data(tls_server):
    port, psk, _ = tls_server
    h = _connect(f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}")
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"secret" * 100, 4096)
        h.flush()
        assert h.pread(600, 4096) == b"secret" * 100
    finally:
        h.shutdown()


def test_plaintext_client_is_refused(tls_server):
    port, _, _ = tls_server
    with pytest.raises(nbd.Error):
        _connect(f"nbd://127.0.0.1:{port}/")


def test_wrong_key_is_refused(tls_server):
    port, _, tmp_path = tls_server
    wrong = tmp_path / "wrong"
    wrong.write_text(f"alice:{secrets.token_hex(32)}\n")
    with pytest.raises(nbd.Error):
        _connect(f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={wrong}")


def test_unknown_user_is_refused(tls_server):
    port, psk, tmp_path = tls_server
    other = tmp_path / "other"
    other.write_text("mallory:" + psk.read_text().split(":", 1)[1])
    with pytest.raises(nbd.Error):
        _connect(f"nbds://mallory@127.0.0.1:{port}/?tls-psk-file={other}")


# ------------------------------------------------ replicate / verify with a wrong key or user

TLS_HINT = "TLS handshake failed: wrong PSK or user?"


def _bad_psk_uris(port, psk, tmp_path) -> dict[str, str]:
    """URIs to the TLS server that it must refuse: a wrong key for alice, and a user it does not
    know (mallory, holding alice's key)."""
    wrong = tmp_path / "wrong"
    wrong.write_text(f"alice:{secrets.token_hex(32)}\n")
    other = tmp_path / "other"
    other.write_text("mallory:" + psk.read_text().split(":", 1)[1])
    return {"wrong key": f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={wrong}",
            "wrong user": f"nbds://mallory@127.0.0.1:{port}/?tls-psk-file={other}"}


@pytest.fixture
def primary(make_server):
    p = make_server("primary", size="16M")
    h = p.connect()
    h.pwrite(b"\x5a" * 65536, 0)
    h.flush()
    run_blockrep("snapshot", "create", p.vol, "--name", "s1", check=True)
    return p


def _one_tls_error(r) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("blockrep: error: "), r.stderr
    assert TLS_HINT in lines[0] and "unreachable" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["wrong key", "wrong user"])
def test_replicate_with_a_wrong_psk_says_tls_handshake_failed_and_does_not_retry(tls_server, primary, case):
    port, psk, tmp_path = tls_server
    bad = _bad_psk_uris(port, psk, tmp_path)[case]
    t0 = time.monotonic()
    r = run_blockrep("replicate", primary.vol, "--to", bad, "--snapshot", "s1")
    took = time.monotonic() - t0
    _one_tls_error(r)
    assert took < 15, f"took {took:.1f} s: retried (backoff 1, 2, 4 … s) instead of failing at once"
    rows = json.loads(run_blockrep("status", primary.vol, "--json", check=True).stdout)
    assert [row["state"] for row in rows] == ["failing"] and TLS_HINT in rows[0]["last_failure"]["error"]
    # --json says it too, and the right key still works afterwards
    out = json.loads(run_blockrep("replicate", primary.vol, "--to", bad, "--snapshot", "s1", "--json").stdout)
    assert TLS_HINT in out["error"]
    good = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}"
    res = json.loads(run_blockrep("replicate", primary.vol, "--to", good, "--snapshot", "s1", "--json",
                                  check=True).stdout)
    assert res["snapshot"] == "s1" and res["bytes_sent"] == 65536


@pytest.mark.parametrize("case", ["wrong key", "wrong user"])
def test_verify_with_a_wrong_psk_says_tls_handshake_failed(tls_server, primary, case):
    port, psk, tmp_path = tls_server
    good = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}"
    run_blockrep("replicate", primary.vol, "--to", good, "--snapshot", "s1", check=True)
    bad = _bad_psk_uris(port, psk, tmp_path)[case]
    _one_tls_error(run_blockrep("verify", primary.vol, "s1", "--against", bad))
    run_blockrep("verify", primary.vol, "s1", "--against", good, check=True)


def test_a_user_missing_from_our_own_psk_file_is_a_tls_error_too(tls_server, primary):
    port, psk, _ = tls_server
    r = run_blockrep("replicate", primary.vol, "--to", f"nbds://bob@127.0.0.1:{port}/?tls-psk-file={psk}",
                     "--snapshot", "s1")
    assert "bob" in _one_tls_error(r)


@pytest.mark.parametrize("case", ["wrong key", "wrong user"])
def test_a_failed_handshake_is_permanent_for_the_retry_logic(tls_server, case):
    """What the retry loops consult: libnbd's error for a refused handshake is not transient,
    and connect() raises TLSAuthError (not a TransferError, which they would retry)."""
    port, psk, tmp_path = tls_server
    bad = _bad_psk_uris(port, psk, tmp_path)[case]
    with pytest.raises(nbd.Error) as raw:
        _connect(bad)
    assert not nbdio.is_transient(raw.value), raw.value.string
    with pytest.raises(nbdio.TLSAuthError) as e:
        nbdio.connect(bad)
    assert not isinstance(e.value, nbdio.TransferError) and e.value.transient is False
    assert str(e.value).startswith(TLS_HINT)


def test_an_unreachable_tls_target_is_still_transient_not_a_tls_error(tmp_path):
    """A port nobody listens on: the socket never connects, no handshake happened."""
    port = free_port()
    psk = tmp_path / "psk"
    psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    with pytest.raises(nbdio.TransferError) as e:
        nbdio.connect(f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}")
    assert e.value.transient and TLS_HINT not in str(e.value)
