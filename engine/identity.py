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
| LVM PV | `vgimportclone` (lvm2); `pvchange -u` for a PV in no VG | PV and VG UUIDs, VG name (`NAME1`…) |
| in an LV | as above, through a loop device over the LV's extents | the LV's filesystem UUID |

The new VG name is vgimportclone's: NAME1, or NAME2 … if that is taken on this host.
LVM needs no device-mapper for this (this host has none, DESIGN §3): every lvm command runs with
LVM_CONFIG (activation off, no udev, no hints, no devices file or filter, no metadata backups in
/etc/lvm), so it only reads and writes metadata on the copy and leaves nothing on the host: no LV
is activated, nothing holds the loop device at detach. A filesystem in an LV is reached without
device-mapper when the LV is one linear range of extents on this disk (what `lvcreate` makes); the
contents of any other LV (several segments, striped, thin, RAID, snapshot, cache) are left as they
are, like a filesystem blkid does not know.
"""

from __future__ import annotations

import glob
import json
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
    else:
        return None
    return kind


# Metadata only, on exactly the devices named, with nothing left on the host (see the docstring).
LVM_CONFIG = ('global{activation=0} '
              'devices{use_devicesfile=0 hints="none" obtain_device_list_from_udev=0 '
              'filter=["a|.*|"] global_filter=["a|.*|"]} '
              'activation{udev_sync=0 udev_rules=0 monitoring=0} '
              'backup{backup=0 archive=0}')


def lvm(cmd: str, *args: str) -> str:
    """An lvm command (pvs, vgimportclone …) with LVM_CONFIG; its stdout."""
    return run_tool("lvm", cmd, "--config", LVM_CONFIG, *args)


def _report(cmd: str, key: str, devs: list[str], fields: str, *args: str) -> list[dict]:
    """Rows of an lvm JSON report that sees only devs (a copy beside its original: the duplicate
    PVs elsewhere are not seen), sizes in bytes."""
    out = lvm(cmd, "--devices", ",".join(devs), "--reportformat", "json", "--units", "b", "--nosuffix",
              "-o", fields, *args)
    try:
        return [row for r in json.loads(out)["report"] for row in r.get(key, [])]
    except (ValueError, KeyError, TypeError):
        raise IdentityError(f"lvm {cmd}: unexpected report {out[:200]!r}") from None


def pvs(devs: list[str]) -> dict[str, dict]:
    """PV name -> pv_uuid, vg_name, vg_uuid, pv_count (PVs in its VG), vg_missing_pv_count, pe_start."""
    rows = _report("pvs", "pv", devs, "pv_name,pv_uuid,vg_name,vg_uuid,pv_count,vg_missing_pv_count,pe_start",
                   *devs)
    return {r["pv_name"]: r for r in rows}


def linear_lvs(vg: str, devs: list[str]) -> list[tuple[str, str, int, int]]:
    """The LVs of vg that are one linear range on one of devs: (lv, device, offset, length) in
    bytes, the LV's data being bytes offset … offset + length of that device (no device-mapper
    needed to read or write it)."""
    start = {d: int(r["pe_start"]) for d, r in pvs(devs).items()}
    segs: dict[str, list[dict]] = {}
    for r in _report("lvs", "seg", devs, "lv_name,segtype,stripes,seg_size_pe,seg_pe_ranges,vg_extent_size",
                     "--segments", vg):
        segs.setdefault(r["lv_name"], []).append(r)
    out = []
    for lv, ss in segs.items():
        s = ss[0]
        dev, _, rng = s["seg_pe_ranges"].rpartition(":")
        first, _, last = rng.partition("-")
        if (len(ss) != 1 or s["segtype"] != "linear" or s["stripes"] != "1" or dev not in start
                or not (first.isdigit() and last.isdigit())
                or int(last) - int(first) + 1 != int(s["seg_size_pe"])):
            continue
        extent = int(s["vg_extent_size"])
        out.append((lv, dev, start[dev] + int(first) * extent, int(s["seg_size_pe"]) * extent))
    return out


def _lvm(devs: list[str]) -> list[dict]:
    """New PV UUIDs, VG UUIDs and VG names for the PVs devs (one vgimportclone per VG, with all of
    its PVs), then new identities for the filesystems in its linear LVs."""
    changed: list[dict] = []
    before = pvs(devs)
    vgs: dict[str, list[str]] = {}
    for d in devs:
        pv = before.get(d)
        if pv is None:
            raise IdentityError(f"{d}: blkid says LVM2_member, lvm sees no PV there")
        if not pv["vg_name"]:
            lvm("pvchange", "--devices", d, "-u", d)  # a PV in no VG: its UUID only
        else:
            vgs.setdefault(pv["vg_uuid"], []).append(d)
    for pvdevs in vgs.values():
        pv = before[pvdevs[0]]
        if int(pv["pv_count"]) != len(pvdevs) or int(pv["vg_missing_pv_count"]):
            raise IdentityError(f"VG {pv['vg_name']} has {pv['pv_count']} PVs, {len(pvdevs)} on this disk: a "
                                f"copy of part of a VG cannot get a new identity")
        lvm("vgimportclone", *pvdevs)
    after = pvs(devs)
    for d in devs:
        if after.get(d, {}).get("pv_uuid") in (None, before[d]["pv_uuid"]):
            raise IdentityError(f"{d}: the LVM PV UUID did not change")
        changed.append({"device": d, "type": "LVM2_member", "old": before[d]["pv_uuid"], "new": after[d]["pv_uuid"]})
    for pvdevs in vgs.values():
        old, new = before[pvdevs[0]], after[pvdevs[0]]
        if new["vg_uuid"] == old["vg_uuid"] or new["vg_name"] == old["vg_name"]:
            raise IdentityError(f"VG {old['vg_name']}: its UUID or name did not change")
        changed.append({"device": pvdevs[0], "type": "lvm-vg", "old": old["vg_uuid"], "new": new["vg_uuid"]})
        changed.append({"device": pvdevs[0], "type": "lvm-vg-name", "old": old["vg_name"], "new": new["vg_name"]})
        for lv, dev, offset, length in linear_lvs(new["vg_name"], pvdevs):
            changed += _in_lv(f"{new['vg_name']}/{lv}", dev, offset, length)
    return changed


def _in_lv(name: str, dev: str, offset: int, length: int) -> list[dict]:
    """A new identity for the filesystem in an LV, through a loop device over its extents."""
    loop = run_tool("losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(length), dev).strip()
    try:
        before = probe(loop)
        if before.get("TYPE") == "LVM2_member":
            return []  # LVM inside an LV (a VM's disk): its own host's business
        kind = _fs(loop, before)
        if kind is None:
            return []
        after = probe(loop)
        if before.get("UUID") and after.get("UUID") == before.get("UUID"):
            raise IdentityError(f"{name}: the {kind} UUID did not change")
        return [{"device": name, "type": kind, "old": before.get("UUID"), "new": after.get("UUID")}]
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)


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
    pvdevs = []
    for d in targets:
        before = probe(d)
        if before.get("TYPE") == "LVM2_member":
            pvdevs.append(d)
            continue
        kind = _fs(d, before)
        if kind is not None:
            after = probe(d)
            if before.get("UUID") and after.get("UUID") == before.get("UUID"):
                raise IdentityError(f"{d}: the {kind} UUID did not change")
            changed.append({"device": d, "type": kind, "old": before.get("UUID"), "new": after.get("UUID")})
    if pvdevs:
        changed += _lvm(pvdevs)
    return changed

