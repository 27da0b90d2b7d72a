"""vggspec's benchmark suite: `.venv/bin/python -m benchmarks` (see benchmarks/README.md)."""
