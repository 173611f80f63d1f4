"""Workload-level advice: indexes, partitions and rewrites."""
