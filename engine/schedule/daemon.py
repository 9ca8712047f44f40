"""`blockrep schedule run`: the foreground daemon (docs/SCHEDULE.md §5). The main thread owns
the signals, systemd notifications and the watchdog; the workers (jobs.py) do the work.

- SIGTERM/SIGINT: every transfer pauses (its confirmed prefix saved), then exit 0.
- SIGHUP: the file is read again; with errors it is refused (one log line each) and the old
  configuration keeps running; volumes whose configuration is unchanged keep their workers (a
  running transfer of theirs goes on), the others are paused and restarted.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ..errors import BlockrepError
from . import config as C
from .jobs import Shared, VolumeWorker
from .notify import Notifier

log = logging.getLogger("blockrep.schedule")
STOP_SECONDS = 8.0  # SIGTERM to exit: systemd's default stop timeout is far longer; tests say 10 s


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
        self.workers: dict[object, VolumeWorker] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.reload_asked = False

    def _start(self, job) -> None:
        """Start a volume's workers; BlockrepError if another daemon schedules it."""
        w = VolumeWorker(job, self.shared)
        try:
            w.ensure_served()
        except BlockrepError as e:
            log.warning("%s: could not serve it: %s", job.path, e)
        w.begin()
        self.workers[job] = w

    def _stop_workers(self, workers: list[VolumeWorker]) -> None:
        for w in workers:
            w.stop()
        for w in workers:
            w.join_all(STOP_SECONDS)

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
            changed = list(self.workers.values())  # a new semaphore: every worker restarts
            self._stop_workers(changed)
            self.workers.clear()
            self.shared = Shared(new.max_transfers, new.retry_min, new.retry_max, self.notifier.status)
        gone = [j for j in self.workers if j not in new.volumes]
        self._stop_workers([self.workers.pop(j) for j in gone])
        started = [job for job in new.volumes if job not in self.workers]
        for job in started:
            try:
                self._start(job)
            except BlockrepError as e:
                log.error("not scheduling %s: %s", job.path, e)
        if new.metrics != self.cfg.metrics:
            log.warning("metrics address changes need a restart; still serving the old one")
        self.cfg = new
        log.info("configuration reloaded: %d volume(s), %d (re)started, %d stopped", len(new.volumes),
                 len(started), len(gone))
        self.notifier.send(READY=1, STATUS=f"reloaded: {len(new.volumes)} volume(s)")

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_asked = True
        else:
            self.stopping = True
        self.wake.set()

    def run(self) -> int:
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
            self._stop_workers(list(self.workers.values()))
            raise
        log.info("started: %d volume(s), %d target(s)", len(self.cfg.volumes),
                 sum(len(j.targets) for j in self.cfg.volumes))
        self.notifier.send(READY=1, STATUS=f"running {len(self.cfg.volumes)} volume(s)")
        interval = self.notifier.watchdog_interval
        while not self.stopping:
            self.wake.wait(interval if interval else 3600)
            self.wake.clear()
            if interval:
                self.notifier.send(WATCHDOG=1)
            if self.reload_asked and not self.stopping:
                self.reload_asked = False
                self.reload()
        self.notifier.send(STOPPING=1, STATUS="pausing transfers")
        log.info("stopping: pausing transfers")
        self._stop_workers(list(self.workers.values()))
        log.info("stopped")
        return 0


def run(path: str) -> int:
    setup_logging()
    return Daemon(path).run()
