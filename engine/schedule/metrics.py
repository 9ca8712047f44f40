"""The Prometheus endpoint (prometheus-client): a collector that reads status.rows() at each
scrape, so the metrics are exactly what `schedule status` shows. Labels: volume (its path) and
target (the URI without secrets)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..replication.state import parse_time
from .config import Config
from .status import rows

log = logging.getLogger("blockrep.schedule")
STATES = ("idle", "queued", "waiting", "running", "paused", "failing")


class ScheduleCollector(Collector):
    def __init__(self, get_config):
        self.get_config = get_config  # the daemon's current Config (it changes on reload)

    def collect(self):
        vt = ["volume", "target"]
        rpo = GaugeMetricFamily("blockrep_rpo_seconds", "Age of the newest snapshot the target holds", labels=vt)
        last = GaugeMetricFamily("blockrep_last_success_timestamp_seconds", "End of the last successful transfer",
                                 labels=vt)
        pend = GaugeMetricFamily("blockrep_bytes_pending", "Bytes changed since the target's snapshot", labels=vt)
        sent = CounterMetricFamily("blockrep_bytes_sent", "Bytes sent to the target by this scheduler", labels=vt)
        fails = CounterMetricFamily("blockrep_transfer_failures", "Failed transfer attempts", labels=vt)
        state = GaugeMetricFamily("blockrep_transfer_state", "1 for the target's current state",
                                  labels=[*vt, "state"])
        snaps = GaugeMetricFamily("blockrep_snapshots", "Snapshots by site (primary: scheduled ones on the "
                                  "volume; dr: the DR's, counted after each transfer)", labels=[*vt, "site"])
        used = GaugeMetricFamily("blockrep_volume_used_bytes", "Bytes the volume takes on disk", labels=["volume"])
        live = GaugeMetricFamily("blockrep_volume_live_bytes", "Bytes of live data in the volume", labels=["volume"])
        cfg: Config = self.get_config()
        try:
            found = rows(cfg)
        except Exception as e:  # noqa: BLE001 - a scrape never prints a traceback into the log
            log.error("metrics: could not read the status (%s: %s)", type(e).__name__, e)
            found = []
        for r in found:
            v = r["volume"]
            if r.get("used_bytes") is not None:
                used.add_metric([v], r["used_bytes"])
            if r.get("live_bytes") is not None:
                live.add_metric([v], r["live_bytes"])
            if r.get("scheduled_snapshots") is not None:
                snaps.add_metric([v, "", "primary"], r["scheduled_snapshots"])
            for t in r["targets"]:
                lab = [v, t["target"]]
                if t["rpo_seconds"] is not None:
                    rpo.add_metric(lab, t["rpo_seconds"])
                if t["last_success"]:
                    last.add_metric(lab, parse_time(t["last_success"]).timestamp())
                if t["pending_bytes"] is not None:
                    pend.add_metric(lab, t["pending_bytes"])
                sent.add_metric(lab, t["bytes_sent_total"])
                fails.add_metric(lab, t["failures_total"])
                for s in STATES:
                    state.add_metric([*lab, s], 1 if t["state"] == s else 0)
                if t["dr_snapshots"] is not None:
                    snaps.add_metric([*lab, "dr"], t["dr_snapshots"])
        yield from (rpo, last, pend, sent, fails, state, snaps, used, live)


def serve_metrics(addr: tuple[str, int], get_config) -> None:
    """Start the HTTP endpoint in a thread (prometheus-client's own server)."""
    REGISTRY.register(ScheduleCollector(get_config))
    start_http_server(addr[1], addr=addr[0])
    log.info("metrics on http://%s:%d/metrics", *addr)
