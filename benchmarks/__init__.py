"""Benchmarks: measured, not asserted. Run each from the repository root as a module,
``python -m benchmarks.<name> [--update BENCHMARKS.md]``; the figures live in BENCHMARKS.md only."""
