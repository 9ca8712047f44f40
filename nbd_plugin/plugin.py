"""nbdkit plugin: serve a blockrep volume. Run by `blockrep serve`, never imported by engine/.

    nbdkit -U SOCK python nbd_plugin/plugin.py volume=/abs/path/VOL

A translator and nothing else: nbdkit callbacks become Volume calls (one C call per request),
engine errors become errnos. Exports: "" is the live volume (read-write; read-only on a bound DR),
"@NAME" snapshot NAME (read-only), "!…" the DR protocol (engine/replication/drserver.py, which
owns every export handle: typed objects with a `kind`). The control socket (engine/control.py)
runs in a thread of this process.
Thread model SERIALIZE_REQUESTS: requests are serialised per connection, so no client (stalled
in the handshake, slow, or sending long requests) delays another by more than one request
(tests/test_stalled_clients.py), and one connection is as fast as under SERIALIZE_ALL_REQUESTS
(bench/README.md); callbacks of different connections run at once (the engine has its own
mutex). Background work (checkpoints, collector) runs in a thread started in after_fork whose
time is spent in GIL-free C calls.
"""

import ctypes
import errno
import logging
import os
import socket
import sys
import threading

# nbdkit does not put the script's folder on sys.path: add the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbdkit  # noqa: E402

from engine.control import ControlServer, socket_path  # noqa: E402
from engine.errors import BlockrepError  # noqa: E402
from engine.replication.drserver import DRServer  # noqa: E402
from engine.volume import Volume  # noqa: E402

API_VERSION = 2

_path = None
_vol = None
_THREAD_MODELS = {
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}
_thread_model = "serialize_requests"
_stop = threading.Event()
_worker = None
_mover = None
_control = None
_dr = None
_keep = None
_allow_remote_prune = False
_keep_min_age = 86400  # DR snapshots younger than a day are never pruned (serve --keep-min-age)
_gfs: dict[str, int] = {}  # the DR's GFS counts (serve --keep-hourly … --keep-monthly)
_psk_users: list[str] = []
log = logging.getLogger("blockrep.server")

# Hot-path globals, bound in get_ready so each callback is one attribute-free C call.
_rc = _from_buffer = None  # Volume.request_calls(): the C calls of the request path
_FUA = nbdkit.FLAG_FUA


def config(key, value):
    global _path, _thread_model, _keep, _allow_remote_prune, _psk_users, _keep_min_age
    if key == "volume":
        _path = os.path.abspath(value)
    elif key == "keep":  # the DR's own retention (blockrep serve --keep N)
        if not value.isdigit() or int(value) < 1:
            raise RuntimeError("keep must be a number of snapshots >= 1")
        _keep = int(value)
    elif key == "keep_min_age":  # seconds; DR snapshots younger than this are never pruned
        if not value.isdigit():
            raise RuntimeError("keep_min_age must be a number of seconds")
        _keep_min_age = int(value)
    elif key in ("keep_hourly", "keep_daily", "keep_weekly", "keep_monthly"):  # the DR's GFS retention
        if not (value.isascii() and value.isdigit()):
            raise RuntimeError(f"{key} must be a number of periods >= 0")
        _gfs[key[5:]] = int(value)
    elif key == "allow_remote_prune":
        _allow_remote_prune = value == "1"
    elif key == "tls_psk":  # only to name the PSK user in the DR's log
        try:
            with builtins_open(value) as f:
                _psk_users = [ln.split(":", 1)[0] for ln in f if ":" in ln]
        except OSError:
            _psk_users = []
    elif key == "thread_model":  # for measurements (bench/); the default: module docstring
        if value not in _THREAD_MODELS:
            raise RuntimeError(f"thread_model must be one of {', '.join(_THREAD_MODELS)}")
        _thread_model = value
    elif key == "io_fault":  # tests only (RELIABILITY R7): make the engine's disk fail
        from engine import faults
        try:
            faults.inject(*faults.parse(value))
        except BlockrepError as e:
            raise RuntimeError(str(e)) from None
    elif key == "logfile":
        h = logging.FileHandler(os.path.abspath(value))
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("blockrep").addHandler(h)
        logging.getLogger("blockrep").setLevel(logging.INFO)
    else:
        raise RuntimeError(f"unknown parameter {key!r} (expected volume=PATH [logfile=PATH] [thread_model=…] "
                           "[keep=N] [keep_hourly|daily|weekly|monthly=N] [keep_min_age=SECONDS] "
                           "[allow_remote_prune=1] [tls_psk=FILE] [io_fault=SPEC])")


