"""fusedclip.bench.training_step runs end to end at its tiny size: structure only (no timing asserts)."""

from __future__ import annotations

import math
import time

import pytest
import torch

import fusedclip
from fusedclip.bench import training_step as ts


def test_main_prints_a_table_per_model_with_every_variant(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert ts.main(["--size", "tiny", "--rounds", "1", "--models", "gpt2", "lstm", "--min-numel", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == out.read_text().strip()
    for model in ("gpt2", "lstm"):
        assert f"## {model} (tiny)" in printed
    for variant in ts.VARIANTS:
        assert printed.count(f"| {variant} |") == 2
    assert "command: python -m fusedclip.bench.training_step --size tiny" in printed


def test_run_returns_every_variant_and_the_ratio_definition():
    (res,) = ts.run(["small-linears"], "tiny", 2, min_numel=0, clock="cpu")
    assert res.tensors == 6 and res.hooked == 6 and res.rounds == 2
    assert list(res.times) == list(ts.VARIANTS)
    for t in res.times.values():
        assert set(t) == {"step", "backward", "after"} and all(v >= 0 for v in t.values())
    assert res.overhead("none") == 0.0
    torch_over = res.overhead("torch")
    expected = res.overhead("tracker") / torch_over if torch_over > 0 else float("nan")
    assert res.ratio("tracker") == expected or (math.isnan(expected) and math.isnan(res.ratio("tracker")))
    (default,) = ts.run(["small-linears"], "tiny", 1)
    assert default.hooked == 0  # tiny tensors are below the tracker's default min_numel


def test_models_are_what_the_names_say():
    gpt2, tokens = ts.make_model("gpt2", "tiny", torch.device("cpu"))
    assert gpt2.wte.weight is not None and tokens.dtype == torch.int64
    full_shapes = ts._CONFIGS["gpt2"]["full"][0]
    assert full_shapes == dict(vocab=50257, ctx=1024, d=768, layers=12)  # GPT-2 small
    loss = gpt2(tokens)
    loss.backward()
    assert all(p.grad is not None for p in gpt2.parameters())
    tracker = fusedclip.NormTracker(gpt2, min_numel=0)
    assert tracker.hooked == len(list(gpt2.parameters()))  # the tied head adds no tensor
    tracker.remove()


def test_bad_arguments():
    assert ts.main(["--size", "tiny", "--rounds", "0"]) == 2
    assert ts.main(["--size", "tiny", "--min-numel", "-1"]) == 2
    with pytest.raises(SystemExit):
        ts.main(["--models", "resnet"])
    with pytest.raises(ValueError, match="unknown model"):
        ts.run(["resnet"], "tiny", 1)
    with pytest.raises(ValueError, match="clock"):
        ts.bench_model("lstm", "tiny", 1, clock="sundial")
    with pytest.raises(ValueError, match="rounds"):
        ts.run(["lstm"], "tiny", 0)


def test_the_benchmark_cli_runs_it(capsys):
    """``python -m fusedclip.bench --training-step ...`` hands its options to this benchmark."""
    from fusedclip.bench import cli

    assert cli.main(["--training-step", "--size", "tiny", "--rounds", "1", "--models", "lstm"]) == 0
    assert "## lstm (tiny)" in capsys.readouterr().out


def test_the_read_floor_counts_the_bytes_beyond_the_cache():
    """Only what a grad holds beyond the cache size must come from memory: a 4000-byte grad with a
    400-byte cache leaves 3600 bytes; a grad that fits leaves none; a set that fits has no floor."""
    grads = [torch.ones(1000), torch.ones(10), torch.ones(2, 300, dtype=torch.float64)]
    size, ms = ts.read_floor(grads, 400, 2, torch.device("cpu"), time.perf_counter)
    assert size == 3600 + (4800 - 400) and ms >= 0.0
    assert ts.read_floor(grads, 1 << 20, 2, torch.device("cpu"), time.perf_counter) == (0, 0.0)
    cache = ts.last_level_cache_bytes(torch.device("cpu"))
    assert cache is None or cache > 0


def test_the_report_states_the_floor():
    res = ts.ModelResult("gpt2", "tiny", 3, 1000, 0, 1)
    res.times = {"none": dict(step=10.0, backward=5.0, after=5.0), "torch": dict(step=30.0, backward=5.0, after=25.0)}
    res.cache_bytes, res.beyond_cache_bytes, res.read_floor_ms = 32 << 20, 120_000_000, 9.5
    text = ts.format_markdown([res])
    assert "120.0 MB of grads lie beyond the last-level cache (32 MiB)" in text
    assert "takes 9.50 ms here; a tenth of torch's clipping overhead is 2.00 ms" in text
    res.beyond_cache_bytes, res.read_floor_ms = 0, 0.0
    assert "every grad fits in the last-level cache (32 MiB)" in ts.format_markdown([res])
    res.cache_bytes = None
    assert "not known" in ts.format_markdown([res])
