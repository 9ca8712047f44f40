"""Where a command runs: in the server that owns the volume, or on the volume opened here.

Every CLI command that reads or changes a volume goes through run_op: when the volume is served
the command travels over its control socket (engine/control.py); when it is not, the volume is
opened in this process, read-only for the commands that only look (ops.READ_ONLY), so that they
write no file. Either way the same engine/ops.py function runs.
"""

from __future__ import annotations

from pathlib import Path

from . import control, ops, server
from .volume import Volume, read_params


def run_op(volume: str | Path, cmd: str, **args):
    vol = Path(volume).resolve()
    read_params(vol)
    if server.running_pid(vol):
        return control.call(vol, cmd, **args)
    if cmd in ops.PRECHECKS:
        with Volume.open(vol, readonly=True) as v:
            ops.PRECHECKS[cmd](v, **args)
    with Volume.open(vol, readonly=cmd in ops.READ_ONLY) as v:
        return ops.COMMANDS[cmd](v, **args)
