"""The one-call GPU proof (benchmarks/gpu_proof.sh) rehearsed on the CPU, so that it cannot rot.

A GPU is lent rarely and briefly: the proof must work the first time. ``--rehearse`` runs every
stage except the GPU work: the build command is checked against setup.py, the gate runs its checks
with the CPU backends, the headline benchmark runs the same writer and set definitions on small CPU
variants, and the pytest selections of the contract and parity stages must still collect tests. This
test runs it and checks the stage plan (budgets within 8 minutes), the files it leaves (at most 8,
with names the device tool returns) and their contents; and that the bench CLI still accepts the
flags the GPU runs use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
#: one call of the device tool: at most 8 minutes for the whole proof, build included
CALL_LIMIT_S = 480
#: the headline sets in the order of value
SET_KEYS = ["gpt2-small-fp32", "llama2-7b-bf16", "small-2000-fp32", "gpt2-small-bf16", "huge-bf16"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _listing() -> dict[str, str]:
    done = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_stage_budgets_fit_one_call():
    listing = _listing()
    stages = [name for name in listing if name not in ("total", "deadline", "files")]
    assert stages == ["build", "gate", "bench", "contract", "parity", "tracker"], "the order is the order of value"
    budgets = [int(listing[name]) for name in stages]
    assert all(b > 0 for b in budgets)
    assert sum(budgets) == int(listing["total"])
    assert sum(budgets) <= int(listing["deadline"]) <= CALL_LIMIT_S - 10, "leave time for the machine's own start"
    files = listing["files"].split()
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files


def test_the_gpu_run_requires_cuda_in_the_build():
    text = SCRIPT.read_text()
    assert "FUSEDCLIP_CUDA=1" in text, "a failed nvcc build must fail the proof, not yield a CPU-only extension"
    assert "--no-build-isolation --no-deps --no-index -e ." in text, "no network on the lent machine"
    gate = (ROOT / "benchmarks" / "gpu_gate.py").read_text()
    assert '"cuda": ("cuda", "triton")' in gate, "the gate must require both kernel backends on the GPU"


def test_bench_cli_accepts_the_gpu_flags():
    from fusedclip.bench.cli import build_parser

    args = build_parser().parse_args(
        ["--device", "cuda", "--suite", "gpt2-small,llama2-7b,small-10k,huge", "--dtype", "fp32,bf16",
         "--provider", "torch,torch-compile,apex,fusedclip-cuda,fusedclip-triton", "--compile-budget", "60",
         "--save", "out", "--no-progress"]
    )  # fmt: skip
    assert args.device == "cuda" and args.compile_budget == 60


def _headline():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_headline
    finally:
        sys.path.pop(0)
    return gpu_headline


def test_headline_sets_come_from_the_bench_suites():
    gpu_headline = _headline()
    keys = [s.key for s in gpu_headline.SETS]
    assert keys == SET_KEYS
    full = {s.key: s.shapes(None) for s in gpu_headline.SETS}
    assert len(full["small-2000-fp32"][0]) == 2000
    assert full["huge-bf16"][0] == [(1 << 31,)], "one tensor beyond a 32-bit index"
    assert sum(map(lambda shape: shape[0] * shape[1] if len(shape) == 2 else shape[0], full["llama2-7b-bf16"][0])) > 6e9
    assert gpu_headline.PROVIDERS[:2] == ["fusedclip-cuda", "fusedclip-triton"]


def test_headline_measures_torch_compile_after_every_other_row():
    """A cold torch.compile costs tens of seconds: it must not push the kernel rows of later sets out
    of the bench stage's budget, so the compiling providers get a second pass after every set."""
    gpu_headline = _headline()

    class Fake:
        def __init__(self, name: str, compiles: bool = False) -> None:
            self.name, self.compiles = name, compiles

    providers = [Fake(name, name == "torch-compile") for name in gpu_headline.PROVIDERS]
    passes = gpu_headline.schedule(gpu_headline.SETS, providers)
    rows = [(grad_set.key, provider.name, seed) for seed, grad_set, members in passes for provider in members]
    keys = [s.key for s in gpu_headline.SETS]
    first_compile = next(i for i, row in enumerate(rows) if row[1] == "torch-compile")
    assert all(row[1] != "torch-compile" for row in rows[:first_compile])
    assert all(row[1] == "torch-compile" for row in rows[first_compile:])
    assert [row[0] for row in rows[first_compile:]] == keys, "compile rows in the order of value too"
    assert rows[:first_compile] == [(key, p, i) for i, key in enumerate(keys) for p in gpu_headline.PROVIDERS[:-1]]
    assert {(key, seed) for key, _, seed in rows} == set(zip(keys, range(len(keys)))), "one seed per set: same grads"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("proof")
    env = _env()
    env["OUT"] = str(out)
    done = subprocess.run(["bash", str(SCRIPT), "--rehearse"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)  # fmt: skip
    return done, out


@pytest.mark.slow
def test_rehearsal_passes_every_stage(rehearsal):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for stage in ("build", "gate", "bench", "contract", "parity", "tracker"):
        assert re.search(rf"^\| {stage} \| ok \|", summary, re.MULTILINE), summary


@pytest.mark.slow
def test_rehearsal_writes_the_expected_files(rehearsal):
    done, out = rehearsal
    listed = set(_listing()["files"].split())
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert written == listed, (written, listed)
    assert len(written) <= 8


@pytest.mark.slow
def test_rehearsal_bench_rows_are_complete(rehearsal):
    done, out = rehearsal
    lines = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert "meta" in lines[0] and lines[0]["meta"]["rehearsal"] is True
    rows = lines[1:]
    sets = {row["set"] for row in rows}
    assert sets == set(SET_KEYS)
    for row in rows:
        assert "error" not in row, row
        if "skipped" not in row:
            for key in ("clipped_ms", "unclipped_ms", "clipped_share", "unclipped_share", "clipped_wall_us"):
                assert row[key] > 0, (key, row)
    # torch.compile after every other row (the rehearsal writes its rows skipped: a 0 s compile budget)
    providers = [row["provider"] for row in rows]
    assert providers.count("torch-compile") == 5, providers
    assert providers[-5:] == ["torch-compile"] * 5, providers
    measured = [row for row in rows if row["provider"] == "fusedclip-cpu"]
    assert len(measured) == 5 and all(row["norm_rel_error"] < 1e-2 for row in measured)
    table = (out / "bench.md").read_text()
    assert table.count("| fusedclip-cpu |") == 5 and table.count("| torch |") == 5
    # the table groups the rows by set: each set's compile row under its other rows
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if " GiB |" in line]
    assert [row[0] for row in cells] == [key for key in SET_KEYS for _ in range(3)], table
    assert [row[2] for row in cells] == ["fusedclip-cpu", "torch", "torch-compile"] * 5, table


