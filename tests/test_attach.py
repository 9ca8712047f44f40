"""`blockrep attach` / `detach` (issue 10 item 3) with real parts: nbdkit's nbd plugin and cow
filter, nbdfuse, loop devices, XFS/ext4/btrfs/swap on GPT and MBR, LVM (metadata only: this host
has no device-mapper; tests/test_kernel_nbd_client.py activates the LVs in a guest). A DR snapshot
with a new identity mounts beside its mounted original; the snapshot is unchanged; TLS-PSK URIs
work; bad input and failures leave nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import nbd
import pytest
from blockdev import mounted, sh
from conftest import BLOCKREP, run_blockrep, tree_state
from replhelp import replicate, snap_uri

from engine import identity

pytestmark = pytest.mark.slow
MiB = 1 << 20
STATE = "/run/blockrep/attach"


def digest(uri: str) -> str:
    h = hashlib.sha256()
    c = nbd.NBD()
    c.set_uri_allow_local_file(True)
    c.connect_uri(uri)
    try:
        size = c.get_size()
        for off in range(0, size, 8 * MiB):
            h.update(c.pread(min(8 * MiB, size - off), off))
    finally:
        c.shutdown()
    return h.hexdigest()


def attach(uri, *args) -> str:
    r = run_blockrep("attach", uri, *args, timeout=300)
    assert r.returncode == 0, r.stderr
    dev = r.stdout.strip()
    assert dev.startswith("/dev/loop"), r.stdout
    return dev


def blkid(dev: str) -> dict:
    out = sh("blkid", "-p", "-o", "export", dev, check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def attachments() -> list[str]:
    return sorted(os.listdir(STATE)) if os.path.isdir(STATE) else []


def loops() -> str:
    return sh("losetup", "-a").stdout


def lvm(cmd: str, *args) -> str:
    """An lvm command with the config attach's own LVM work uses (no device-mapper here)."""
    return sh("lvm", cmd, "--config", identity.LVM_CONFIG, *args).stdout


@contextlib.contextmanager
def lv_device(pv: str, vg: str, lv: str, read_only: bool = False):
    """A loop device over a linear LV's extents on pv: the LV without device-mapper."""
    (_, dev, offset, length), = [x for x in identity.linear_lvs(vg, [pv]) if x[0] == lv]
    loop = sh("losetup", "-f", "--show", *(["-r"] if read_only else []), "-o", offset, "--sizelimit", length,
              dev).stdout.strip()
    try:
        yield loop
    finally:
        sh("losetup", "-d", loop, check=False)


LVM_VG = "brlvmtest"
LVM_LETTERS = {"e": "ext4 in an LV", "x": "XFS in an LV"}


def make_lvm_disk(dev: str, tmp_path: Path) -> None:
    """dev: GPT, p1 an LVM PV of VG LVM_VG with LVs e (ext4) and x (XFS, 320 MiB: XFS's minimum is
    300 MB), each holding a file `letter` (LVM_LETTERS). The LVs are never activated: their
    filesystems are made and written through loop devices over their extents."""
    subprocess.run(["sfdisk", "-q", dev], input="label: gpt\n,,E6D6D379-F507-44C2-A23C-238F2A3DF928\n",
                   text=True, check=True, capture_output=True)
    sh("partx", "-a", dev, check=False)
    lvm("pvcreate", f"{dev}p1")
    lvm("vgcreate", LVM_VG, f"{dev}p1")
    lvm("lvcreate", "-an", "-Zn", "-L", "64M", "-n", "e", LVM_VG)
    lvm("lvcreate", "-an", "-Zn", "-L", "320M", "-n", "x", LVM_VG)
    for lv, mkfs in (("e", ["mkfs.ext4", "-q", "-F"]), ("x", ["mkfs.xfs", "-q", "-f"])):
        with lv_device(f"{dev}p1", LVM_VG, lv) as ld:
            sh(*mkfs, ld)
            with mounted(ld, tmp_path / f"make-{lv}") as m:
                (m / "letter").write_text(LVM_LETTERS[lv])


def pv_ids(pv: str) -> dict:
    """pv_uuid, vg_name, vg_uuid of the PV on pv, as lvm sees that device alone."""
    out = json.loads(lvm("pvs", "--devices", pv, "--reportformat", "json", "-o", "pv_uuid,vg_name,vg_uuid", pv))
    (row,) = out["report"][0]["pv"]
    return row


def one_error(r) -> str:
    assert r.returncode != 0 and r.stderr.count("blockrep: error:") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture
def clean():
    """Every attachment a test made is detached afterwards, even when it failed."""
    before = set(attachments())
    yield
    for d in set(attachments()) - before:
        st = json.loads((Path(STATE) / d / "state.json").read_text())
        subprocess.run([BLOCKREP, "detach", st.get("device") or d], capture_output=True, timeout=120)


