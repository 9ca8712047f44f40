"""The log's upkeep policy, shared by both backends (the image backend's change log is an lsfs
log): checkpoints that bound recovery, the collector that reclaims dead segments, and when each
runs (busy or idle). Mixed into Volume; every call is one GIL-free C call."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .params import BLOCK

REPLAY_CHECKPOINT = 64 << 20  # checkpoint right after a recovery that replayed more than this
CHECKPOINT_EVERY = 2 << 30  # bytes of log since the last checkpoint (recovery replays ~0.2 s/GiB)
GC_RATIO = 1.2  # when idle, collect while disk use > GC_RATIO x live data
GC_BUSY_RATIO = 2.0  # while clients write, collect only above this
POOL_IDLE = 4  # recycled segment files kept when idle (up to 64 while busy)

if TYPE_CHECKING:
    from .params import Params


class LogUpkeep:
    """Checkpoints and the collector (docs/FORMAT.md §4, §7)."""

    # provided by Volume (interface.py)
    if TYPE_CHECKING:
        path: Path
        params: Params
        _v: Any
        _n: Any

        @property
        def has_mover(self) -> bool: ...
        def stats(self) -> dict: ...
        def _raise(self, what: str) -> NoReturn: ...

    # ---- maintenance ----
    def checkpoint(self) -> None:
        if self._n.lib.vol_checkpoint(self._v):
            self._raise("checkpoint")

    def collect(self, ratio: float = GC_RATIO, max_segments: int = 1 << 30, batch: int = 8,
                drop_dead: bool = True, trim_pool: bool = True) -> int:
        """Reclaim segments while disk use exceeds ratio x live data; returns segments moved.
        trim_pool gives recycled segment files beyond POOL_IDLE back to the filesystem.
        Relocates up to `batch` victims, then one checkpoint makes the moves durable and deletes
        the dead segments (docs/FORMAT.md §7)."""
        lib = self._n.lib
        done = 0
        while done < max_segments:
            seg = lib.vol_gc_pick(self._v, ratio)
            if seg <= 0:
                break
            if lib.vol_gc_segment(self._v, seg):
                self._raise(f"collecting segment {seg}")
            done += 1
            if done % batch == 0:
                self.checkpoint()
        if done % batch or (drop_dead and self.stats()["dead_segments"]):
            self.checkpoint()
        if trim_pool:  # keep a few files for reuse, never more than a tenth of live data
            st = self.stats()
            keep = min(POOL_IDLE, int(0.1 * st["live_blocks"] * BLOCK) // self.params.segment_size)
            lib.vol_pool_trim(self._v, keep)
        return done

    def maintain(self, busy: bool) -> None:
        """One round of background work. While clients are writing (`busy`) the collector only
        runs when disk use passes GC_BUSY_RATIO x live data and checkpoints only bound recovery
        (every CHECKPOINT_EVERY bytes of log): both cost foreground bandwidth (copies, fdatasync).
        When idle it collects down to GC_RATIO and checkpoints away dead segments."""
        st = self.stats()
        dead_bytes = st["dead_segments"] * self.params.segment_size
        if st["log_since_checkpoint"] > CHECKPOINT_EVERY or (
                self.has_mover and dead_bytes > max(64 << 20, st["journal_max_bytes"] // 4)):
            self.checkpoint()  # (image) moved segments are deleted by the next checkpoint
        if busy:
            over = st["used_bytes"] > GC_BUSY_RATIO * st["live_blocks"] * BLOCK
            self.collect(ratio=GC_BUSY_RATIO, max_segments=8, drop_dead=over, trim_pool=False)
        else:
            self.collect(ratio=GC_RATIO, max_segments=8)