def config_complete():
    if not _path:
        raise RuntimeError("volume=PATH is required")


def thread_model():
    return _THREAD_MODELS[_thread_model]


def get_ready():
    global _vol, _rc, _from_buffer, _dr
    try:
        _vol = Volume.open(_path)
        _dr = DRServer(_vol, keep=_keep, allow_remote_prune=_allow_remote_prune, keep_min_age=_keep_min_age,
                       peer=_peer, gfs=_gfs or None)
    except BlockrepError as e:
        raise RuntimeError(str(e)) from None
    _rc = _vol.request_calls()
    _from_buffer = _rc.from_buffer
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
    global _worker, _mover, _control
    _worker = threading.Thread(target=_maintain, name="blockrep-maintain", daemon=True)
    _worker.start()
    if _vol.has_mover:  # the image backend: change log -> image, in the background
        _mover = threading.Thread(target=_vol.run_mover, args=(_stop,), name="blockrep-mover", daemon=True)
        _mover.start()
    _control = ControlServer(_vol, socket_path(_vol.path),
                             extra={"head_exclusive": _dr.head_exclusive, "head_release": _dr.head_release,
                                    "dr_promote": _dr.dr_promote, "dr_promote_done": _dr.dr_promote_done,
                                    "dr_demote": _dr.dr_demote, "dr_received": _dr.dr_received,
                                    "snapshot_create": _dr.snapshot_create})
    _control.start()


def cleanup():
    _stop.set()
    if _control is not None:
        _control.stop()
    if _worker is not None:
        _worker.join()
    if _mover is not None:
        _mover.join()
    if _vol is not None:
        _vol.close()
        log.info("closed %s", _path)


def list_exports(readonly, is_tls):
    exports = [("", _describe(None))]
    for s in _vol.snapshots():
        exports.append(("@" + s["name"], _describe(s["name"])))
    return exports


def default_export(readonly, is_tls):
    return ""


def _describe(snapshot):
    if snapshot is None:
        return f"blockrep volume uuid={_vol.params.uuid} live"
    return f"blockrep volume uuid={_vol.params.uuid} snapshot={snapshot}"


# nbdkit's own view of the current connection (nbdkit_peer_name, nbdkit_is_tls; nbdkit exports its
# API to plugins, the Python module does not wrap these in 1.32), for the DR's audit log.
builtins_open = open
_nbdkit_api = ctypes.CDLL(None)


def _peer():
    try:
        buf = ctypes.create_string_buffer(128)
        n = ctypes.c_uint(128)
        if _nbdkit_api.nbdkit_peer_name(buf, ctypes.byref(n)) == -1:
            return "unknown"
        raw = buf.raw
        family = int.from_bytes(raw[0:2], sys.byteorder)
        if family == socket.AF_INET:
            who = f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{int.from_bytes(raw[2:4], 'big')}"
        elif family == socket.AF_INET6:
            who = f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{int.from_bytes(raw[2:4], 'big')}"
        elif family == socket.AF_UNIX:
            who = f"unix uid={_nbdkit_api.nbdkit_peer_uid()} pid={_nbdkit_api.nbdkit_peer_pid()}"
        else:
            who = f"family {family}"
        if _nbdkit_api.nbdkit_is_tls() == 1:
            user = _psk_users[0] if len(_psk_users) == 1 else f"one of {len(_psk_users)} PSK users"
            who += f" tls user={user}"
        return who
    except Exception:  # a log line must never fail a request
        return "unknown"


