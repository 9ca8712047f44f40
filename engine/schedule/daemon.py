"""`blockrep schedule run`: the foreground daemon (docs/SCHEDULE.md §5). The main thread owns
the signals, systemd notifications, the watchdog and the workers' lives; the workers (jobs.py)
do the work.

- Signals only set flags; the main loop is woken through signal.set_wakeup_fd (a handler that
  took a lock, such as Event.set, could deadlock against the interrupted main thread).
- SIGTERM/SIGINT: every transfer pauses (its confirmed prefix saved), then exit 0. One deadline
  for all workers; a worker inside its freeze/pre/post hooks is waited for until they end, so a
  stop never leaves an application frozen.
- SIGHUP: the file is read again; with errors it is refused (one log line each) and the old
  configuration keeps running. Volumes whose configuration is unchanged keep their workers; a
  changed one's new workers start only once the old ones have ended (never two at once).
- One daemon per volume: the volume's ScheduleLock is held by the daemon across worker
  generations, from the first start of the volume until it leaves the configuration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path

from ..errors import BlockrepError
from ..freeze import TIMEOUT as HOOK_TIMEOUT
from . import config as C
from .jobs import Shared, VolumeWorker
from .jobstate import ScheduleLock
from .notify import Notifier

log = logging.getLogger("blockrep.schedule")
STOP_SECONDS = 8.0  # SIGTERM to exit, for all workers together (docs: within 10 s)
TICK = 1.0  # the main loop looks at draining workers this often


def setup_logging() -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s blockrep-schedule: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger("blockrep")
    root.handlers[:] = [h]
    root.setLevel(logging.INFO)
    root.propagate = False


class Daemon:
    def __init__(self, path: str):
        self.path = path
        self.cfg = C.load(path)
        self.notifier = Notifier()
        self.shared = Shared(self.cfg.max_transfers, self.cfg.retry_min, self.cfg.retry_max, self.notifier.status)
        self.workers: dict[C.VolumeJob, VolumeWorker] = {}
        self.draining: list[VolumeWorker] = []  # stopped, not yet ended
        self.waiting: list[C.VolumeJob] = []  # to start once their volume's old workers ended
        self.locks: dict[Path, ScheduleLock] = {}
        self.stopping = False
        self.reload_asked = False

    # ---- workers
    def _lock(self, job: C.VolumeJob) -> None:
        if job.path not in self.locks:
            self.locks[job.path] = ScheduleLock(job.path)  # BlockrepError if another daemon has it

    def _start(self, job: C.VolumeJob) -> None:
        """Start a volume's workers (BlockrepError if another daemon schedules it)."""
        self._lock(job)
        w = VolumeWorker(job, self.shared)
        try:
            w.ensure_served()
        except BlockrepError as e:
            log.warning("%s: could not serve it: %s", job.path, e)
        w.begin()
        self.workers[job] = w

    def _start_waiting(self) -> None:
        busy = {w.job.path for w in self.draining if w.alive()}
        self.draining = [w for w in self.draining if w.alive()]
        for job in list(self.waiting):
            if job.path in busy:
                continue
            self.waiting.remove(job)
            try:
                self._start(job)
                log.info("%s: scheduled", job.path)
            except BlockrepError as e:
                log.error("not scheduling %s: %s", job.path, e)
        for path in list(self.locks):  # volumes no longer in the configuration, their workers ended
            if path not in busy and path not in {j.path for j in [*self.workers, *self.waiting]}:
                self.locks.pop(path).release()

    def _stop(self, workers: list[VolumeWorker], deadline: float) -> list[VolumeWorker]:
        """Stop workers, wait for them until deadline (longer for one inside its freeze hooks);
        returns the ones still alive."""
        for w in workers:
            w.stop()
        hooks_deadline = time.monotonic() + 2 * HOOK_TIMEOUT + 5
        said: set[Path] = set()
        while True:
            alive = [w for w in workers if w.alive()]
            now = time.monotonic()
            if not alive:
                return []
            if now >= deadline and not any(w.in_hooks for w in alive):
                return alive
            if now >= hooks_deadline:
                return alive
            for w in alive:
                if w.in_hooks and w.job.path not in said and now >= deadline:
                    said.add(w.job.path)
                    log.info("%s: waiting for its freeze/pre/post hooks to finish", w.job.path)
            alive[0].join_all(min(0.2, max(0.01, deadline - now)))

    def reload(self) -> None:
        self.notifier.send(RELOADING=1)
        try:
            new = C.load(self.path)
        except C.ConfigError as e:
            for line in e.errors:
                log.error("reload refused, keeping the running configuration: %s: %s", self.path, line)
            self.notifier.send(READY=1, STATUS="reload refused: the file has errors")
            return
        if (new.max_transfers, new.retry_min, new.retry_max) != (self.cfg.max_transfers, self.cfg.retry_min,
                                                                 self.cfg.retry_max):
            old = list(self.workers.values())  # a new semaphore: every worker restarts
            self.workers.clear()
            self.shared = Shared(new.max_transfers, new.retry_min, new.retry_max, self.notifier.status)
        else:
            old = [self.workers.pop(j) for j in list(self.workers) if j not in new.volumes]
        self.waiting = [j for j in self.waiting if j in new.volumes]
        for w in old:
            w.stop()
        self.draining += old
        self.waiting += [j for j in new.volumes if j not in self.workers and j not in self.waiting]
        self._start_waiting()
        if new.metrics != self.cfg.metrics:
            log.warning("metrics address changes need a restart; still serving the old one")
        self.cfg = new
        late = [str(j.path) for j in self.waiting]
        log.info("configuration reloaded: %d volume(s), %d stopped%s", len(new.volumes), len(old),
                 f"; waiting for the old workers of {', '.join(late)} to end" if late else "")
        self.notifier.send(READY=1, STATUS=f"reloaded: {len(new.volumes)} volume(s)")

    # ---- signals and the main loop
    def _on_signal(self, signum, _frame) -> None:  # flags only: no locks in a signal handler
        if signum == signal.SIGHUP:
            self.reload_asked = True
        else:
            self.stopping = True

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if self.cfg.metrics:
            from .metrics import serve_metrics
            try:
                serve_metrics(self.cfg.metrics, lambda: self.cfg)
            except OSError as e:
                raise BlockrepError(f"metrics address {self.cfg.metrics[0]}:{self.cfg.metrics[1]}: "
                                    f"{e.strerror or e}") from None
        try:
            for job in self.cfg.volumes:
                self._start(job)
        except BlockrepError:
            self._stop(list(self.workers.values()), time.monotonic() + STOP_SECONDS)
            raise
        log.info("started: %d volume(s), %d target(s)", len(self.cfg.volumes),
                 sum(len(j.targets) for j in self.cfg.volumes))
        for w in self.workers.values():
            w.warn_foreign_targets()
        self.notifier.send(READY=1, STATUS=f"running {len(self.cfg.volumes)} volume(s)")
        interval = self.notifier.watchdog_interval
        while not self.stopping:
            timeout = min(interval or 3600.0, TICK if (self.waiting or self.draining) else 3600.0)
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([rfd], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 512):
                    pass
            if interval:
                self.notifier.send(WATCHDOG=1)
            if self.reload_asked and not self.stopping:
                self.reload_asked = False
                self.reload()
            if self.waiting or self.draining:
                self._start_waiting()
        self.notifier.send(STOPPING=1, STATUS="pausing transfers")
        log.info("stopping: pausing transfers")
        alive = self._stop([*self.workers.values(), *self.draining], time.monotonic() + STOP_SECONDS)
        if alive:
            log.warning("stopped; still busy (left to exit with the process): %s",
                        ", ".join(sorted({str(w.job.path) for w in alive})))
        else:
            log.info("stopped")
        return 0


def run(path: str) -> int:
    setup_logging()
    return Daemon(path).run()
