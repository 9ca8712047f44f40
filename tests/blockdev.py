"""A real filesystem on an NBD export without a kernel NBD driver (DESIGN §3): nbdfuse exposes
the export as a file, a loop device makes it a block device. Shared by the ext4, snapshot and
replication tests."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


def sh(*cmd, check=True, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, timeout=timeout)


@contextmanager
def attached(uri: str, workdir: Path, readonly: bool = False):
    """nbdfuse the export to workdir/fuse/disk and put a loop device on it; yields /dev/loopN.
    With readonly: `nbdfuse -r` and `losetup -r`. Always detaches."""
    fuse_dir = workdir / "fuse"
    fuse_dir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdfuse", *(["-r"] if readonly else []), "-P", str(pidfile),
                             str(fuse_dir / "disk"), uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    loop = None
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, f"nbdfuse exited: {proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "nbdfuse did not become ready"
            time.sleep(0.05)
        loop = sh("losetup", *(["-r"] if readonly else []), "-f", "--show", fuse_dir / "disk").stdout.strip()
        assert loop.startswith("/dev/loop"), loop
        yield loop
    finally:
        if loop:
            sh("losetup", "-d", loop, check=False)
        sh("fusermount3", "-u", fuse_dir, check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            sh("fusermount3", "-uz", fuse_dir, check=False)


@contextmanager
def mounted(dev: str, mnt: Path, *opts):
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", *opts, dev, mnt)
    try:
        yield mnt
    finally:
        if sh("umount", mnt, check=False).returncode != 0:
            time.sleep(1)
            if sh("umount", mnt, check=False).returncode != 0:
                sh("umount", "-l", mnt, check=False)


def fsck_clean(dev: str) -> None:
    r = sh("e2fsck", "-fn", dev, check=False)
    assert r.returncode == 0, f"e2fsck -fn {dev} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
