"""Deterministic, in-process benchmarks of the merge rules (no broker, no wall clock)."""
