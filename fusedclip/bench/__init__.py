"""Benchmarks of fusedclip against torch and apex: ``python -m fusedclip.bench`` (see ``--help``).

Modules, one job each: :mod:`.suites` (gradient sets and dtypes), :mod:`.providers` (what is
compared), :mod:`.gradsets` (grads on the device, rotated and restored), :mod:`.measure` (timing,
launch counts, copy bandwidth, fp64 norm), :mod:`.metrics` (byte model and arithmetic),
:mod:`.runner` (the interleaved loop), :mod:`.results` (rows, JSON, CSV), :mod:`.report` (Markdown),
:mod:`.chart` (PNG), :mod:`.progress` (progress display), :mod:`.load` (was the machine busy, how
many threads), :mod:`.cli` (options, the default run's time budget, the output files).
"""
