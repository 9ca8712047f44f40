"""The replication scheduler (docs/SCHEDULE.md)."""
