"""Entry point of ``python -m fusedclip.bench`` and of the ``fusedclip-bench`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
