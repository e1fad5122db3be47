"""Benchmarks for editkit (importable so tests and other benchmarks can reuse them)."""
