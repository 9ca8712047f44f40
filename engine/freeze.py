"""Application-consistent snapshots: run freeze/thaw commands around taking a snapshot.

`--freeze MOUNTPOINT` runs `fsfreeze -f MOUNTPOINT` before and `fsfreeze -u MOUNTPOINT` after;
`--pre CMD` / `--post CMD` run any shell command the same way (e.g. a qemu guest agent freeze).
If a freeze or pre command fails, the snapshot is refused (never silently taken unfrozen); the
thaw and post commands run whatever happened, so a failure never leaves a filesystem frozen.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

from .errors import BlockrepError

TIMEOUT = 120


class FreezeError(BlockrepError):
    """The application could not be quiesced: no snapshot was taken."""


def _run(argv: list[str] | str, what: str) -> None:
    try:
        r = subprocess.run(argv, shell=isinstance(argv, str), capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FreezeError(f"{what} failed: {e}") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise FreezeError(f"{what} failed (exit {r.returncode})" + (f": {detail[-1]}" if detail else ""))


@contextlib.contextmanager
def quiesced(freeze: list[str] | None = None, pre: list[str] | None = None,
             post: list[str] | None = None) -> Iterator[None]:
    """Freeze, pre, [body]; then post and thaw (in that order), always once started."""
    undo: list[tuple[list[str] | str, str]] = []
    errors: list[str] = []
    try:
        for mp in freeze or []:
            _run(["fsfreeze", "-f", mp], f"fsfreeze -f {mp}")
            undo.append((["fsfreeze", "-u", mp], f"fsfreeze -u {mp}"))
        for cmd in post or []:  # from here on the post commands run, even if a pre fails
            undo.append((cmd, f"post command {cmd!r}"))
        for cmd in pre or []:
            _run(cmd, f"pre command {cmd!r}")
        yield
    finally:
        for argv, what in reversed(undo):
            try:
                _run(argv, what)
            except FreezeError as e:
                errors.append(str(e))
    if errors:
        raise FreezeError("; ".join(errors))