def test_a_snapshot_with_a_new_identity_mounts_beside_its_mounted_original(server, tmp_path, clean):
    run_blockrep("stop", server.vol, check=True)
    run_blockrep("create", tmp_path / "big", "--size", "1G", check=True)  # XFS needs 300 MB
    from conftest import Server
    p = Server(tmp_path / "big").start()
    try:
        dev = attach(p.uri)
        subprocess.run(["sfdisk", "-q", dev], input="label: gpt\n,400M\n,\n", text=True, check=True,
                       capture_output=True)
        sh("partx", "-a", dev, check=False)
        sh("mkfs.xfs", "-q", "-f", f"{dev}p1")
        sh("mkfs.ext4", "-q", "-F", f"{dev}p2")
        with mounted(f"{dev}p1", tmp_path / "orig") as m:
            (m / "letter").write_text("dear DR")
            sh("sync")
            run_blockrep("snapshot", "create", p.vol, "--name", "s1", check=True)
            snap = f"nbd+unix:///@s1?socket={p.sock}"
            before = digest(snap)
            r = run_blockrep("attach", snap, "--new-identity", "--mount", tmp_path / "copy", "--json", timeout=300)
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            copy = st["device"]
            assert (tmp_path / "copy" / "letter").read_text() == "dear DR"  # mounted beside the original
            (tmp_path / "copy" / "scribble").write_text("local only")      # writes stay in the overlay
            a, b = blkid(dev), blkid(copy)
            assert a["PTUUID"] != b["PTUUID"]
            for n in ("p1", "p2"):
                x, y = blkid(dev + n), blkid(copy + n)
                assert x["TYPE"] == y["TYPE"] and x["UUID"] != y["UUID"]
                assert x["PART_ENTRY_UUID"] != y["PART_ENTRY_UUID"]
            assert {c["type"] for c in st["identity"]} == {"gpt", "xfs", "ext4"}
            run_blockrep("detach", tmp_path / "copy", check=True)
            assert digest(snap) == before  # the snapshot never changed
            assert copy not in loops() and not os.path.ismount(tmp_path / "copy")
        run_blockrep("detach", dev, check=True)
    finally:
        p.teardown()


def test_mbr_swap_btrfs_and_ext4_get_new_identities(make_server, tmp_path, clean):
    p = make_server("p", size="512M")
    dev = attach(p.uri)
    subprocess.run(["sfdisk", "-q", dev], input="label: dos\n,32M,S\n,200M\n,\n", text=True, check=True,
                   capture_output=True)
    sh("partx", "-a", dev, check=False)
    sh("mkswap", f"{dev}p1")
    sh("mkfs.btrfs", "-q", "-f", f"{dev}p2")
    sh("mkfs.ext4", "-q", "-F", f"{dev}p3")
    old = {n: blkid(dev + n) for n in ("", "p1", "p2", "p3")}
    run_blockrep("detach", dev, check=True)
    run_blockrep("snapshot", "create", p.vol, "--name", "s", check=True)
    copy = attach(f"nbd+unix:///@s?socket={p.sock}", "--new-identity")
    new = {n: blkid(copy + n) for n in ("", "p1", "p2", "p3")}
    assert new[""]["PTTYPE"] == "dos" and new[""]["PTUUID"] != old[""]["PTUUID"]
    for n, kind in (("p1", "swap"), ("p2", "btrfs"), ("p3", "ext4")):
        assert new[n]["TYPE"] == kind and new[n]["UUID"] != old[n]["UUID"], (n, old[n], new[n])
    run_blockrep("detach", copy, check=True)


def test_read_only_attach_mounts_and_refuses_writes(make_server, tmp_path, clean):
    p = make_server("p", size="64M")
    dev = attach(p.uri)
    sh("mkfs.ext4", "-q", "-F", dev)
    with mounted(dev, tmp_path / "m") as m:
        (m / "f").write_text("kept")
    run_blockrep("detach", dev, check=True)
    run_blockrep("snapshot", "create", p.vol, "--name", "s", check=True)
    ro = attach(f"nbd+unix:///@s?socket={p.sock}", "--read-only", "--mount", tmp_path / "ro")
    assert (tmp_path / "ro" / "f").read_text() == "kept"
    with pytest.raises(OSError):
        (tmp_path / "ro" / "g").write_text("no")
    assert subprocess.run(["dd", "if=/dev/zero", f"of={ro}", "bs=4096", "count=1", "oflag=direct"],
                          capture_output=True).returncode != 0
    run_blockrep("detach", ro, check=True)


