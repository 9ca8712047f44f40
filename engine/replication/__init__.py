"""Replication of snapshots to a DR site (DESIGN.md M6, M9, M12; docs/REPLICATION.md).

One job per module:
- protocol.py  the DR protocol's shared words: export-name grammar, chunk sizes, digests, limits
- nbdio.py     libnbd connections, bounded requests (block status, reads), error classification
- copy.py      the copy loop: many requests in flight per connection (libnbd's async API)
- plan.py      pure decisions: common base by identity, mode (seed/incremental/rebase), resume
- checksums.py digests of snapshots and DR heads, compared without moving data
- state.py     VOL/replication.json: per-target records, run history, the one-run-per-target lock
- retention.py which snapshots may be pruned (bases and unshipped snapshots are kept), on both sites
- gfs.py       GFS rules (hourly/daily/weekly/monthly buckets in local time), pure
- drclient.py  the primary's side of the DR protocol
- drserver.py  the DR's side, run inside the DR's nbdkit by the plugin
- replicate.py, verify.py, status.py  the commands
"""
