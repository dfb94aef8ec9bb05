"""``python -m fusedclip.bench --distributed N``: a tiny run's table and files (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from fusedclip.bench import cli
from fusedclip.bench import distributed as bench_distributed
from fusedclip.bench.errors import BenchError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_tiny_distributed_run_reports_every_layout_with_collective_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_distributed, "DEFAULT_LAYERS", 1)
    monkeypatch.setattr(bench_distributed, "DEFAULT_WIDTH", 16)
    monkeypatch.setattr(bench_distributed, "WARMUP", 1)
    # the spawned processes import the module afresh: the tiny sizes go through run()'s arguments
    original_run = bench_distributed.run
    monkeypatch.setattr(bench_distributed, "run", lambda world_size, reps: original_run(world_size, reps, layers=1, width=16))
    assert cli.main(["--distributed", "2", "--reps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    report = (tmp_path / "distributed_gloo.md").read_text()
    assert report in printed
    assert "2-core CPU" in report and "gloo" in report and "NCCL" in report
    table = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == list(bench_distributed.COLUMNS)
    assert set(table[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [row[0] for row in rows] == ["fsdp2", "fsdp-tp"]
    for row in rows:
        assert len(row) == len(header)
        cells = dict(zip(header, row))
        assert int(cells["torch collectives"]) >= 1
        assert int(cells["fusedclip collectives"]) == 1  # one all-reduce per call
        assert float(cells["torch ms"]) > 0 and float(cells["fusedclip ms"]) > 0
        assert cells["torch / fusedclip"].endswith("x")
        assert float(cells["total rel. diff"]) < 1e-5  # both clipped the same grads to the same norm

    data = json.loads((tmp_path / "distributed_gloo.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["backend"] == "gloo"
    assert data["meta"]["command"] == "python -m fusedclip.bench --distributed 2 --reps 2 --out " + str(tmp_path)
    assert [row["layout"] for row in data["rows"]] == ["fsdp2", "fsdp-tp"]
    for row in data["rows"]:
        assert isinstance(row["torch_collectives"], int) and isinstance(row["fusedclip_collectives"], int)
        assert row["fusedclip_collectives"] <= row["torch_collectives"]


def test_distributed_run_refuses_fewer_than_two_processes():
    with pytest.raises(BenchError, match="at least 2"):
        bench_distributed.run(1, 2)
    assert cli.main(["--distributed", "1"]) == 2
