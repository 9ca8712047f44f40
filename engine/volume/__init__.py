"""A blockrep volume (docs/FORMAT.md, docs/IMAGE.md), one module per job:

- params.py     volume.json: fields, checks, create (both backends), snapshot names
- lock.py       the owner's lock
- native.py     the C engine and the request path's bound calls
- interface.py  Volume: the one interface over both backends
- lsfs.py       the log's upkeep: checkpoints, the collector, busy/idle policy
- image.py      the image backend's mover, drain and info
"""

from .image import MOVE_BATCH, MOVER_BUSY_FRACTION, ImageMover
from .interface import NO_SNAPSHOT, Volume
from .lock import Lock
from .lsfs import CHECKPOINT_EVERY, GC_BUSY_RATIO, GC_RATIO, POOL_IDLE, REPLAY_CHECKPOINT, LogUpkeep
from .native import RequestCalls
from .params import (
    BACKENDS,
    BLOCK,
    DEFAULT_JOURNAL_SIZE,
    DEFAULT_SEGMENT,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_FILE,
    JOURNAL_OWNER,
    MAX_SIZE,
    SNAPSHOT_NAME,
    Params,
    create,
    default_snapshot_name,
    disk_usage,
    journal_shares_filesystem,
    parse_snapshot_uuid,
    read_params,
    validate_granularity,
    validate_size,
    validate_snapshot_name,
)

__all__ = [
    "BACKENDS", "BLOCK", "CHECKPOINT_EVERY", "DEFAULT_JOURNAL_SIZE", "DEFAULT_SEGMENT", "FORMAT_NAME",
    "FORMAT_VERSION", "GC_BUSY_RATIO", "GC_RATIO", "IMAGE_FILE", "JOURNAL_OWNER", "MAX_SIZE", "MOVE_BATCH",
    "MOVER_BUSY_FRACTION", "NO_SNAPSHOT", "POOL_IDLE", "REPLAY_CHECKPOINT", "SNAPSHOT_NAME", "ImageMover", "Lock",
    "LogUpkeep", "Params", "RequestCalls", "Volume", "create", "default_snapshot_name", "disk_usage",
    "journal_shares_filesystem", "parse_snapshot_uuid", "read_params", "validate_granularity", "validate_size",
    "validate_snapshot_name",
]
