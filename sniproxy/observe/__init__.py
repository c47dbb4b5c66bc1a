"""Observability: plain counters bumped on the hot path, read at scrape time; the metrics listener; the logs."""
