"""Benchmarks of fusedclip against native torch (``python -m fusedclip.bench``)."""
