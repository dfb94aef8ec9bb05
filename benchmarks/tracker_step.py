"""A training step with and without clipping, the NormTracker among them, side by side.

A thin wrapper over :mod:`fusedclip.bench.training_step` (see its docstring for the variants and
models), defaulting to the full-size models (GPT-2 small's shapes, a 512-wide LSTM) and the 400
small tensors of ``small-linears``::

    python benchmarks/tracker_step.py --rounds 7 --threads 2

Any option of ``python -m fusedclip.bench.training_step`` is accepted (``--size small`` for a run of
about 30 s, ``--min-numel`` for the tracker's threshold).
"""

from __future__ import annotations

import sys

from fusedclip.bench.training_step import main as _main


def main(argv: list[str] | None = None) -> int:
    """``training_step.main`` with ``--size full --models gpt2 lstm small-linears`` unless given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--size" not in argv:
        argv = ["--size", "full", *argv]
    if "--models" not in argv:
        argv = [*argv, "--models", "gpt2", "lstm", "small-linears"]
    return _main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