def open(readonly):
    name = "?"
    try:
        name = nbdkit.export_name()
        if name == "":
            return _dr.open_head(readonly)
        if name.startswith("@"):
            return _dr.open_snapshot(name[1:])
        if name.startswith("!"):  # the DR protocol (docs/REPLICATION.md)
            return _dr.open_command(name, readonly)
    except BlockrepError as e:
        nbdkit.set_error(e.errno)
        raise RuntimeError(str(e)) from None
    except OSError as e:
        log.error("opening export %r: %s", name[:80], e)
        nbdkit.set_error(e.errno or errno.EIO)
        raise RuntimeError(str(e)) from None
    except Exception as e:  # a name nobody expected (not UTF-8, …): refuse, log, no traceback
        log.warning("refused export %r: %s [peer %s]", name[:80], e, _peer())
        nbdkit.set_error(errno.EINVAL)
        raise RuntimeError(f"bad export name: {e}") from None
    nbdkit.set_error(errno.ENOENT)
    raise RuntimeError(f"no export named {name[:80]!r} (the live volume is \"\", snapshots are @NAME)")


def export_description(h):
    if h.kind == 0:
        return _describe(None)
    if h.kind == 2:
        return "blockrep DR command"
    for s in _vol.snapshots():
        if s["id"] == h.map_id:
            return _describe(s["name"])
    return _describe("(deleted)")


def get_size(h):
    return h.size


def close(h):
    h.close()


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def can_write(h):
    return h.writable  # snapshots, command replies and a bound DR's head: nbdkit refuses writes (EPERM)


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return h.writable and h.kind == 0


def can_zero(h):
    return h.writable and h.kind == 0


def can_fast_zero(h):
    return h.writable and h.kind == 0


def can_extents(h):
    return True


def can_multi_conn(h):
    # One engine behind every connection and flush is synchronous: a flush on any connection
    # makes every completed write durable and visible on all.
    return True


def _fail(what):
    err, msg = _rc.last_error()
    if err == errno.EBADMSG:  # the engine's word for corruption; NBD clients get EIO
        err = errno.EIO
        log.error("%s: corruption: %s", what, msg)
    else:
        log.error("%s: %s", what, msg)
    nbdkit.set_error(err)
    raise OSError(err, msg)


def _refused(e):
    nbdkit.set_error(e.errno)
    raise RuntimeError(str(e)) from None


def pread(h, buf, offset, flags):
    k = h.kind
    if k == 0:
        if _rc.read(_from_buffer(buf, require_writable=True), len(buf), offset):
            _fail("read")
    elif k == 1:
        if _rc.snapshot_read(h.map_id, _from_buffer(buf, require_writable=True), len(buf), offset):
            _fail("read")
    else:
        try:
            h.pread(buf, offset)
        except BlockrepError as e:
            _refused(e)


def _over():
    nbdkit.set_error(errno.EPERM)
    raise RuntimeError("the transfer that opened this export is being committed or is over")


def pwrite(h, buf, offset, flags):
    t = h.transfer
    if t is None:
        if _rc.write(_from_buffer(buf), len(buf), offset, flags & _FUA):
            _fail("write")
        return
    # a DR transfer's write: bracketed so that a commit waits for it (drserver.Transfer)
    if not t.enter():
        _over()
    try:
        if h.kind == 2:
            try:
                h.pwrite(buf, offset)
            except BlockrepError as e:
                _refused(e)
        elif _rc.write(_from_buffer(buf), len(buf), offset, flags & _FUA):
            _fail("write")
    finally:
        t.leave()


def flush(h, flags):
    if _rc.flush():
        _fail("flush")


def _zero(h, count, offset, flags, trim, what):
    t = h.transfer
    if t is not None and not t.enter():
        _over()
    try:
        if _rc.zero(count, offset, flags & _FUA, trim):
            _fail(what)
    finally:
        if t is not None:
            t.leave()


def trim(h, count, offset, flags):
    _zero(h, count, offset, flags, 1, "trim")


def zero(h, count, offset, flags):
    _zero(h, count, offset, flags, 0, "zero")


def extents(h, count, offset, flags):
    if h.kind == 2:
        return [(offset, count, 0)]
    try:
        ext = _vol.extents(count, offset, 1 if flags & nbdkit.FLAG_REQ_ONE else 1024, snapshot=h.map_id)
    except BlockrepError as e:
        nbdkit.set_error(e.errno)
        raise
    # clipped to the request: the engine works in 4 KiB blocks, and nbdkit 1.32 aborts (an
    # assertion in extents_to_block_descriptors) when an extent ends past a count of 2^32-1
    end = offset + count
    return [(o, min(o + n, end) - o, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if t else 0)
            for o, n, t in ext if o < end]
