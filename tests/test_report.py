"""fusedclip.NormLog (norm history without a sync per step) and python -m fusedclip.report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fusedclip
from fusedclip import report
from fusedclip.history import read_log

from conftest import syncs_raise

ROOT = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _backward(model: torch.nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    (model(torch.randn(5, 4, generator=gen)).pow(2).sum() * scale).backward()


# -- recording ----------------------------------------------------------------------------------
def test_log_round_trips_the_clippers_norms(tmp_path):
    model = _model()
    named = list(model.named_parameters())
    clipper = fusedclip.Clipper(named, "norm", max_norm=1.0, top_k=3)
    path = tmp_path / "norms.jsonl"
    expected = []
    with fusedclip.NormLog(clipper, path, flush_every=3) as log:
        for step, scale in enumerate([0.01, 1.0, 30.0, 0.5, math.inf, 2.0, None, 0.02]):
            if scale is None:  # a step without grads
                model.zero_grad(set_to_none=True)
                expected.append(None)
            else:
                _backward(model, 1.0 if math.isinf(scale) else scale, step)
                if math.isinf(scale):
                    named[0][1].grad[0, 0] = math.inf
                grads = [p.grad.clone() for _, p in named]
                per_tensor = [torch.linalg.vector_norm(g.double()).item() for g in grads]
                expected.append((fusedclip.get_total_norm(grads).item(), per_tensor))
            clipper()
            log.record()
    header, rows = read_log(path)
    assert header["mode"] == "norm" and header["params"] == [n for n, _ in named] and header["top_k"] == 3
    assert [r["step"] for r in rows] == list(range(8))
    for row, exp in zip(rows, expected):
        if exp is None:
            assert row["grads"] is False and row["norm"] == 0 and row["top"] == [] and not row["clipped"]
            continue
        total, per_tensor = exp
        assert row["grads"] is True
        assert row["threshold"] == 1.0
        if math.isinf(total):
            assert math.isinf(row["norm"]) and row["nonfinite"] and row["clipped"]
            continue
        assert row["norm"] == pytest.approx(total, rel=1e-6)
        assert row["norm"] == pytest.approx(math.sqrt(sum(v * v for v in per_tensor)), rel=1e-12)
        assert not row["nonfinite"]
        assert row["clipped"] == (total > 1.0)
        order = sorted(range(len(named)), key=lambda i: -per_tensor[i])[:3]
        assert [name for name, _ in row["top"]] == [named[i][0] for i in order]
        assert [v for _, v in row["top"]] == pytest.approx([per_tensor[i] for i in order], rel=1e-12)
    # every line is strict JSON (non-finite numbers as strings)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_adaptive_modes_record_the_threshold_they_applied(tmp_path):
    model = _model()
    for mode in ("autoclip", "zclip"):
        clipper = fusedclip.Clipper(model.named_parameters(), mode, percentile=50, warmup_steps=3)
        thresholds = []
        with fusedclip.NormLog(clipper, tmp_path / f"{mode}.jsonl", flush_every=4) as log:
            for step in range(9):
                _backward(model, 10.0 if step == 6 else 1.0, step)
                clipper()
                thresholds.append(float(clipper.state["threshold"]))
                log.record()
        _, rows = read_log(tmp_path / f"{mode}.jsonl")
        assert [r["threshold"] for r in rows] == thresholds
        assert sum(r["clipped"] for r in rows) == clipper.summary()["clipped_fraction"] * 9


def test_flush_boundaries(tmp_path):
    model = _model()
    clipper = fusedclip.Clipper(model.named_parameters())
    path = tmp_path / "norms.jsonl"
    log = fusedclip.NormLog(clipper, path, flush_every=4)

    def step(i: int) -> None:
        _backward(model, 1.0, i)
        clipper()
        log.record()

    for i in range(3):
        step(i)
    assert path.read_text() == "" and log.flushes == 0  # nothing read back yet
    step(3)
    assert len(path.read_text().splitlines()) == 1 + 4 and log.flushes == 1
    for i in range(4, 7):
        step(i)
    assert len(path.read_text().splitlines()) == 1 + 4
    log.close()
    log.close()  # idempotent
    _, rows = read_log(path)
    assert [r["step"] for r in rows] == list(range(7)) and log.flushes == 2
    with pytest.raises(RuntimeError, match="closed"):
        log.record()


def test_record_needs_one_clipper_call_per_row(tmp_path):
    model = _model()
    clipper = fusedclip.Clipper(model.named_parameters())
    log = fusedclip.NormLog(clipper, tmp_path / "n.jsonl")
    with pytest.raises(RuntimeError, match="has not run"):
        log.record()
    _backward(model, 1.0, 0)
    clipper()
    log.record()
    with pytest.raises(RuntimeError, match="already recorded"):
        log.record()
    with pytest.raises(ValueError):
        fusedclip.NormLog(clipper, tmp_path / "m.jsonl", flush_every=0)


_HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__repr__")


def test_record_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Every way a tensor's value reaches the host is counted: record() uses none, flush() one."""
    model = _model()
    clipper = fusedclip.Clipper(model.named_parameters(), "autoclip", top_k=2)
    log = fusedclip.NormLog(clipper, tmp_path / "n.jsonl", flush_every=1000)
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)

        return wrapper

    for i in range(5):
        _backward(model, 1.0, i)
        clipper()
        with monkeypatch.context() as patch:
            for name in _HOST_READS:
                patch.setattr(torch.Tensor, name, counting(name))
            log.record()
        assert reads == [], f"record() read {reads} from the device"
    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name))
        log.flush()
    assert reads.count("cpu") == 1 and "item" not in reads and "__float__" not in reads
    assert len(read_log(tmp_path / "n.jsonl")[1]) == 5


