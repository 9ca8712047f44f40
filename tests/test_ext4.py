"""ext4 on a served volume, through nbdfuse + a loop device (this kernel has no nbd driver).

serve → nbdfuse DIR/disk URI → losetup → mkfs.ext4 → mount → files (random data, sha256) →
sync → umount → e2fsck -fn clean → detach → stop → serve again → attach → e2fsck clean → mount →
every file intact. Then delete files and fstrim through the whole stack (discard → FUSE
fallocate → NBD trim): holes appear in the volume's map, fsck stays clean, files stay intact.
On both backends; on the image backend, after a clean stop, VOL/image.raw itself (a loop device
on the flat image, no blockrep running) fscks clean and holds every file: the mover moved
everything and punched what fstrim freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from blockdev import attached, fsck_clean, mounted
from conftest import backend_create_args

pytestmark = pytest.mark.slow

MiB = 1 << 20


def sh(*cmd, check=True, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r





def write_files(root: Path, rnd: random.Random) -> dict[str, str]:
    manifest = {}
    sizes = [0, 1, 511, 4096, 4097, 65536, 1 * MiB + 3, 3 * MiB, 8 * MiB, 17 * MiB]
    sizes += [rnd.randrange(1, 2 * MiB) for _ in range(30)]
    for i, n in enumerate(sizes):
        sub = root / f"d{i % 5}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        data = rnd.randbytes(n)
        p = sub / f"file{i:03d}.bin"
        p.write_bytes(data)
        manifest[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return manifest


def check_files(root: Path, manifest: dict[str, str]) -> None:
    for rel, digest in manifest.items():
        p = root / rel
        assert p.exists(), f"{rel} is missing"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"{rel} changed"


def hole_bytes(uri: str) -> int:
    m = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    return sum(e["length"] for e in m if e["type"] & 1)


@pytest.mark.parametrize("backend", ["lsfs", "image"])
def test_ext4_survives_restart_and_fstrim(make_server, tmp_path, backend):
    rnd = random.Random(int(os.environ.get("BLOCKREP_EXT4_SEED", "77")))
    s = make_server(size="256M", create_args=backend_create_args(backend, tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    mnt = tmp_path / "mnt"
    with attached(s.uri, work) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, mnt):
            manifest = write_files(mnt, rnd)
            sh("sync")
        fsck_clean(dev)
    s.stop()
    s.start()
    with attached(s.uri, work) as dev:
        fsck_clean(dev)
        with mounted(dev, mnt, "-o", "ro"):
            check_files(mnt, manifest)
        holes_before = hole_bytes(s.uri)
        with mounted(dev, mnt):
            for rel in list(manifest)[::2]:
                (mnt / rel).unlink()
                del manifest[rel]
            sh("sync")
            out = sh("fstrim", "-v", mnt).stdout
            assert "trimmed" in out, out
            check_files(mnt, manifest)
        fsck_clean(dev)
        holes_after = hole_bytes(s.uri)
        assert holes_after > holes_before, (holes_before, holes_after)
    # and once more after a SIGKILL: everything was synced and unmounted, so nothing is lost
    s.kill()
    s.start()
    with attached(s.uri, work) as dev:
        fsck_clean(dev)
        with mounted(dev, mnt, "-o", "ro"):
            check_files(mnt, manifest)
    if backend != "image":
        return
    # the flat image, read by the kernel with nothing of blockrep running: a clean stop drained
    # the change log into it and punched what fstrim freed (every hole the volume reports is a
    # hole of image.raw)
    holes_served = hole_bytes(s.uri)
    s.stop()
    image = s.vol / "image.raw"
    assert hole_bytes_of_file(image) >= holes_served > holes_before, (hole_bytes_of_file(image), holes_served)
    loop = sh("losetup", "-f", "--show", "-r", image).stdout.strip()
    try:
        fsck_clean(loop)
        with mounted(loop, mnt, "-o", "ro"):
            check_files(mnt, manifest)
    finally:
        sh("losetup", "-d", loop, check=False)


def hole_bytes_of_file(path: Path) -> int:
    """Bytes of holes in a sparse file (SEEK_HOLE/SEEK_DATA)."""
    holes, off, size = 0, 0, path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return holes + size - off
            holes += data - off
            off = os.lseek(fd, data, os.SEEK_HOLE)
    return holes