def test_attach_over_tls_psk(tmp_path, clean):
    vol, psk = tmp_path / "v", tmp_path / "psk"
    run_blockrep("create", vol, "--size", "16M", check=True)
    run_blockrep("psk", "create", psk, "alice", check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_blockrep("serve", vol, "--listen", f"127.0.0.1:{port}", "--tls-psk", psk, check=True)
    try:
        dev = attach(f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}")
        sh("dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=2", "oflag=direct")
        run_blockrep("detach", dev, check=True)
        wrong = tmp_path / "wrong"
        run_blockrep("psk", "create", wrong, "alice", check=True)
        left = attachments()
        one_error(run_blockrep("attach", f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={wrong}", timeout=120))
        assert attachments() == left  # a failed attach leaves nothing behind
    finally:
        run_blockrep("stop", vol)


def test_bad_input_is_one_error_and_leaves_nothing(server, tmp_path, clean):
    left, lo = attachments(), loops()
    (tmp_path / "file").write_text("")
    for args in (["nbd://"], ["http://x/"], [server.uri, "--read-only", "--new-identity"],
                 [server.uri, "--mount", tmp_path / "file"], [server.uri, "--mount", tmp_path / "new"],
                 [f"nbd+unix:///?socket={tmp_path}/none.sock"], ["nbds://a@h/"]):
        r = run_blockrep("attach", *args, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "blockrep: error:" in r.stderr, (args, r.stderr)
    one_error(run_blockrep("detach", "/dev/loop999"))
    assert attachments() == left and loops() == lo


def test_lvm_on_a_dr_snapshot_gets_new_pv_and_vg_ids_beside_the_original(make_server, tmp_path, clean):
    lvm_files = tree_state("/etc/lvm")
    p, d = make_server("p", size="512M"), make_server("d", size="512M")
    dev = attach(p.uri)
    make_lvm_disk(dev, tmp_path)
    run_blockrep("detach", dev, check=True)
    snap = snap_uri(d, replicate(p.vol, d.uri, timeout=300)["snapshot"])  # the DR snapshot
    before = digest(snap)
    left, lo = attachments(), loops()

    orig = attach(snap, "--read-only")
    r = run_blockrep("attach", snap, "--new-identity", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    copy = st["device"]
    a, b = pv_ids(f"{orig}p1"), pv_ids(f"{copy}p1")
    assert a["vg_name"] == LVM_VG  # the original's ids are untouched
    assert b["pv_uuid"] != a["pv_uuid"] and b["vg_uuid"] != a["vg_uuid"]
    assert b["vg_name"] != a["vg_name"] and b["vg_name"].startswith(LVM_VG), b  # vgimportclone: NAME1
    assert blkid(f"{copy}p1")["UUID"] == b["pv_uuid"] != blkid(f"{orig}p1")["UUID"]
    # both VGs side by side, no duplicate PV: lvm sees two VGs with the two devices together
    both = json.loads(lvm("vgs", "--devices", f"{orig}p1,{copy}p1", "--reportformat", "json",
                          "-o", "vg_name,vg_uuid,lv_count"))["report"][0]["vg"]
    assert sorted(v["vg_name"] for v in both) == sorted([a["vg_name"], b["vg_name"]])
    assert all(v["lv_count"] == "2" for v in both)
    got = {(c["type"], c["old"], c["new"]) for c in st["identity"]}
    assert {("LVM2_member", a["pv_uuid"], b["pv_uuid"]), ("lvm-vg", a["vg_uuid"], b["vg_uuid"]),
            ("lvm-vg-name", a["vg_name"], b["vg_name"])} <= got
    assert {c["type"] for c in st["identity"]} == {"gpt", "LVM2_member", "lvm-vg", "lvm-vg-name", "ext4", "xfs"}

    # the filesystems in the LVs have new UUIDs too: the copy's XFS mounts beside the original's
    with contextlib.ExitStack() as stack:
        for lv in ("e", "x"):
            o = stack.enter_context(lv_device(f"{orig}p1", a["vg_name"], lv, read_only=True))
            c = stack.enter_context(lv_device(f"{copy}p1", b["vg_name"], lv))
            assert blkid(o)["TYPE"] == blkid(c)["TYPE"] and blkid(o)["UUID"] != blkid(c)["UUID"]
            for x, opts in ((o, ("-o", "ro")), (c, ())):
                m = stack.enter_context(mounted(x, tmp_path / f"{lv}-{Path(x).name}", *opts))
                assert (m / "letter").read_text() == LVM_LETTERS[lv]

    run_blockrep("detach", copy, check=True)
    run_blockrep("detach", orig, check=True)
    assert digest(snap) == before  # the snapshot never changed
    assert attachments() == left and loops() == lo
    assert tree_state("/etc/lvm") == lvm_files  # no metadata backups or archives left on the host
