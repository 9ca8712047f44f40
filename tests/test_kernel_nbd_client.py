"""End to end with the Linux kernel's own NBD client.

Debian's kernel (linux-image-amd64, which ships nbd.ko) boots under qemu with a busybox initramfs
(tests/kernel/build_initramfs.sh, /init = tests/kernel/guest-init.sh). Inside the guest, nbd-client
connects /dev/nbd0 to `blockrep serve --listen` on the host (10.0.2.2 in qemu user networking),
makes an ext4 filesystem, writes files and a sha256 manifest, and unmounts.

Then:
  * the server is killed with SIGKILL (a crash: the guest unmounted, so every block it wrote was
    flushed or written with FUA and must survive), served again, and a second boot reads the files
    back through the kernel client (read-only), checking the manifest;
  * on the host, the volume is served again on its Unix socket, attached with nbdfuse + losetup,
    checked with e2fsck and mounted read-only, and every file is compared with the manifest the
    guest printed on its console and with the contents the guest was told to write.
  On both backends (the image backend: the kernel's writes land in the change log, the mover
  moves them under the SIGKILL and the second boot's reads).

The host running the tests has no nbd driver itself, hence the virtual machine.

LVM (issue 10 item 3): a disk with an LVM PV holding ext4 and XFS LVs is replicated to a DR, and
its DR snapshot attached on the host with `--new-identity`; the guest (whose kernel has
device-mapper, which the host's lacks) connects both the DR snapshot and the copy's overlay,
activates both VGs and mounts all four LVs side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BLOCKREP, backend_create_args, run_blockrep
from replhelp import replicate, snap_uri

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "tests" / "kernel"
GUEST_OK = "BLOCKREP-GUEST-OK"
GUEST_FAIL = "BLOCKREP-GUEST-FAIL"
RANDOM_MIB = 8
# What guest-init.sh writes besides the random file (keep in sync with it).
HELLO_TEXT = b"written by a Linux kernel NBD client (nbd.ko) through blockrep\n"
NUMBERS_TEXT = b"".join(b"%d\n" % i for i in range(1, 50001))
BOOT_TIMEOUT = float(os.environ.get("BLOCKREP_QEMU_TIMEOUT", "100"))


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("qemu-system-x86_64", "nbdfuse", "fusermount3", "losetup", "e2fsck",
                 "nbd-client", "busybox", "cpio", "modprobe", "lvm"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not installed (run scripts/bootstrap.sh)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no /boot/vmlinuz-* (apt-get install linux-image-amd64)"
    return None


_why = _missing_prerequisites()
if _why:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=_why)]


def _blockrep() -> str:
    return BLOCKREP


def _run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def guest_image() -> dict[str, str]:
    """Build (or reuse from the cache) the initramfs; returns {"KERNEL": ..., "INITRD": ...}."""
    proc = _run(str(KERNEL_DIR / "build_initramfs.sh"), timeout=300)
    info = dict(
        line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line
    )
    assert Path(info["KERNEL"]).exists() and Path(info["INITRD"]).exists(), proc.stdout
    return info


def _boot_guest(image: dict[str, str], port: int, mode: str, export: str = "", extra: str = "",
                qemu_extra: tuple = ()) -> str:
    """Boot the test VM once; return its console output (it powers itself off)."""
    accel = os.environ.get("BLOCKREP_QEMU_ACCEL", "tcg")  # KVM is often absent or nested-broken
    cmd = [
        "qemu-system-x86_64",
        "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-m", "512", "-smp", "1",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot",
        "-kernel", image["KERNEL"], "-initrd", image["INITRD"],
        "-append",
        (
            f"console=ttyS0 panic=-1 loglevel=3 blockrep.host=10.0.2.2 blockrep.port={port} "
            f"blockrep.mode={mode} blockrep.mib={RANDOM_MIB} blockrep.export={export} {extra}"
        ),
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", *qemu_extra,
    ]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=BOOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        raise AssertionError(f"guest ({mode}) did not finish in {BOOT_TIMEOUT}s:\n{out}") from None
    out = proc.stdout.decode(errors="replace").replace("\r", "")
    return out


def _console_manifest(console: str) -> dict[str, str]:
    manifest = {}
    for m in re.finditer(r"^BLOCKREP-MANIFEST: ([0-9a-f]{64})  (\S+)$", console, re.MULTILINE):
        manifest[m.group(2)] = m.group(1)
    return manifest


def _assert_guest_ok(console: str, mode: str) -> None:
    assert GUEST_FAIL not in console, f"guest {mode} failed:\n{console}"
    assert re.search(rf"^{GUEST_OK} mode={mode}$", console, re.MULTILINE), (
        f"guest {mode} did not report success:\n{console}"
    )


class _Server:
    """blockrep serve / stop for one volume."""

    def __init__(self, vol: Path):
        self.vol = vol
        self.running = False

    def start(self, *extra: str) -> None:
        _run(_blockrep(), "serve", str(self.vol), *extra, timeout=60)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            _run(_blockrep(), "stop", str(self.vol), timeout=60)

    def crash(self) -> None:
        """SIGKILL the nbdkit serving the volume (its pid is in VOL/nbdkit.pid)."""
        pid = int((self.vol / "nbdkit.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _alive(pid), 20, f"nbdkit {pid} to die")
        self.running = False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _start_tcp(server: _Server, port: int) -> None:
    server.start("--listen", f"127.0.0.1:{port}")
    # serve returns once it accepts connections; double-check the TCP side is up.
    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    _wait_for(accepts, 20, f"blockrep listening on 127.0.0.1:{port}")


@pytest.mark.parametrize("backend", ["lsfs", "image"])
def test_kernel_nbd_client_writes_ext4(guest_image, tmp_path, backend):
    vol = tmp_path / "vol"
    _run(_blockrep(), "create", str(vol), "--size", "256M", *backend_create_args(backend, tmp_path))
    server = _Server(vol)
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    loop = None
    fuse_mounted = False
    fs_mounted = False
    try:
        # 1. A real kernel writes an ext4 filesystem through blockrep.
        port = _free_port()
        _start_tcp(server, port)
        console = _boot_guest(guest_image, port, "write")
        _assert_guest_ok(console, "write")
        manifest = _console_manifest(console)
        assert set(manifest) == {"random.bin", "hello.txt", "numbers.txt"}, console
        server.crash()

        # 2. After the crash and a restart, the kernel client reads it all back.
        port = _free_port()
        _start_tcp(server, port)
        console = _boot_guest(guest_image, port, "verify")
        _assert_guest_ok(console, "verify")
        for name in manifest:
            assert re.search(rf"^{re.escape(name)}: OK$", console, re.MULTILINE), console
        server.stop()

        # 3. On the host: serve on the Unix socket, attach with nbdfuse + loop, check everything.
        server.start()
        sock = vol / "nbd.sock"
        pidfile = tmp_path / "nbdfuse.pid"
        disk = fuse_dir / "disk"
        fuse = subprocess.Popen(
            ["nbdfuse", "-r", "-P", str(pidfile), str(disk), f"nbd+unix:///?socket={sock}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        fuse_mounted = True
        _wait_for(lambda: (pidfile.exists() and pidfile.stat().st_size > 0)
                  or fuse.poll() is not None, 20, "nbdfuse")
        if fuse.poll() is not None:
            fuse_mounted = False
            raise AssertionError(f"nbdfuse exited: {fuse.stderr.read().decode()}")
        assert disk.stat().st_size == 256 << 20

        loop = _run("losetup", "-f", "--show", "-r", str(disk)).stdout.strip()
        fsck = _run("e2fsck", "-fn", loop, check=False, timeout=120)
        assert fsck.returncode == 0, f"e2fsck found problems:\n{fsck.stdout}{fsck.stderr}"

        _run("mount", "-t", "ext4", "-o", "ro", loop, str(mnt))
        fs_mounted = True
        data = mnt / "data"
        on_disk_manifest = {}
        for line in (mnt / "MANIFEST.sha256").read_text().splitlines():
            digest, name = line.split()
            on_disk_manifest[name] = digest
        assert on_disk_manifest == manifest
        for name, digest in manifest.items():
            assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
        assert (data / "hello.txt").read_bytes() == HELLO_TEXT
        assert (data / "numbers.txt").read_bytes() == NUMBERS_TEXT
        random_bytes = (data / "random.bin").read_bytes()
        assert len(random_bytes) == RANDOM_MIB << 20
        assert random_bytes.count(0) < len(random_bytes) // 128  # really random, not a hole
    finally:
        if fs_mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        if fuse_mounted:
            subprocess.run(["fusermount3", "-u", str(fuse_dir)], check=False)
            try:
                fuse.wait(timeout=20)
            except subprocess.TimeoutExpired:
                fuse.kill()
        if server.running:
            subprocess.run([_blockrep(), "stop", str(vol)], check=False, timeout=60)


def _tcp_forward(port: int, log: Path, *plugin_args: str, read_only: bool = False) -> subprocess.Popen:
    """nbdkit's nbd plugin on 127.0.0.1:port in front of a Unix-socket export (the guest reaches
    the host's 127.0.0.1 as 10.0.2.2); its messages go to log."""
    with open(log, "w") as lf:
        proc = subprocess.Popen(["nbdkit", "-f", "-v", "-i", "127.0.0.1", "-p", str(port),
                                 *(["-r"] if read_only else []), "nbd", *plugin_args],
                                stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return proc.poll() is not None
    _wait_for(accepts, 20, f"nbdkit on 127.0.0.1:{port}")
    assert proc.poll() is None, f"nbdkit on port {port} exited {proc.returncode}"
    return proc


def test_kernel_activates_lvm_of_a_new_identity_copy_beside_its_original(guest_image, make_server, tmp_path):
    from test_attach import LVM_LETTERS, LVM_VG, digest, make_lvm_disk

    p, d = make_server("p", size="512M"), make_server("d", size="512M")
    r = run_blockrep("attach", p.uri, timeout=300)
    assert r.returncode == 0, r.stderr
    make_lvm_disk(r.stdout.strip(), tmp_path)
    run_blockrep("detach", r.stdout.strip(), check=True)
    snap_name = replicate(p.vol, d.uri, timeout=300)["snapshot"]
    snap = snap_uri(d, snap_name)
    before = digest(snap)
    r = run_blockrep("attach", snap, "--new-identity", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    forwards: list[subprocess.Popen] = []
    try:
        ids = {c["type"]: c for c in st["identity"] if c["type"].startswith(("LVM2", "lvm-"))}
        new_vg = ids["lvm-vg-name"]["new"]
        assert ids["lvm-vg-name"]["old"] == LVM_VG and new_vg != LVM_VG
        subprocess.run(["sync"], check=True)
        ports = _free_port(), _free_port()
        forwards.append(_tcp_forward(ports[0], tmp_path / "fwd-orig.log", f"socket={d.sock}", f"export=@{snap_name}",
                                     read_only=True))
        forwards.append(_tcp_forward(ports[1], tmp_path / "fwd-copy.log", f"socket={Path(st['dir']) / 'nbd.sock'}"))
        t0 = time.monotonic()
        console = _boot_guest(guest_image, ports[0], "lvm", extra=f"blockrep.port2={ports[1]}")
        print(f"guest lvm boot: {time.monotonic() - t0:.1f} s")
        (tmp_path / "console.txt").write_text(console)
        _assert_guest_ok(console, "lvm")

        pvs = {m[0]: m[1:] for m in re.findall(r"^BLOCKREP-PV: +(\S+) +(\S+) +(\S+) +(\S+)$", console, re.M)}
        assert pvs == {
            "/dev/nbd0p1": (ids["LVM2_member"]["old"], LVM_VG, ids["lvm-vg"]["old"]),
            "/dev/nbd1p1": (ids["LVM2_member"]["new"], new_vg, ids["lvm-vg"]["new"]),
        }, console  # no duplicate PV: the kernel host sees the copy's ids, the ones attach reported
        lvs = {}  # vg/lv -> (filesystem UUID, TYPE), from the guest's blkid -p
        for name, rest in re.findall(r"^BLOCKREP-LV: (\S+) (.*)$", console, re.M):
            u, t = re.search(r"(?:^| )UUID=(\S+)", rest), re.search(r"(?:^| )TYPE=(\S+)", rest)
            assert u and t, (name, rest)
            lvs[name] = (u.group(1), t.group(1))
        want = {f"{vg}/{lv}" for vg in (LVM_VG, new_vg) for lv in LVM_LETTERS}
        assert set(lvs) == want, console
        for lv in LVM_LETTERS:
            (u1, t1), (u2, t2) = lvs[f"{LVM_VG}/{lv}"], lvs[f"{new_vg}/{lv}"]
            assert t1 == t2 and u1 != u2, (lv, console)
        letters = dict(re.findall(r"^BLOCKREP-LETTER: (\S+) (.*)$", console, re.M))
        assert letters == {f"{vg}/{lv}": text for vg in (LVM_VG, new_vg) for lv, text in LVM_LETTERS.items()}, console
    finally:
        for f in forwards:
            f.terminate()
            try:
                f.wait(timeout=20)
            except subprocess.TimeoutExpired:
                f.kill()
        with contextlib.suppress(OSError):  # the attach proxy's messages, for a failed run
            shutil.copy(Path(st["dir"]) / "nbdkit.log", tmp_path / "attach-proxy.log")
        run_blockrep("detach", st["device"], check=True)
    assert digest(snap) == before  # the guest wrote to the copy: only the overlay changed


def test_attach_uses_the_kernel_nbd_client_where_the_kernel_has_one(guest_image, make_server, tmp_path):
    """`blockrep attach` itself, run inside the guest (whose kernel has NBD) from the host's root
    shared read-only over virtio-9p: it makes /dev/nbd0 with nbd-client (not nbdfuse + loop), gives
    the copy a new ext4 UUID through its cow overlay, mounts it; `detach` disconnects it; the
    export is never written."""
    from test_attach import digest

    port = _free_port()
    make_server("p", size="128M", serve_args=("--listen", f"127.0.0.1:{port}"))  # stopped at teardown
    host_uri = f"nbd://127.0.0.1:{port}/"
    files = {"hello.txt": b"attached through the kernel's NBD client\n", "big.bin": os.urandom(3 << 20)}
    r = run_blockrep("attach", host_uri, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)["device"]
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        uuid_before = subprocess.run(["blkid", "-s", "UUID", "-o", "value", dev], capture_output=True,
                                     text=True, check=True).stdout.strip()
        mnt = tmp_path / "m"
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True)
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        subprocess.run(["umount", str(mnt)], check=True)
    finally:
        run_blockrep("detach", dev, check=True)
    before = digest(host_uri)
    console = _boot_guest(guest_image, port, "attach", extra=f"blockrep.bin={BLOCKREP}",
                          qemu_extra=("-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                                      "multidevs=remap"))
    (tmp_path / "console.txt").write_text(console)
    _assert_guest_ok(console, "attach")
    m = re.search(r"^BLOCKREP-ATTACH: (.*)$", console, re.MULTILINE)
    assert m, console
    st = json.loads(m.group(1))
    assert re.fullmatch(r"/dev/nbd\d+", st["device"]) and st.get("nbd_client") == st["device"], st
    ext4 = [c for c in st["identity"] if c["type"] == "ext4"]
    assert ext4 and ext4[0]["old"] == uuid_before and ext4[0]["new"] != uuid_before, st
    seen = dict(reversed(m.groups()) for m in re.finditer(r"^BLOCKREP-FILE: ([0-9a-f]{64})  \./(\S+)$", console,
                                                          re.MULTILINE))
    assert seen == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}, console
    assert digest(host_uri) == before  # the copy's new UUID and its scribble stayed in the overlay
