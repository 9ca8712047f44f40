"""R17 (part): `blockrep serve --tls-psk` requires TLS; the right PSK connects, plaintext and a
wrong key are refused before any data moves."""

import os
import secrets
import socket
import subprocess

import nbd
import pytest

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
