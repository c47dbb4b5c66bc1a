"""Processes: the lifecycle, the single-process server, the supervisor and its workers, systemd, privileges, preflight."""
