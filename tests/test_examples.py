"""The training example runs end to end and its step-for-step check against torch holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANITIZER_ENV = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")


def test_train_lstm_example_runs_and_matches_torch(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    # under benchmarks/sanitize_cpu.sh every python needs the preloaded sanitizer runtime
    env.update({name: os.environ[name] for name in SANITIZER_ENV if name in os.environ})
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_lstm.py"), "--steps", "25", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| fusedclip |" in result.stdout and "| zclip |" in result.stdout
    assert (tmp_path / "train_lstm.md").exists()
