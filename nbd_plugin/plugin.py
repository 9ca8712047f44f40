"""nbdkit plugin: serve a blockrep volume. Run by `blockrep serve`, never imported by engine/.

    nbdkit -U SOCK python nbd_plugin/plugin.py volume=/abs/path/VOL

A translator and nothing else: nbdkit callbacks become Volume calls (one C call per request),
engine errors become errnos. Exports: "" is the live volume (read-write), "@NAME" snapshot NAME
(read-only). The control socket (engine/control.py) runs in a thread of this process.
Thread model SERIALIZE_ALL_REQUESTS: measured fastest for a Python plugin on 2 vCPUs
(NBDKIT.md, bench/README.md); background work (checkpoints, collector) runs in a thread
started in after_fork whose time is spent in GIL-free C calls.
"""

import errno
import logging
import os
import sys
import threading

# nbdkit does not put the script's folder on sys.path: add the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbdkit  # noqa: E402

from engine import dr  # noqa: E402
from engine.control import ControlServer, socket_path  # noqa: E402
from engine.errors import BlockrepError  # noqa: E402
from engine.volume import Volume  # noqa: E402

API_VERSION = 2

_path = None
_vol = None
_THREAD_MODELS = {
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}
_thread_model = "serialize_all_requests"
_stop = threading.Event()
_worker = None
_control = None
log = logging.getLogger("blockrep.server")

# Hot-path globals, bound in get_ready so each callback is one attribute-free C call.
_v = _lib = _ffi = _from_buffer = None
_FUA = nbdkit.FLAG_FUA


def config(key, value):
    global _path, _thread_model
    if key == "volume":
        _path = os.path.abspath(value)
    elif key == "thread_model":  # for measurements (bench/); the default was measured fastest
        if value not in _THREAD_MODELS:
            raise RuntimeError(f"thread_model must be one of {', '.join(_THREAD_MODELS)}")
        _thread_model = value
    elif key == "logfile":
        h = logging.FileHandler(os.path.abspath(value))
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("blockrep").addHandler(h)
        logging.getLogger("blockrep").setLevel(logging.INFO)
    else:
        raise RuntimeError(f"unknown parameter {key!r} (expected volume=PATH [logfile=PATH] [thread_model=…])")


def config_complete():
    if not _path:
        raise RuntimeError("volume=PATH is required")


def thread_model():
    return _THREAD_MODELS[_thread_model]


def get_ready():
    global _vol, _v, _lib, _ffi, _from_buffer
    try:
        _vol = Volume.open(_path)
    except BlockrepError as e:
        raise RuntimeError(str(e)) from None
    _v, _lib, _ffi = _vol._v, _vol._n.lib, _vol._n.ffi
    _from_buffer = _ffi.from_buffer
    log.info("opened %s (%s), recovery %s", _path, _vol.params.uuid, _vol.recovery)


def _maintain():
    last = None
    while not _stop.wait(0.5):
        try:
            requests = _vol.stats()["requests"]
            _vol.maintain(busy=requests != last)
            last = requests
        except BlockrepError as e:
            log.error("background maintenance: %s", e)
        except Exception:  # keep serving; the next round retries
            log.exception("background maintenance failed")


def after_fork():
    global _worker, _control
    _worker = threading.Thread(target=_maintain, name="blockrep-maintain", daemon=True)
    _worker.start()
    _control = ControlServer(_vol, socket_path(_vol.path))
    _control.start()


def cleanup():
    _stop.set()
    if _control is not None:
        _control.stop()
    if _worker is not None:
        _worker.join()
    if _vol is not None:
        _vol.close()
        log.info("closed %s", _path)


def list_exports(readonly, is_tls):
    exports = [("", export_description(0))]
    for s in _vol.snapshots():
        exports.append(("@" + s["name"], _describe(s["name"])))
    return exports


def default_export(readonly, is_tls):
    return ""


def _describe(snapshot):
    if snapshot is None:
        return f"blockrep volume uuid={_vol.params.uuid} live"
    return f"blockrep volume uuid={_vol.params.uuid} snapshot={snapshot}"


# Handles: 0 = the head; N > 0 = snapshot id N (read-only); below 0 the read-only exports of DR
# commands (engine/dr.py: empty, checksums, change lists).
EMPTY = dr.EMPTY


def open(readonly):
    name = nbdkit.export_name()
    if name == "":
        return 0
    try:
        if name.startswith("@"):
            return _vol.snapshot(name[1:])["id"]
        if name.startswith("!"):  # DR commands from a replicating primary (engine/dr.py)
            return dr.open_command(_vol, name, readonly)
    except BlockrepError as e:
        nbdkit.set_error(e.errno)
        raise RuntimeError(str(e)) from None
    nbdkit.set_error(errno.ENOENT)
    raise RuntimeError(f"no export named {name!r} (the live volume is \"\", snapshots are @NAME)")


def export_description(h):
    if not h:
        return _describe(None)
    if h < 0:
        return "blockrep DR command"
    for s in _vol.snapshots():
        if s["id"] == h:
            return _describe(s["name"])
    return _describe("(deleted)")


def get_size(h):
    if h < 0:
        return dr.handle_size(_vol, h)
    return _vol.size


def close(h):
    if h < 0:
        dr.handle_close(h)


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def can_write(h):
    return not h  # snapshot exports are read-only: nbdkit refuses writes with EPERM


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return not h


def can_zero(h):
    return not h


def can_fast_zero(h):
    return not h


def can_extents(h):
    return True


def can_multi_conn(h):
    # One engine behind every connection and flush is synchronous: a flush on any connection
    # makes every completed write durable and visible on all.
    return True


def _fail(what):
    err = _ffi.errno or errno.EIO
    msg = _ffi.string(_lib.vol_errmsg()).decode(errors="replace")
    log.error("%s: %s", what, msg)
    nbdkit.set_error(err)
    raise OSError(err, msg)


def pread(h, buf, offset, flags):
    if not h:
        if _lib.vol_read(_v, _from_buffer(buf, require_writable=True), len(buf), offset):
            _fail("read")
    elif h > 0:
        if _lib.vol_snap_read(_v, h, _from_buffer(buf, require_writable=True), len(buf), offset):
            _fail("read")
    else:
        try:
            dr.handle_pread(_vol, h, buf, offset)
        except BlockrepError as e:
            nbdkit.set_error(e.errno)
            raise


def pwrite(h, buf, offset, flags):
    if _lib.vol_write(_v, _from_buffer(buf), len(buf), offset, flags & _FUA):
        _fail("write")


def flush(h, flags):
    if _lib.vol_flush(_v):
        _fail("flush")


def trim(h, count, offset, flags):
    if _lib.vol_zero(_v, count, offset, flags & _FUA, 1):
        _fail("trim")


def zero(h, count, offset, flags):
    if _lib.vol_zero(_v, count, offset, flags & _FUA, 0):
        _fail("zero")


def extents(h, count, offset, flags):
    if h < 0:
        return [(offset, count, 0)]
    try:
        ext = _vol.extents(count, offset, 1 if flags & nbdkit.FLAG_REQ_ONE else 1024, snapshot=h)
    except BlockrepError as e:
        nbdkit.set_error(e.errno)
        raise
    return [(o, n, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if t else 0) for o, n, t in ext]
