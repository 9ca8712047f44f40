# Anchor for bench/fio_compare.py: the "Python-plugin ceiling".
#
# A RAM disk held in one Python bytearray and served by nbdkit's Python plugin
# under THREAD_MODEL_SERIALIZE_ALL_REQUESTS.  Each callback does the least
# Python work a plugin can do (one slice copy), so no Python plugin -- blockrep
# included -- can be expected to beat it on small requests.  DESIGN.md §5 sets
# blockrep's 4 KiB random IOPS target as a ratio to this plugin's, measured in
# the same run.
#
#   nbdkit -f -U SOCK python bench/anchor_bytearray_plugin.py size=1G
#
# Parameters: size=SIZE (default 1G; nbdkit size syntax).
# Runs inside nbdkit only (it imports the `nbdkit` module).

import nbdkit

API_VERSION = 2

_size = 1024**3
_disk = None


def config(key, value):
    global _size
    if key == "size":
        _size = nbdkit.parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key}={value} (only size=SIZE)")


def get_ready():
    global _disk
    _disk = bytearray(_size)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_multi_conn(h):
    # All connections share one bytearray and every request is serialised.
    return True


def can_fua(h):
    # Memory has nothing to make durable: FUA is honoured trivially.
    return nbdkit.FUA_NATIVE


def pread(h, buf, offset, flags):
    buf[:] = _disk[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _disk[offset : offset + len(buf)] = buf


def flush(h, flags):
    pass


def trim(h, count, offset, flags):
    _disk[offset : offset + count] = bytes(count)


def zero(h, count, offset, flags):
    _disk[offset : offset + count] = bytes(count)
