"""New identities for a copy of a disk (`blockrep attach --new-identity`, DESIGN M8): every
identifier a host uses to tell disks apart gets a new value, so that a DR snapshot mounts beside
the original on the same host. Runs on the copy-on-write overlay only (the snapshot never changes).

What is changed, by what blkid says (the tools are the filesystems' own):

| found | tool | what |
|---|---|---|
| GPT | `sfdisk --disk-id`, `--part-uuid` | disk GUID, every partition's GUID |
| MBR (dos) | `sfdisk --disk-id` | disk signature |
| ext2/3/4 | `e2fsck -fy`, `tune2fs -U random` | filesystem UUID |
| XFS | a `nouuid` mount to replay the log, `xfs_admin -U generate` | filesystem UUID |
| btrfs | `btrfstune -f -u` | fsid |
| swap | `swaplabel -U` | swap UUID |
| LVM PV | `vgimportclone` (lvm2) | PV and VG UUIDs, VG name (`NAME` → `NAMEclone`, as vgimportclone does) |
"""

from __future__ import annotations

import glob
import secrets
import subprocess
import tempfile
import time
import uuid as _uuid
from pathlib import Path

from .errors import BlockrepError

TIMEOUT = 600


class IdentityError(BlockrepError):
    """An identifier could not be replaced: the copy must not be used beside the original."""


def run_tool(*cmd: str, error: type[BlockrepError] = IdentityError, timeout: float = TIMEOUT) -> str:
    """A system tool's stdout; its failure is one `error` naming the tool and its last line
    (attach.py runs its tools through this too)."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise error(f"{cmd[0]} is not installed (scripts/bootstrap.sh installs it)") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise error(f"{' '.join(cmd)} failed (exit {r.returncode})" + (f": {detail[-1]}" if detail else ""))
    return r.stdout



def probe(dev: str) -> dict[str, str]:
    """blkid's low-level probe of one device: TYPE, UUID, PTTYPE, PTUUID … ({} if nothing)."""
    r = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True, timeout=60)
    out = {}
    for line in r.stdout.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            out[k] = v
    return out


def partitions(dev: str) -> list[str]:
    return sorted(glob.glob(dev + "p[0-9]*"), key=lambda p: int(p.rsplit("p", 1)[1]))


def rescan(dev: str) -> list[str]:
    """The partition devices of dev, after telling the kernel about them: loop devices here do not
    scan their partition table by themselves (`losetup -P` alone gave none: measured), so
    `partx -a` adds them, `-u` updates them; no table is no partition."""
    for flag in ("-a", "-u"):
        subprocess.run(["partx", flag, dev], capture_output=True, timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = partitions(dev)
        if all(Path(p).exists() for p in found):
            return found
        time.sleep(0.05)
    return partitions(dev)


def _settle(dev: str, parts: list[str]) -> None:
    """sfdisk rewrote the table: the kernel's view of the partitions again."""
    got = rescan(dev)
    if len(got) != len(parts):
        raise IdentityError(f"{dev}: {len(parts)} partition(s) before the new GUIDs, {len(got)} after")


def _fs(dev: str, found: dict[str, str]) -> str | None:
    """Give the filesystem (or PV) on dev a new identity; returns what it was, None if nothing."""
    kind = found.get("TYPE")
    if kind in ("ext2", "ext3", "ext4"):
        subprocess.run(["e2fsck", "-fy", dev], capture_output=True, timeout=TIMEOUT)  # 1 = fixed: fine
        run_tool("tune2fs", "-U", "random", dev)
    elif kind == "xfs":
        with tempfile.TemporaryDirectory(prefix="blockrep-xfs-") as mnt:  # replay the log first
            run_tool("mount", "-t", "xfs", "-o", "nouuid", dev, mnt)
            run_tool("umount", mnt)
        run_tool("xfs_admin", "-U", "generate", dev)
    elif kind == "btrfs":
        run_tool("btrfstune", "-f", "-u", dev)
    elif kind == "swap":
        run_tool("swaplabel", "-U", str(_uuid.uuid4()), dev)
    elif kind == "LVM2_member":
        run_tool("vgimportclone", dev)
    else:
        return None
    return kind


def renew(dev: str, parts: list[str]) -> list[dict]:
    """New identifiers on a whole device and its partitions; returns what changed
    ([{device, type, old, new}]). IdentityError if something found cannot be changed."""
    changed = []
    top = probe(dev)
    pt = top.get("PTTYPE")
    if pt == "gpt":
        run_tool("sfdisk", "--disk-id", dev, str(_uuid.uuid4()).upper())
        for p in parts:
            n = p.rsplit("p", 1)[1]
            run_tool("sfdisk", "--part-uuid", dev, n, str(_uuid.uuid4()).upper())
        _settle(dev, parts)
        changed.append({"device": dev, "type": "gpt", "old": top.get("PTUUID"), "new": probe(dev).get("PTUUID")})
    elif pt == "dos":
        run_tool("sfdisk", "--disk-id", dev, "0x" + secrets.token_hex(4))
        _settle(dev, parts)
        changed.append({"device": dev, "type": "dos", "old": top.get("PTUUID"), "new": probe(dev).get("PTUUID")})
    targets = parts if pt else [dev]
    for d in targets:
        before = probe(d)
        kind = _fs(d, before)
        if kind is not None:
            after = probe(d)
            if before.get("UUID") and after.get("UUID") == before.get("UUID"):
                raise IdentityError(f"{d}: the {kind} UUID did not change")
            changed.append({"device": d, "type": kind, "old": before.get("UUID"), "new": after.get("UUID")})
    return changed

