"""Collectors: time-stamped snapshots of what PostgreSQL knows about itself."""
