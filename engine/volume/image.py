"""The image backend's side of a Volume (docs/IMAGE.md): the mover that copies the change log
into image.raw in the background, its drain, and what `info` shows of it. Mixed into Volume."""

from __future__ import annotations

import os
import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import BlockrepError
from .params import IMAGE_FILE

if TYPE_CHECKING:
    from .params import Params

MOVE_BATCH = 4 << 20  # the mover's batch (docs/IMAGE.md §3)
MOVER_BUSY_FRACTION = 2  # while clients are busy the mover waits until the log holds max/2 (docs/IMAGE.md §3)


class ImageMover:
    """The mover (docs/IMAGE.md §3)."""

    # provided by Volume (interface.py)
    if TYPE_CHECKING:
        path: Path
        params: Params
        _v: Any
        _n: Any

        def stats(self) -> dict: ...
        def _raise(self, what: str) -> NoReturn: ...

    # ---- the image backend's mover (docs/IMAGE.md §3) ----
    @property
    def has_mover(self) -> bool:
        return self.params.backend == "image"

    def move(self, max_bytes: int = MOVE_BATCH, seal: bool = True) -> int:
        """Move up to max_bytes of head blocks from the change log into the image; returns the
        bytes moved (0: nothing left). seal: also the active segment, and punch the image where
        the head reads as trimmed once nothing is left (what a clean stop does)."""
        r = self._n.lib.vol_move(self._v, max_bytes, 1 if seal else 0)
        if r < 0:
            self._raise("moving blocks into the image")
        return r

    def drain(self) -> int:
        """Move everything still in the change log into the image and punch what the head
        trimmed (what a clean stop does); returns the bytes moved."""
        total = 0
        while moved := self.move(64 << 20, seal=True):
            total += moved
        return total

    def run_mover(self, stop, idle_seconds: float = 1.0) -> None:
        """The background mover (a thread the server starts after it forks): moves while the
        change log holds head data, seals the active segment once clients have been quiet for
        idle_seconds, and keeps the rate `info` shows. While clients are busy it starts only
        once the log holds half of journal_size (a burst below that goes at the log's speed).
        Errors are logged by the caller's logger and retried every few seconds (the log keeps
        every block meanwhile)."""
        import logging
        log = logging.getLogger("blockrep.mover")
        last_req, quiet_since = None, _time.monotonic()
        window_start, window_bytes = _time.monotonic(), 0
        while not stop.is_set():
            st = self.stats()
            req = st["requests"]
            now = _time.monotonic()
            if req != last_req:
                last_req, quiet_since = req, now
            quiet = now - quiet_since >= idle_seconds
            if not quiet and st["journal_pending_bytes"] < st["journal_max_bytes"] // MOVER_BUSY_FRACTION:
                # clients are busy and the log has room: moving now would only compete with them
                # for the disk and the CPU (as the collector waits while busy)
                stop.wait(0.1)
                continue
            try:
                moved = self.move(MOVE_BATCH, seal=quiet)
            except BlockrepError as e:
                log.error("mover: %s", e)
                stop.wait(5)
                continue
            window_bytes += moved
            if now - window_start >= 2:
                self._mover_rate = window_bytes / (now - window_start)
                window_start, window_bytes = now, 0
            if moved == 0:
                stop.wait(0.05)

    def _image_info(self, st: dict) -> dict:
        image = self.path / IMAGE_FILE
        try:
            image_used = os.stat(image).st_blocks * 512
        except OSError:
            image_used = 0
        return {
            "image": str(image),
            "journal": self.params.journal,
            "journal_pending_bytes": st["journal_pending_bytes"],
            "journal_max_bytes": st["journal_max_bytes"],
            "journal_used_bytes": st["used_bytes"],
            "image_used_bytes": image_used,
            "used_bytes": st["used_bytes"] + image_used,
            "mover_bytes_per_second": round(self._mover_rate),
            "image_moved_bytes": st["image_moved_bytes"],
            "image_preserved_blocks": st["image_cbw_blocks"],
            "image_current": bool(st["image_current"]),
            "image_error": os.strerror(st["image_error"]) if st["image_error"] else None,
        }