@pytest.mark.gpu
def test_record_does_not_synchronise_on_cuda(tmp_path):
    model = _model().cuda()
    clipper = fusedclip.Clipper(model.named_parameters(), "zclip", warmup_steps=2)
    log = fusedclip.NormLog(clipper, tmp_path / "n.jsonl", flush_every=50)
    x = torch.randn(5, 4, device="cuda")
    for _ in range(3):  # warm up allocations and kernels
        model.zero_grad()
        model(x).pow(2).sum().backward()
        clipper()
        log.record()
    torch.cuda.synchronize()
    for _ in range(5):
        clipper()
        with syncs_raise():  # record() only: the Clipper's own steps are tested elsewhere
            log.record()
    log.close()
    _, rows = read_log(tmp_path / "n.jsonl")
    assert len(rows) == 8 and all(math.isfinite(r["norm"]) for r in rows)


# -- the report -----------------------------------------------------------------------------------
def _synthetic(n: int = 137, seed: int = 3) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    norms = list(np.exp(rng.normal(0.0, 1.5, n)))
    norms[10], norms[50] = math.inf, math.nan
    header = {"format": "fusedclip.normlog", "version": 1, "mode": "norm", "norm_type": 2.0, "max_norm": 1.0}
    header["top_k"] = 1
    rows = [
        {"step": i, "norm": float(v), "threshold": 1.0, "clipped": not v <= 1.0, "nonfinite": not math.isfinite(v),
         "grads": True, "top": [("w", float(v))]}
        for i, v in enumerate(norms)
    ]
    no_grads = {"step": n, "norm": 0.0, "threshold": 1.0, "clipped": False, "nonfinite": False, "grads": False}
    rows.append({**no_grads, "top": []})
    return header, rows


def _check_threshold_table(analysis: report.Analysis, norms: list[float], current: float) -> None:
    """The report's table against numpy, computed directly from the norms."""
    finite = np.array([v for v in norms if np.isfinite(v)])
    expected = [(f"p{q}", np.percentile(finite, q)) for q in (50, 75, 90, 95, 99)] + [("current", current)]
    assert len(analysis.candidates) == len(expected)
    for candidate, (label, threshold) in zip(analysis.candidates, expected):
        assert candidate.label.startswith(label)
        assert candidate.threshold == pytest.approx(threshold, rel=1e-12), label
        assert candidate.clipped_fraction == np.mean(finite > threshold), label


def test_threshold_table_matches_numpy():
    header, rows = _synthetic()
    analysis = report.analyse(header, rows)
    norms = [r["norm"] for r in rows if r["grads"]]
    _check_threshold_table(analysis, norms, 1.0)
    assert analysis.current_rank == pytest.approx(100 * np.mean(np.array([v for v in norms if np.isfinite(v)]) <= 1.0))
    assert analysis.nonfinite_steps == [10, 50] and analysis.no_grad_steps == 1
    assert analysis.clipped_fraction == pytest.approx(np.mean([not v <= 1.0 for v in norms]))


def test_a_percentile_off_by_one_order_statistic_is_caught(monkeypatch):
    """The check above is not vacuous: a percentile one order statistic too high fails it."""

    def off_by_one(values, q):
        ordered = sorted(values)
        position = min((len(ordered) - 1) * q / 100.0 + 1, len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    header, rows = _synthetic()
    monkeypatch.setattr(report, "percentile", off_by_one)
    broken = report.analyse(header, rows)
    with pytest.raises(AssertionError):
        _check_threshold_table(broken, [r["norm"] for r in rows if r["grads"]], 1.0)


def test_spikes_against_running_median():
    header, rows = _synthetic(n=80)
    for r in rows[:-1]:
        r["norm"] = 1.0 + 0.01 * (r["step"] % 7)
    rows[30]["norm"], rows[60]["norm"], rows[5]["norm"] = 100.0, 4.0, 100.0  # step 5: too little history
    analysis = report.analyse(header, rows)
    assert analysis.spike_steps == [30]


def test_cli_end_to_end(tmp_path):
    model = _model()
    clipper = fusedclip.Clipper(model.named_parameters(), "zclip", warmup_steps=3, top_k=2)
    log_path = tmp_path / "run.jsonl"
    with fusedclip.NormLog(clipper, log_path, flush_every=7) as log:
        for step in range(20):
            _backward(model, 50.0 if step == 12 else 1.0, step)
            clipper()
            log.record()
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "fusedclip.report", str(log_path), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    png, md = out / "run.png", out / "run.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| p90 |" in text and "Clipper mode `zclip`" in text and "![gradient norms](run.png)" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    result = subprocess.run([sys.executable, "-m", "fusedclip.report", str(bad)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2 and "not a fusedclip norm log" in result.stderr


def test_core_does_not_import_matplotlib():
    code = "import sys, fusedclip, fusedclip.history; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "False", result.stderr
