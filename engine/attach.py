"""`blockrep attach URI [--read-only | --new-identity] [--mount DIR]` and `blockrep detach DEV|DIR`
(issue 10 item 3): an NBD export as a block device on this host, mounted if asked.

How: a private nbdkit `nbd` plugin connects to the URI (it speaks TLS-PSK, which nbdfuse's URIs
may not carry: `tls-psk-file` is refused there) and serves it on a Unix socket. Where the kernel
has an NBD driver (nbd.ko loaded or loadable), `nbd-client -unix` makes that socket /dev/nbdN
(its partitions appear as /dev/nbdNpK); otherwise (this host, DESIGN §3) nbdfuse makes it a file
and a loop device (`-P`: its partitions too) makes the file a block device. BLOCKREP_ATTACH_MODE
= kernel | fuse forces one. With `--new-identity` nbdkit's `cow` filter sits in front: writes
go to a throw-away overlay (gone at detach) and identity.py gives every identifier on the copy a
new value; the export itself is never written. `--read-only` refuses writes at every layer.

Each attachment is a directory in STATE_DIR with `state.json` (pids, device, mountpoint);
`detach` undoes it in reverse order, whatever step an earlier attach reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from . import identity
from .errors import BlockrepError, InvalidArgument, NotFound
from .replication.uris import redact_uri

STATE_DIR = Path(os.environ.get("BLOCKREP_ATTACH_DIR", "/run/blockrep/attach"))
READY_SECONDS = 30


class AttachError(BlockrepError):
    """A step of attach failed; what it had set up was undone."""


def nbd_plugin_args(uri: str) -> list[str]:
    """The URI as nbdkit nbd plugin parameters (socket/hostname/port, export, TLS-PSK)."""
    try:
        u = urlsplit(uri)
        q = parse_qs(u.query, keep_blank_values=True)
        port = u.port
    except ValueError as e:
        raise InvalidArgument(f"invalid URI {uri!r}: {e}") from None
    if u.scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise InvalidArgument(f"invalid URI {uri!r}: use nbd://, nbds://, nbd+unix:// or nbds+unix://")
    args = []
    if u.scheme.endswith("+unix"):
        sock = (q.get("socket") or [""])[0]
        if not sock:
            raise InvalidArgument(f"{uri}: a +unix URI needs ?socket=PATH")
        args.append(f"socket={sock}")
    else:
        if not u.hostname:
            raise InvalidArgument(f"{uri}: no host")
        args += [f"hostname={u.hostname}", f"port={port or 10809}"]
    export = unquote(u.path[1:]) if u.path.startswith("/") else ""
    args.append(f"export={export}")
    if u.scheme.startswith("nbds"):
        psk = (q.get("tls-psk-file") or [""])[0]
        if not psk:
            raise InvalidArgument(f"{uri}: an nbds:// URI here needs ?tls-psk-file=FILE (TLS-PSK)")
        args += ["tls=require", f"tls-psk={psk}", f"tls-username={unquote(u.username or '')}"]
    return args


def _sh(*cmd: str, timeout: float = 120) -> str:
    return identity.run_tool(*cmd, error=AttachError, timeout=timeout)


def _save(d: Path, st: dict) -> None:
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(st, indent=2))
    os.replace(tmp, d / "state.json")


def _wait_file(path: Path, proc: subprocess.Popen | None, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not (path.exists() and path.read_text().strip()):
        if proc is not None and proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text().strip().splitlines() if log.exists() else []
            raise AttachError(f"{what} did not start: {text[-1] if text else 'no message'}")
        time.sleep(0.05)


def attach(uri: str, *, read_only: bool = False, new_identity: bool = False, mount: str | None = None) -> dict:
    if read_only and new_identity:
        raise InvalidArgument("--read-only and --new-identity exclude each other (a new identity writes the "
                              "throw-away overlay)")
    plugin = nbd_plugin_args(uri)
    if mount is not None:
        mp = Path(mount).resolve()
        if not mp.exists() and mp.parent.is_dir():
            mp.mkdir()  # as `mount --mkdir` would
        if not mp.is_dir():
            raise InvalidArgument(f"--mount {mount}: not a directory")
        if os.path.ismount(mp):
            raise InvalidArgument(f"--mount {mount}: something is mounted there already")
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    d = Path(tempfile.mkdtemp(prefix="att-", dir=STATE_DIR))
    st: dict = {"uri": redact_uri(uri), "dir": str(d), "read_only": read_only, "new_identity": new_identity}
    _save(d, st)
    try:
        sock, log = d / "nbd.sock", d / "nbdkit.log"
        cmd = ["nbdkit", "-P", str(d / "nbdkit.pid"), "-U", str(sock), "--log=stderr"]
        if new_identity:
            cmd.append("--filter=cow")
        if read_only:
            cmd.append("-r")
        with open(log, "w") as lf:
            subprocess.run([*cmd, "nbd", *plugin], stdout=lf, stderr=lf, stdin=subprocess.DEVNULL, timeout=60)
        _wait_file(d / "nbdkit.pid", None, "the nbdkit proxy", log)
        st["nbdkit_pid"] = int((d / "nbdkit.pid").read_text())
        _save(d, st)
        if kernel_nbd():
            dev = _nbd_client(sock, read_only, d, st)
        else:
            dev = _fuse_loop(sock, read_only, d, st)
        st["device"] = dev
        _save(d, st)
        parts = identity.rescan(dev)
        st["partitions"] = parts
        if new_identity:
            st["identity"] = identity.renew(dev, parts)
        if mount is not None:
            target = _mountable(dev, parts)
            opts = ["ro"] if read_only else []
            if read_only and identity.probe(target).get("TYPE") == "xfs":
                opts += ["nouuid", "norecovery"]  # beside its original, and nothing replayed
            _sh("mount", *(["-o", ",".join(opts)] if opts else []), target, str(mp))
            st["mountpoint"], st["mounted"] = str(mp), target
        _save(d, st)
        return st
    except BaseException:
        with contextlib.suppress(BlockrepError, OSError):
            _undo(d, st)
        raise


def kernel_nbd() -> bool:
    """Whether this kernel has an NBD driver (loading nbd.ko if it must) and nbd-client is here."""
    mode = os.environ.get("BLOCKREP_ATTACH_MODE", "")
    if mode == "fuse":
        return False
    if not Path("/sys/module/nbd").exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "nbd", "max_part=16"], capture_output=True, timeout=60)
    have = Path("/sys/module/nbd").exists() and shutil.which("nbd-client") is not None
    if mode == "kernel" and not have:
        raise AttachError("BLOCKREP_ATTACH_MODE=kernel, but this kernel has no NBD driver or nbd-client is missing")
    return have


def _nbd_client(sock: Path, read_only: bool, d: Path, st: dict) -> str:
    """The proxy's socket as the first free /dev/nbdN (one another attach took meanwhile: the next)."""
    tried = []
    for sysdev in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if (sysdev / "pid").exists() or (sysdev / "size").read_text().strip() != "0":
            continue
        dev = "/dev/" + sysdev.name
        # 512-byte sectors, as a loop device or a VM disk has: a GPT made there sits at byte 512 and
        # a small ext4 has 1 KiB blocks, neither of which a 4096-byte block device would read
        r = subprocess.run(["nbd-client", "-unix", str(sock), dev, "-b", "512", *(["-readonly"] if read_only else [])],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            st["nbd_client"] = dev
            _save(d, st)
            return dev
        tried.append(f"{dev}: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")
        if len(tried) >= 4:
            break
    raise AttachError("no /dev/nbdN could be connected" + (f" ({'; '.join(tried)})" if tried else
                                                           " (all are in use)"))


def _fuse_loop(sock: Path, read_only: bool, d: Path, st: dict) -> str:
    """nbdfuse makes the proxy's socket a file, losetup -P a block device (no NBD driver here)."""
    fuse = d / "fuse"
    fuse.mkdir()
    with open(d / "nbdfuse.log", "w") as lf:
        proc = subprocess.Popen(["nbdfuse", *(["-r"] if read_only else []), "-P", str(d / "nbdfuse.pid"),
                                 str(fuse / "disk"), f"nbd+unix:///?socket={sock}"],
                                stdout=lf, stderr=lf, stdin=subprocess.DEVNULL, start_new_session=True)
    st["nbdfuse_pid"] = proc.pid
    _save(d, st)
    _wait_file(d / "nbdfuse.pid", proc, "nbdfuse", d / "nbdfuse.log")
    st["loop"] = dev = _sh("losetup", "-f", "--show", "-P", *(["-r"] if read_only else []),
                           str(fuse / "disk")).strip()
    _save(d, st)
    return dev


def _mountable(dev: str, parts: list[str]) -> str:
    for p in [*parts, dev] if parts else [dev]:
        if identity.probe(p).get("TYPE") not in (None, "swap", "LVM2_member"):
            return p
    raise AttachError(f"{dev}: no filesystem to mount on it or its partitions (it is attached: "
                      f"`blockrep detach {dev}`)")


def _kill(pid: int | None, sig=signal.SIGTERM, wait: float = 10) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def _undo(d: Path, st: dict) -> None:
    """Tear an attachment down in reverse order; every step tolerates what is already gone."""
    if st.get("mountpoint") and os.path.ismount(st["mountpoint"]):
        _sh("umount", st["mountpoint"])
    if Path("/dev/mapper/control").exists() and shutil.which("lvm"):
        # a host with device-mapper and udev may have activated the copy's renamed VG by itself
        for c in st.get("identity") or []:
            if c.get("type") == "lvm-vg-name" and c.get("new"):
                subprocess.run(["lvm", "vgchange", "-an", c["new"]], capture_output=True, timeout=60)
    if st.get("nbd_client"):
        subprocess.run(["nbd-client", "-d", st["nbd_client"]], capture_output=True, timeout=60)
    elif st.get("loop") or st.get("device"):
        subprocess.run(["losetup", "-d", st.get("loop") or st["device"]], capture_output=True, timeout=60)
    fuse = d / "fuse"
    if fuse.exists():
        subprocess.run(["fusermount3", "-u", str(fuse)], capture_output=True, timeout=60)
    _kill(st.get("nbdfuse_pid"))
    _kill(st.get("nbdkit_pid"))
    shutil.rmtree(d, ignore_errors=True)


def attachments() -> list[dict]:
    out = []
    for f in sorted(STATE_DIR.glob("*/state.json")) if STATE_DIR.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(f.read_text()))
    return out


def detach(what: str) -> dict:
    """Undo the attachment whose device, partition or mountpoint is `what`."""
    key = str(Path(what).resolve()) if not what.startswith("/dev/") else what
    for st in attachments():
        if key in (st.get("device"), st.get("mountpoint"), *st.get("partitions", [])):
            _undo(Path(st["dir"]), st)
            return st
    raise NotFound(f"{what} is not a blockrep attachment (attached: "
                   f"{', '.join(s.get('device', '?') for s in attachments()) or 'none'})")
