"""send/receive streams (issue 10 item 5, docs/STREAM.md) with real servers: full and incremental
streams equal the source, through a pipe too; every kind of damaged, truncated or foreign stream
is refused with nothing committed and earlier snapshots untouched; an interrupted receive (a bad
record, a SIGKILL) resumes from its token with only the rest sent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
from blockdev import sh
from conftest import BLOCKREP, run_blockrep

pytestmark = pytest.mark.slow
MiB = 1 << 20


def digest(server, name: str) -> str:
    out = subprocess.run(["nbdcopy", f"nbd+unix:///@{name}?socket={server.sock}", "-"], capture_output=True,
                         check=True).stdout
    return hashlib.sha256(out).hexdigest()


def write(server, pattern, off_mib, mib=1):
    sh("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {off_mib}M {mib}M", server.uri)


def write_random(server, off_mib, mib, tmp_path):
    f = tmp_path / f"r{off_mib}"
    f.write_bytes(os.urandom(mib * MiB))
    sh("qemu-io", "-f", "raw", "-c", f"write -s {f} {off_mib}M {mib}M", server.uri)


def snapshots(server) -> list[dict]:
    return json.loads(run_blockrep("snapshot", "list", server.vol, "--json", check=True).stdout)


def send(server, *args) -> None:
    run_blockrep("send", server.vol, *args, check=True, timeout=300)


def receive(server, path, *extra):
    return run_blockrep("receive", server.vol, "-i", path, *extra, timeout=300)


def one_error(r) -> str:
    assert r.returncode != 0 and r.stderr.count("blockrep: error:") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture
def pair(make_server, tmp_path):
    p, r = make_server("p"), make_server("r")
    write_random(p, 0, 6, tmp_path)
    write(p, 0x41, 20, 2)
    run_blockrep("snapshot", "create", p.vol, "--name", "a", check=True)
    write_random(p, 30, 3, tmp_path)
    sh("qemu-io", "-f", "raw", "-c", "discard 20M 1M", p.uri)
    run_blockrep("snapshot", "create", p.vol, "--name", "b", check=True)
    return p, r


def test_full_and_incremental_streams_equal_the_source(pair, tmp_path):
    p, r = pair
    send(p, "a", "-o", tmp_path / "a.bs")
    send(p, "b", "--from", "a", "-o", tmp_path / "ab.bs")
    assert (tmp_path / "ab.bs").stat().st_size < 3.2 * MiB  # only the changes (3 MiB random, a trim)
    assert receive(r, tmp_path / "a.bs").returncode == 0
    assert receive(r, tmp_path / "ab.bs").returncode == 0
    got = {s["name"]: s["uuid"] for s in snapshots(r)}
    want = {s["name"]: s["uuid"] for s in snapshots(p)}
    assert got == want  # names and identities carried
    for n in ("a", "b"):
        assert digest(r, n) == digest(p, n)


def test_through_a_pipe(pair):
    p, r = pair
    cmd = f"{BLOCKREP} send {p.vol} b | {BLOCKREP} receive {r.vol}"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert digest(r, "b") == digest(p, "b")


def _damaged(data: bytes) -> dict[str, bytes]:
    n = len(data)
    return {
        "not a stream": os.urandom(4096),
        "empty": b"",
        "header bit": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "record bit": data[: n // 2] + bytes([data[n // 2] ^ 0x10]) + data[n // 2 + 1:],
        "last byte": data[:-1] + bytes([data[-1] ^ 1]),
        "truncated in the header": data[:30],
        "truncated mid-way": data[: n // 2],
        "truncated before the end record": data[:-60],
        "a record dropped": data[:200] + data[200:],  # replaced below by a real drop
    }


def test_every_damaged_stream_is_refused_with_nothing_committed(pair, tmp_path):
    p, r = pair
    send(p, "a", "-o", tmp_path / "a.bs")
    data = (tmp_path / "a.bs").read_bytes()
    cases = _damaged(data)
    # drop one whole record: find the second record's start from the stream layout
    import struct
    hlen = struct.unpack("<I", data[20:24])[0]
    first = 24 + hlen + 16
    plen = struct.unpack("<I", data[first + 4:first + 8])[0]
    second = first + 24 + plen + 16
    cases["a record dropped"] = data[:first] + data[second:]
    for what, blob in cases.items():
        f = tmp_path / "bad.bs"
        f.write_bytes(blob)
        res = receive(r, f, "--force")  # --force: earlier failed cases may have left data
        one_error(res)
        assert not snapshots(r), (what, snapshots(r))
    # an increment whose base the receiver does not hold; a stream of another size
    send(p, "b", "--from", "a", "-o", tmp_path / "ab.bs")
    assert "does not hold" in one_error(receive(r, tmp_path / "ab.bs"))
    small = tmp_path / "small"
    run_blockrep("create", small, "--size", "32M", check=True)
    assert "bytes" in one_error(run_blockrep("receive", small, "-i", tmp_path / "a.bs"))


def test_earlier_snapshots_are_untouched_and_duplicates_refused(pair, tmp_path):
    p, r = pair
    send(p, "a", "-o", tmp_path / "a.bs")
    send(p, "b", "--from", "a", "-o", tmp_path / "ab.bs")
    assert receive(r, tmp_path / "a.bs").returncode == 0
    before = digest(r, "a")
    data = (tmp_path / "ab.bs").read_bytes()
    (tmp_path / "bad.bs").write_bytes(data[: len(data) // 2])
    one_error(receive(r, tmp_path / "bad.bs"))
    assert [s["name"] for s in snapshots(r)] == ["a"] and digest(r, "a") == before
    assert "already holds" in one_error(receive(r, tmp_path / "a.bs"))


def test_a_stopped_receive_resumes_from_its_token(pair, tmp_path):
    p, r = pair
    send(p, "a", "-o", tmp_path / "a.bs")
    data = (tmp_path / "a.bs").read_bytes()
    (tmp_path / "cut.bs").write_bytes(data[: int(len(data) * 0.7)])
    err = one_error(receive(r, tmp_path / "cut.bs"))
    token = err.split("--resume ", 1)[1].split()[0]
    send(p, "a", "--resume", token, "-o", tmp_path / "rest.bs")
    assert (tmp_path / "rest.bs").stat().st_size < 0.6 * len(data)  # only the rest
    assert receive(r, tmp_path / "rest.bs").returncode == 0
    assert digest(r, "a") == digest(p, "a")
    assert not (r.vol / "receive.json").exists()


def test_a_killed_receive_resumes_from_the_token_it_left(make_server, tmp_path):
    p, r = make_server("p", size="256M"), make_server("r", size="256M")
    write_random(p, 0, 160, tmp_path)
    run_blockrep("snapshot", "create", p.vol, "--name", "a", check=True)
    send(p, "a", "-o", tmp_path / "a.bs")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([BLOCKREP, "receive", str(r.vol), "-i", str(fifo)], stderr=subprocess.PIPE)
    with open(fifo, "wb") as w:
        data = (tmp_path / "a.bs").read_bytes()
        w.write(data[: 100 * MiB])
        w.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it saved progress past the first 64 MiB
            rec = json.loads((r.vol / "receive.json").read_text()) if (r.vol / "receive.json").exists() else {}
            if rec.get("upto", 0) >= 64 * MiB:
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    token = run_blockrep("receive", r.vol, "--resume-token", check=True).stdout.strip()
    send(p, "a", "--resume", token, "-o", tmp_path / "rest.bs")
    assert (tmp_path / "rest.bs").stat().st_size < 0.7 * len(data)
    assert receive(r, tmp_path / "rest.bs").returncode == 0, "the killed receive's hold was released"
    assert digest(r, "a") == digest(p, "a")


def test_a_stream_seeded_replica_continues_over_the_network_and_back(make_server, tmp_path):
    """Seed offline, replicate over NBD (incremental from the stream's snapshot), then an
    offline increment into the network DR, then the network again: never a full copy."""
    p, d = make_server("p"), make_server("d", serve_args=("--keep", "5", "--keep-min-age", "0"))
    write_random(p, 0, 8, tmp_path)
    run_blockrep("snapshot", "create", p.vol, "--name", "s1", check=True)
    send(p, "s1", "-o", tmp_path / "full")
    assert receive(d, tmp_path / "full").returncode == 0
    info = json.loads(run_blockrep("info", d.vol, "--json", check=True).stdout)
    assert info["role"] == "dr" and info["bound_to"] == json.loads(
        run_blockrep("info", p.vol, "--json", check=True).stdout)["uuid"]
    write(p, 0x51, 30)
    r = json.loads(run_blockrep("replicate", p.vol, "--to", d.uri, "--json", check=True).stdout)
    assert r["mode"] == "incremental" and r["base"] == "s1" and r["bytes_sent"] <= 1 * MiB, r
    write(p, 0x52, 40)
    run_blockrep("snapshot", "create", p.vol, "--name", "s3", check=True)
    send(p, "--from", r["snapshot"], "s3", "-o", tmp_path / "inc")  # the link is down: by courier
    assert receive(d, tmp_path / "inc").returncode == 0, "a DR takes streams from its own primary"
    assert digest(d, "s3") == digest(p, "s3")
    created = {s["name"]: s["created"] for s in snapshots(p)}
    assert {s["name"]: s["created"] for s in snapshots(d) if s["name"] in ("s1", "s3")} == \
        {n: created[n] for n in ("s1", "s3")}  # when they were taken at the source, not received
    write(p, 0x53, 50)
    r = json.loads(run_blockrep("replicate", p.vol, "--to", d.uri, "--json", check=True).stdout)
    assert r["mode"] == "incremental" and r["base"] == "s3" and r["bytes_sent"] <= 1 * MiB, r
    # a stream of another volume is refused by this DR, with nothing changed
    o = make_server("o")
    write(o, 0x61, 0)
    run_blockrep("snapshot", "create", o.vol, "--name", "o1", check=True)
    send(o, "o1", "-o", tmp_path / "other")
    before = [s["uuid"] for s in snapshots(d)]
    assert "another primary" in one_error(receive(d, tmp_path / "other", "--force"))
    assert [s["uuid"] for s in snapshots(d)] == before
