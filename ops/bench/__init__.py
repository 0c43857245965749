"""Benchmark harness: `make bench`, `make bench-peers` (see README.md here)."""