@pytest.mark.slow
def test_rehearsal_selections_collect_tests(rehearsal):
    done, out = rehearsal
    contract = (out / "contract.log").read_text()
    parity = (out / "parity.log").read_text()
    assert re.search(r"(\d+) tests collected", contract) and "test_cuda_graph" in contract
    count = int(re.search(r"(\d+)/\d+ tests collected", parity).group(1))
    assert 100 <= count <= 400, f"the reduced parity selection has {count} tests"
    # the kernel backends only: the `torch` backend's CUDA cases would take a third of the 60 s
    assert "[cuda-cuda-" in parity and "[cuda-triton-" in parity and "[cuda-torch-" not in parity
    functions = set(re.findall(r"::(test_\w+)\[", parity))
    assert {"test_clip_grad_norm_matches_torch", "test_get_total_norm_matches_torch",
            "test_nonfinite_grads_propagate_like_torch", "test_clip_grad_value_matches_torch_exactly"} <= functions


def test_gate_fails_loudly_without_the_kernel_backends(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_gate
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_gate, "available_on", lambda device: {"cpu": "built without the extension", "torch": True})
    monkeypatch.setattr(gpu_gate, "check_backend", lambda name, device: None)
    assert gpu_gate.main(["--rehearse"]) == 1
    assert "backend 'cpu' is unavailable on cpu: built without the extension" in capsys.readouterr().out
