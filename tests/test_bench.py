"""The benchmark harness (fusedclip.bench): byte model, arithmetic, sets, schema, filters, errors.

Nothing here asserts a timing: the end-to-end runs use a tiny test-only set and check the plumbing
and the arithmetic that links the reported numbers, not how fast anything is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from fusedclip.bench import cli, measure, metrics, providers, report, runner
from fusedclip.bench.environment import describe
from fusedclip.bench.errors import BenchError
from fusedclip.bench.gradsets import BASE_NORM, CLIPPED_SCALE, MAX_COPIES, MAX_NORM, GradSet, copies_needed
from fusedclip.bench.report import fmt_number, render_markdown
from fusedclip.bench.results import ROW_FIELDS, SCHEMA, Results, Row
from fusedclip.bench.suites import DTYPES, SUITES, Suite, Variant

CPU = torch.device("cpu")
TINY_SHAPES = ((3, 4), (5,), (2, 2, 2), (7,))


@pytest.fixture
def tiny_suite(monkeypatch: pytest.MonkeyPatch) -> str:
    """A test-only set of four small tensors, registered as suite 'tiny'."""
    monkeypatch.setitem(SUITES, "tiny", Suite("tiny", "test-only set", lambda: [Variant(TINY_SHAPES, "full")]))
    return "tiny"


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default results folder is relative to the working directory: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def small_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the copy-bandwidth reference small so the end-to-end runs stay fast."""
    monkeypatch.setattr(cli, "copy_buffer_bytes", lambda info, quick: 1 << 20)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- byte model and arithmetic --------------------------------------------------------------------


def test_byte_model_counts_one_pass_unclipped_and_three_clipped():
    assert metrics.bytes_moved(1000, clipped=False) == 1000
    assert metrics.bytes_moved(1000, clipped=True) == 3000
    assert metrics.bytes_moved(0, clipped=True) == 0
    with pytest.raises(ValueError):
        metrics.bytes_moved(-1, clipped=True)


def test_copy_moves_two_bytes_per_byte():
    assert metrics.copy_bytes_moved(256 << 20) == 512 << 20


def test_bandwidth_share_and_speedup_arithmetic():
    assert metrics.bandwidth_gbps(3_000_000_000, 1.5) == pytest.approx(2.0)
    assert metrics.bandwidth_gbps(10, 0.0) is None
    assert metrics.bandwidth_gbps(10, None) is None
    assert metrics.share(5.0, 20.0) == pytest.approx(0.25)
    assert metrics.share(None, 20.0) is None and metrics.share(5.0, 0.0) is None
    assert metrics.speedup(0.3, 0.1) == pytest.approx(3.0)
    assert metrics.speedup(0.1, 0.4) == pytest.approx(0.25)
    assert metrics.speedup(None, 0.1) is None


def test_relative_error_edge_cases():
    assert metrics.relative_error(101.0, 100.0) == pytest.approx(0.01)
    assert metrics.relative_error(99.0, 100.0) == pytest.approx(0.01)
    assert metrics.relative_error(0.0, 0.0) == 0.0
    assert metrics.relative_error(1.0, 0.0) == math.inf
    assert metrics.relative_error(math.inf, 100.0) == math.inf
    assert math.isnan(metrics.relative_error(math.nan, 100.0))


def test_median_ignores_missing_values():
    assert metrics.median([3.0, None, 1.0, 2.0]) == 2.0
    assert metrics.median([None, None]) is None


# -- the sets -------------------------------------------------------------------------------------

# Parameter counts published for these models (Hugging Face / torchvision), an independent check
# that the shapes are the real ones.
KNOWN_SIZES = {
    "gpt2-small": (148, 124_439_808),
    "gpt2-medium": (292, 354_823_168),
    "llama2-7b": (291, 6_738_415_616),
    "resnet50": (161, 25_557_032),
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_model_sets_have_the_published_sizes(name):
    full = SUITES[name].full()
    assert (full.tensors, full.elements) == KNOWN_SIZES[name]
    assert full.scale == "full"


def test_extreme_sets():
    assert SUITES["small-10k"].full().tensors == 10_000
    assert max(SUITES["small-10k"].full().numels) <= 4096
    assert 1800 <= SUITES["moe"].full().tensors <= 2200
    huge = SUITES["huge"].full()
    assert huge.tensors == 1 and huge.elements == 2**31  # past a 32-bit index


@pytest.mark.parametrize("name", list(SUITES))
@pytest.mark.parametrize("budget_mb", [1, 64, 256, 4096])
def test_fit_scales_down_within_budget_keeping_real_shapes(name, budget_mb):
    suite, spec = SUITES[name], DTYPES["fp32"]
    budget = budget_mb << 20
    variant = suite.fit(budget, spec)
    variants = suite.variants()
    # the largest variant that fits, or the smallest when none does
    fitting = [v for v in variants if spec.nbytes(v) <= budget]
    assert variant == (fitting[0] if fitting else variants[-1])
    if name != "huge":  # scaled sets keep real tensor shapes
        assert set(variant.shapes) <= set(suite.full().shapes)
    assert (variant.scale == "full") == (variant == suite.full())


def test_llama_scale_is_stated_when_scaled():
    variant = SUITES["llama2-7b"].fit(512 << 20, DTYPES["bf16"])
    assert variant.scale == "1/32 layers, no embeddings"
    assert variant.tensors == 9
    variant = SUITES["llama2-7b"].fit(128 << 20, DTYPES["bf16"])  # q, k, v, o of one layer: 4 x 32 MiB
    assert variant.scale == "first 4/9 tensors of 1/32 layers, no embeddings"
    assert variant.shapes == ((4096, 4096),) * 4
    # one tensor cannot mix dtypes: the mix takes the smallest variant it applies to, over budget
    variant = SUITES["llama2-7b"].fit(64 << 20, DTYPES["mix"])
    assert variant.tensors == 2 and DTYPES["mix"].nbytes(variant) == 96 << 20
    assert SUITES["llama2-7b"].fit(None, DTYPES["bf16"]).scale == "full"


def test_dtype_specs_and_their_bytes():
    variant = Variant(((4, 8), (8,), (2, 3)), "full")
    assert DTYPES["fp32"].nbytes(variant) == (32 + 8 + 6) * 4
    assert DTYPES["fp16"].nbytes(variant) == (32 + 8 + 6) * 2
    mix = DTYPES["mix"].dtypes_for(variant.shapes)
    assert mix == [torch.bfloat16, torch.float32, torch.bfloat16]  # matrices bf16, vectors fp32
    assert DTYPES["mix"].nbytes(variant) == 32 * 2 + 8 * 4 + 6 * 2
    # a set whose tensors all have one rank alternates; one tensor cannot mix
    assert DTYPES["mix"].dtypes_for([(3,), (4,), (5,)]) == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert DTYPES["mix"].dtypes_for([(3,)]) is None


# -- grads, copies, reference norm, launches ------------------------------------------------------


def test_gradset_copies_are_identical_and_restored_in_place():
    gradset = GradSet(TINY_SHAPES, [torch.float32, torch.bfloat16, torch.float16, torch.float32], CPU, copies=3)
    assert gradset.copies == 3
    for copy in range(3):
        for grad, pristine in zip(gradset.grads(copy), gradset.pristine):
            assert torch.equal(grad, pristine) and grad.data_ptr() != pristine.data_ptr()
    norm = measure.reference_norm(gradset.pristine)
    assert norm == pytest.approx(BASE_NORM, rel=0.01)  # normalised, then rounded to each dtype
    addresses = [g.data_ptr() for g in gradset.grads(1)]
    torch.nn.utils.clip_grad_norm_(gradset.params[1], 1.0)
    assert not torch.equal(gradset.grads(1)[0], gradset.pristine[0])
    gradset.restore(1)
    assert [g.data_ptr() for g in gradset.grads(1)] == addresses
    assert all(torch.equal(g, p) for g, p in zip(gradset.grads(1), gradset.pristine))


def test_gradset_scale_is_exact_and_undone_exactly():
    gradset = GradSet(TINY_SHAPES, [torch.float16, torch.bfloat16, torch.float32, torch.float16], CPU, copies=2)
    base = [g.clone() for g in gradset.pristine]
    gradset.set_scale(CLIPPED_SCALE)
    for copy in range(2):
        assert all(torch.equal(g, b * CLIPPED_SCALE) for g, b in zip(gradset.grads(copy), base))
    assert measure.reference_norm(gradset.pristine) == CLIPPED_SCALE * measure.reference_norm(base)
    gradset.set_scale(1.0)
    assert all(torch.equal(g, b) for g, b in zip(gradset.grads(1), base))
    with pytest.raises(ValueError, match="power of two"):
        gradset.set_scale(3.0)
    assert BASE_NORM < MAX_NORM < BASE_NORM * CLIPPED_SCALE  # one max_norm: unclipped, then clipped


def test_copies_span_twice_the_cache_within_memory():
    assert copies_needed(10 << 20, 32 << 20, 1 << 40) == 7  # ceil(64 / 10)
    assert copies_needed(1 << 30, 32 << 20, 1 << 40) == 1
    assert copies_needed(1 << 10, 32 << 20, 1 << 40) == MAX_COPIES
    assert copies_needed(10 << 20, 32 << 20, 30 << 20) == 2  # memory holds the pristine copy + 2


def test_reference_norm_is_float64_over_chunks():
    # big grads are split, small ones of one dtype batched together
    grads = [torch.randn(100, dtype=torch.bfloat16), torch.randn(3, 7), torch.randn(3), torch.randn(2, 2)]
    grads += [torch.randn(4, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float16), torch.randn(6)]
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert measure.reference_norm(grads, chunk_elements=7) == pytest.approx(expected, rel=1e-12)
    assert measure.reference_norm([]) == 0.0


def test_launch_count_on_cpu_counts_top_level_torch_ops():
    a, b = torch.randn(8), torch.randn(8)
    assert measure.count_launches(lambda: (torch.add(a, b), torch.mul(a, b), a.sum()), CPU) == 3
    grads = [torch.randn(5) for _ in range(6)]
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.empty(5), requires_grad=False)
        param.grad = grad
        params.append(param)
    fused = measure.count_launches(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), CPU)
    looped = measure.count_launches(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False), CPU)
    assert looped > fused  # one norm and one mul per tensor instead of one foreach call each
    assert measure.launch_kind(CPU) == "torch ops"


def test_time_call_returns_the_result_and_cpu_fields():
    sample, result = measure.time_call(lambda: 42, CPU)
    assert result == 42
    assert sample.wall_s >= 0 and sample.cpu_s >= 0 and sample.device_s is None


# -- providers: discovery, filters, errors --------------------------------------------------------


def test_providers_cover_torch_variants_apex_and_every_fusedclip_backend():
    import fusedclip.backends as registry

    known = providers.discover(CPU)
    names = [p.name for p in known]
    assert names[:4] == ["torch", "torch-loop", "torch-compile", "apex"]
    assert names[4:] == [f"fusedclip-{b}" for b in registry.BACKEND_NAMES]
    by_name = {p.name: p for p in known}
    assert by_name["torch"].available and by_name["fusedclip-torch"].available
    assert "CUDA" in by_name["apex"].unavailable
    available = registry.available_backends(CPU)
    for backend in ("cuda", "cpu", "torch"):  # availability follows the registry
        expected = None if available[backend] is True else available[backend]
        assert by_name[f"fusedclip-{backend}"].unavailable == expected
    # triton never runs timed on a CPU (only through its interpreter, far too slow)
    assert not by_name["fusedclip-triton"].available


def test_triton_on_a_cpu_is_excluded_without_importing_triton(monkeypatch):
    import fusedclip.backends as registry

    monkeypatch.setattr(registry, "_reason", lambda name, d, p: pytest.fail(f"{name} looked up"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert providers._fusedclip_reason("triton", CPU) == providers.INTERPRETER_REASON
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA tensors" in providers._fusedclip_reason("triton", CPU)


def test_select_filters_orders_and_keeps_the_baseline():
    known = providers.discover(CPU)
    chosen = providers.select(known, ["fusedclip-torch,torch-loop"], CPU)
    assert [p.name for p in chosen] == ["torch", "torch-loop", "fusedclip-torch"]
    assert [p.name for p in providers.select(known, ["fusedclip"], CPU)][0] == "torch"
    assert all(p.available for p in providers.select(known, None, CPU))


def test_select_rejects_unknown_and_unavailable_providers():
    known = providers.discover(CPU)
    with pytest.raises(BenchError, match="unknown provider 'nope'; choose from: torch, "):
        providers.select(known, ["nope"], CPU)
    with pytest.raises(BenchError, match="provider 'apex' is unavailable on cpu: .*CUDA"):
        providers.select(known, ["apex"], CPU)


def test_resolve_names_accepts_aliases_and_comma_lists():
    assert cli.resolve_names(["float32,bf16", "fp32"], list(DTYPES), {"float32": "fp32"}, "dtype") == ["fp32", "bf16"]
    assert cli.resolve_names(None, list(DTYPES), {}, "dtype") == []
    with pytest.raises(BenchError, match="unknown dtype 'int8'"):
        cli.resolve_names(["int8"], list(DTYPES), {}, "dtype")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "nope"], "unknown suite 'nope'; choose from: gpt2-small"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--provider", "nope"], "unknown provider 'nope'"),
        (["--provider", "apex"], "provider 'apex' is unavailable on cpu"),
        (["--reps", "0"], "--reps must be >= 1"),
        (["--provider", "torch-compile"], "compile budget is 0"),
        (["--time-budget", "-1"], "--time-budget must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_options_give_a_message_not_a_traceback(capsys, argv, message):
    if torch.cuda.is_available():
        argv = ["--device", "cpu"] + argv
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_message(capsys):
    code, _, err = run_cli(capsys, "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_list_shows_sets_dtypes_and_provider_availability(capsys):
    code, out, _ = run_cli(capsys, "--list", "--device", "cpu")
    assert code == 0
    for name in list(SUITES) + list(DTYPES) + ["torch-loop", "fusedclip-torch"]:
        assert name in out
    assert "apex" in out and "unavailable" in out


# -- options ----------------------------------------------------------------------------------------


def _options(*argv: str):
    args = cli.build_parser().parse_args(list(argv))
    info = describe(CPU)
    return cli.make_options(args, info, providers.discover(CPU))


def test_default_run_is_short_time_budgeted_and_compares_torch_with_the_automatic_backend():
    options, notes = _options()
    assert options.suites == cli.DEFAULT_SUITES and options.dtypes == cli.DEFAULT_DTYPES
    assert options.budget_bytes == cli.DEFAULT_CPU_BUDGET_MB << 20
    assert options.time_budget_s == cli.DEFAULT_TIME_BUDGET_S
    assert [p.name for p in options.providers] == ["torch", cli.auto_provider(CPU, providers.discover(CPU))]
    assert options.compile_budget_s == 0 and not options.count_launches
    assert any("--full" in note for note in notes)
    assert "llama2-7b" not in options.suites  # its smallest real-shaped variant is one 7B layer


def test_automatic_provider_is_the_backend_fusedclip_picks():
    import fusedclip
    from fusedclip import engine

    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    picked = engine.prepare([param.grad], None).backend_names[0]
    assert cli.auto_provider(CPU, providers.discover(CPU)) == f"fusedclip-{picked}"
    assert fusedclip.available_backends(CPU)[picked] is True


def test_full_run_is_the_complete_sweep_with_torch_compile_and_no_time_budget():
    options, _ = _options("--full")
    assert options.suites == list(SUITES) and options.dtypes == list(DTYPES)
    assert options.budget_bytes == cli.FULL_CPU_BUDGET_MB << 20
    assert options.time_budget_s is None and options.count_launches
    assert options.compile_budget_s == cli.CPU_COMPILE_BUDGET_S
    names = [p.name for p in options.providers]
    assert names[0] == "torch" and "torch-loop" in names and "fusedclip-torch" in names


def test_time_budget_zero_means_none():
    options, _ = _options("--time-budget", "0")
    assert options.time_budget_s is None


def test_max_mb_zero_means_no_budget():
    options, _ = _options("--max-mb", "0")
    assert options.budget_bytes is None


# -- end to end on a tiny set ---------------------------------------------------------------------


def test_run_writes_markdown_json_and_csv_with_consistent_numbers(capsys, tmp_path, tiny_suite, small_copy):
    json_path, csv_path = tmp_path / "out.json", tmp_path / "out.csv"
    code, out, err = run_cli(
        capsys,
        "--device", "cpu", "--suite", tiny_suite, "--dtype", "fp32,mix", "--provider", "fusedclip-torch,torch-loop",
        "--reps", "3", "--no-progress", "--json", str(json_path), "--csv", str(csv_path), "--full", "--no-files",
    )  # fmt: skip
    assert code == 0, err

    data = json.loads(json_path.read_text())
    assert data["schema"] == SCHEMA
    meta = data["meta"]
    for key in ("device", "device_name", "torch", "fusedclip", "command", "copy", "timing", "providers", "notes"):
        assert key in meta
    assert meta["launches_counted"] == "torch ops"
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 3  # dtypes x cases x providers (torch added as the baseline)
    assert {r["provider"] for r in rows} == {"torch", "torch-loop", "fusedclip-torch"}
    copy_gbps = meta["copy"]["gbps"]
    for row in rows:
        assert set(row) == set(ROW_FIELDS)
        assert row["status"] == "ok" and row["reps"] == 3 and row["tensors"] == len(TINY_SHAPES)
        expected_n = DTYPES[row["dtype"]].nbytes(Variant(TINY_SHAPES, "full"))
        assert row["grad_bytes"] == expected_n
        assert row["bytes_moved"] == (3 if row["case"] == "clipped" else 1) * expected_n
        # bandwidth from the median wall time on a CPU, share of the run's copy bandwidth
        assert row["gbps"] == pytest.approx(row["bytes_moved"] / (row["wall_ms"] / 1e3) / 1e9)
        assert row["copy_share"] == pytest.approx(row["gbps"] / copy_gbps)
        assert row["device_ms"] is None and row["cpu_ms"] >= 0
        assert row["launches"] >= 1
        assert 0 <= row["norm_rel_err"] < 1e-2
    by_key = {(r["dtype"], r["case"], r["provider"]): r for r in rows}
    for (dtype, case, _), row in by_key.items():
        baseline = by_key[(dtype, case, "torch")]
        assert row["speedup"] == pytest.approx(baseline["wall_ms"] / row["wall_ms"])

    with csv_path.open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert list(csv_rows[0]) == list(ROW_FIELDS) and len(csv_rows) == len(rows)

    assert "| dtype | scale | case | provider | wall ms |" in out
    assert "## Speedup over `torch`" in out
    assert out.count("`fusedclip-torch`") >= 4
    assert "Traceback" not in err


def test_default_run_writes_report_data_and_chart_to_the_results_folder(
    capsys, tmp_path, monkeypatch, tiny_suite, small_copy
):
    monkeypatch.setattr(cli, "DEFAULT_SUITES", [tiny_suite])
    code, out, err = run_cli(capsys, "--device", "cpu", "--no-progress")
    assert code == 0, err
    folder = tmp_path / cli.DEFAULT_OUT  # relative to the working directory
    data = json.loads((folder / "cpu.json").read_text())
    meta = data["meta"]
    assert meta["options"]["full"] is False and meta["options"]["time_budget_s"] == cli.DEFAULT_TIME_BUDGET_S
    assert {r["dtype"] for r in data["rows"]} == set(cli.DEFAULT_DTYPES)
    assert {r["provider"] for r in data["rows"]} == {"torch", meta["fusedclip_provider"]}
    assert all(r["status"] == "ok" and r["reps"] >= 3 and r["launches"] is None for r in data["rows"])
    assert meta["providers"]["torch-compile"]["available"].startswith("off: its compile budget is 0")
    assert meta["providers"]["torch-loop"]["available"].startswith("not in the default run")
    assert set(meta["load"]) >= {"cpus", "other_cpus", "busy", "load_average_start"}
    # the terminal: the headline first, then the speedup table, then where the files are
    first = out.splitlines()[2]
    assert first.startswith("On ") and "`torch.nn.utils.clip_grad_norm_`" in first and "when clipping" in first
    assert ("The machine was quiet" in first) != ("The machine was busy" in first)
    assert "| set | tensors |" in out and "## Details" not in out
    for name in ("cpu.md", "cpu.json", "cpu.png"):
        assert str(Path(cli.DEFAULT_OUT) / name) in out
    markdown = (folder / "cpu.md").read_text()
    assert markdown.splitlines()[4] == first  # the report opens with the same headline
    assert "## Details" in markdown and "- `torch-loop`: not in the default run" in markdown
    if (folder / "cpu.png").exists():  # matplotlib installed
        assert (folder / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_run_files_are_named_apart_from_the_default_run(capsys, tmp_path, monkeypatch, tiny_suite, small_copy):
    monkeypatch.setattr(cli, "matplotlib_missing", lambda: "no chart in this test")
    code, out, err = run_cli(
        capsys, "--device", "cpu", "--full", "--suite", tiny_suite, "--dtype", "fp32", "--provider", "torch",
        "--reps", "1", "--no-progress", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["cpu-full.json", "cpu-full.md"]
    assert "not written: no chart in this test" in out


def test_a_spent_time_budget_skips_sets_with_the_reason(tiny_suite, monkeypatch):
    monkeypatch.setitem(SUITES, "tiny2", Suite("tiny2", "another", lambda: [Variant(TINY_SHAPES[:3], "full")]))
    baseline = providers.discover(CPU)[0]
    run = _runner([baseline], suites=["tiny", "tiny2"], dtypes=["fp32", "bf16"], reps=None, time_budget_s=1e-9)
    rows = run.run().rows
    assert len(rows) == 2 * 2 * 2
    # the first set is always measured, in both cases (every set in fp32 comes before bf16)
    assert all(r.ok for r in rows if (r.set, r.dtype) == ("tiny", "fp32"))
    skipped = [r for r in rows if (r.set, r.dtype) != ("tiny", "fp32")]
    assert all(r.status == "skipped" and "time budget" in r.reason for r in skipped)
    markdown = render_markdown(Results(_tiny_results().meta, rows))
    assert "Not measured for lack of time: tiny bf16, tiny2 fp32 and tiny2 bf16" in markdown


def test_save_writes_the_committed_files_with_the_regenerate_command(
    capsys, tmp_path, monkeypatch, tiny_suite, small_copy
):
    monkeypatch.setattr(cli, "matplotlib_missing", lambda: "no chart in this test")  # charts: test_chart_is_a_png
    code, _, err = run_cli(
        capsys, "--device", "cpu", "--suite", tiny_suite, "--dtype", "bf16", "--provider", "torch", "--reps", "2",
        "--no-progress", "--save", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    markdown = (tmp_path / "cpu.md").read_text()
    assert markdown.startswith("<!-- Regenerate: python -m fusedclip.bench --device cpu --suite tiny")
    assert json.loads((tmp_path / "cpu.json").read_text())["meta"]["device_slug"] == "cpu"


def test_missing_matplotlib_is_a_note_not_a_crash(capsys, tmp_path, monkeypatch, tiny_suite, small_copy):
    monkeypatch.setattr(cli, "matplotlib_missing", lambda: "matplotlib is not installed: no chart written")
    code, out, err = run_cli(
        capsys, "--device", "cpu", "--suite", tiny_suite, "--dtype", "fp32", "--provider", "torch", "--reps", "1",
        "--no-progress", "--png", str(tmp_path / "chart.png"),
    )  # fmt: skip
    assert code == 0
    assert "matplotlib is not installed" in err and "chart:        not written: matplotlib is not installed" in out
    assert not (tmp_path / "chart.png").exists()
    assert not list((tmp_path / cli.DEFAULT_OUT).glob("*.png"))


def test_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fusedclip.bench.chart import write_chart

    results = _tiny_results()
    write_chart(results, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the runner's handling of failures and of the compile budget ----------------------------------


def _eager(max_norm: float):
    return lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm)


def _runner(provider_list, **overrides) -> runner.Runner:
    options = runner.Options(suites=["tiny"], dtypes=["fp32"], providers=provider_list, budget_bytes=None, reps=2)
    for key, value in overrides.items():
        setattr(options, key, value)
    return runner.Runner(options, describe(CPU), copy_gbps=10.0)


def test_a_failing_provider_is_a_row_not_a_crash(tiny_suite):
    def broken(max_norm):
        def clip(params):
            raise RuntimeError("kernel exploded\nsecond line")

        return clip

    baseline = providers.discover(CPU)[0]
    run = _runner([baseline, providers.Provider("broken", "always fails", broken)]).run()
    failed = [r for r in run.rows if r.provider == "broken"]
    assert len(failed) == 2 and all(r.status == "failed" for r in failed)
    assert failed[0].reason == "RuntimeError: kernel exploded"
    assert all(r.ok for r in run.rows if r.provider == "torch")


def test_compile_budget_and_tensor_cap_skip_with_reasons(tiny_suite, monkeypatch):
    monkeypatch.setitem(SUITES, "tiny2", Suite("tiny2", "another", lambda: [Variant(TINY_SHAPES[:3], "full")]))
    baseline = providers.discover(CPU)[0]
    binds = []

    def counting_bind(max_norm):
        binds.append(max_norm)
        return _eager(max_norm)

    compiling = providers.Provider("torch-compile", "pretend compile", counting_bind, compiles=True)
    run = _runner([baseline, compiling], suites=["tiny", "tiny2"], compile_budget_s=1e-9).run()
    rows = {(r.set, r.case): r for r in run.rows if r.provider == "torch-compile"}
    # sets run from the fewest tensors: tiny2 compiles once for both cases, then the budget is spent
    assert binds == [MAX_NORM]
    assert rows[("tiny2", "clipped")].ok and rows[("tiny2", "unclipped")].ok
    assert rows[("tiny2", "clipped")].compile_s == rows[("tiny2", "unclipped")].compile_s > 0
    assert rows[("tiny", "clipped")].status == "skipped" and "budget" in rows[("tiny", "clipped")].reason
    assert [r.set for r in run.rows][0] == "tiny"  # rows come back in report order
    run = _runner([baseline, compiling], compile_budget_s=100.0, compile_max_tensors=2).run()
    capped = [r for r in run.rows if r.provider == "torch-compile"]
    assert all(r.status == "skipped" and "--compile-max-tensors 2" in r.reason for r in capped)


def test_clipped_calls_clip_every_time(tiny_suite):
    seen = []

    def recording(max_norm):
        def clip(params):
            grads = [p.grad for p in params]
            seen.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        return clip

    baseline = providers.discover(CPU)[0]
    run = _runner([baseline, providers.Provider("recording", "records", recording)], reps=4).run()
    # every call saw the base grads (unclipped case) or the base grads x4 (clipped case), never a
    # set clipped by an earlier call (norm MAX_NORM)
    clipped = [norm for norm in seen if norm == pytest.approx(BASE_NORM * CLIPPED_SCALE, rel=0.01)]
    unclipped = [norm for norm in seen if norm == pytest.approx(BASE_NORM, rel=0.01)]
    assert len(clipped) + len(unclipped) == len(seen)
    assert len(clipped) == len(unclipped) == 1 + 2 + 4  # warm-up, a call then the profiled one, rounds
    errors = {r.case: r.norm_rel_err for r in run.rows if r.provider == "recording"}
    assert errors["clipped"] < 1e-6 and errors["unclipped"] < 1e-6  # fp32 grads, fp64 reference


def test_single_tensor_mix_is_noted_not_measured(monkeypatch):
    monkeypatch.setitem(SUITES, "one", Suite("one", "one tensor", lambda: [Variant(((16,),), "full")]))
    baseline = providers.discover(CPU)[0]
    run = _runner([baseline], suites=["one"], dtypes=["mix"]).run()
    assert run.rows == [] and any("cannot mix" in note for note in run.notes)


# -- results and report ------------------------------------------------------------------------------


def _tiny_results() -> Results:
    meta = {
        "device": "cpu",
        "device_name": "test cpu",
        "torch": torch.__version__,
        "fusedclip": "0",
        "python": "3",
        "started": "now",
        "duration_s": 1.0,
        "command": "python -m fusedclip.bench",
        "copy": {"buffer_bytes": 1 << 20, "gbps": 10.0},
        "timing": "test",
        "bandwidth_time": "wall",
        "launches_counted": "torch ops",
        "launches_note": "test",
        "providers": {"torch": {"label": "t", "available": True}, "x": {"label": "x", "available": True}},
        "notes": ["a note"],
    }
    rows = []
    for case in ("clipped", "unclipped"):
        for provider, wall in (("torch", 2.0), ("x", 1.0)):
            rows.append(
                Row("tiny", "full", 4, 28, "fp32", case, provider, wall_ms=wall, gbps=1.0, copy_share=0.1,
                    launches=3, speedup=2.0 / wall, norm_rel_err=math.inf if provider == "x" else 1e-7, reps=2)
            )  # fmt: skip
    rows.append(Row("tiny", "full", 4, 28, "bf16", "clipped", "x", status="skipped", reason="because"))
    return Results(meta, rows)


def test_json_round_trip_keeps_non_finite_values_as_strings():
    results = _tiny_results()
    text = results.to_json()
    assert '"inf"' in text
    again = Results.from_dict(json.loads(text))
    assert again.rows == results.rows and again.meta == results.meta
    with pytest.raises(ValueError):
        Results.from_dict({"schema": "other", "meta": {}, "rows": []})


def test_csv_has_one_line_per_row():
    lines = list(csv.reader(io.StringIO(_tiny_results().to_csv())))
    assert tuple(lines[0]) == ROW_FIELDS and len(lines) == 1 + 5


def test_markdown_lists_skipped_rows_and_notes():
    markdown = render_markdown(_tiny_results(), regenerate="python -m fusedclip.bench --save x")
    assert markdown.startswith("<!-- Regenerate: python -m fusedclip.bench --save x -->")
    assert "| tiny | 4 | full | fp32 | 2.00 / 2.00 | 2.00× / 2.00× |" in markdown
    assert "- `x` (bf16 clipped): skipped: because" in markdown
    assert "- a note" in markdown


def test_number_formatting():
    assert fmt_number(1234.5) == "1234" or fmt_number(1234.5) == "1235"
    assert fmt_number(12.345) == "12.3"
    assert fmt_number(0.012345) == "0.0123"
    assert fmt_number(None) == "—"


def test_progress_falls_back_without_rich(monkeypatch):
    import builtins

    from fusedclip.bench import progress

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name.startswith(("rich", "tqdm")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    display, note = progress.make_progress(True)
    assert isinstance(display, progress.PlainProgress) and "rich is not installed" in note
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    display, note = progress.make_progress(True)  # a log file gets lines, not a redrawn bar
    assert isinstance(display, progress.PlainProgress) and note is None


def test_environment_reports_a_cache_and_memory():
    info = describe(CPU)
    assert info.slug == "cpu" and info.cache_bytes > 0 and info.memory_bytes > 0
    assert os.cpu_count() is None or info.threads >= 1


def test_launch_counts_match_between_cases_and_quick_reuses_them(tiny_suite, monkeypatch):
    known = {p.name: p for p in providers.discover(CPU)}
    chosen = [known["torch"], known["torch-loop"], known["fusedclip-torch"]]
    run = _runner(chosen).run()
    counts = {(r.case, r.provider): r.launches for r in run.rows}
    for provider in ("torch", "torch-loop"):  # torch scales whether or not it must
        assert counts[("clipped", provider)] == counts[("unclipped", provider)] >= 1
    # a backend may skip the scale pass when it knows on the host that the coefficient is 1
    assert counts[("clipped", "fusedclip-torch")] >= counts[("unclipped", "fusedclip-torch")] >= 1

    profiled = []
    real_count = runner.count_launches
    monkeypatch.setattr(runner, "count_launches", lambda fn, device: profiled.append(1) or real_count(fn, device))
    run = _runner(chosen, launches_every_case=False).run()
    assert len(profiled) == len(chosen)  # once per provider, on the clipped call
    reused = {(r.case, r.provider): r.launches for r in run.rows}
    assert all(reused[(case, p)] == counts[("clipped", p)] for case, p in reused)


@pytest.mark.gpu
def test_cuda_run_reports_device_time_and_kernels(capsys, tmp_path, tiny_suite, small_copy):
    code, out, err = run_cli(
        capsys, "--device", "cuda", "--suite", tiny_suite, "--dtype", "bf16", "--provider", "fusedclip",
        "--reps", "3", "--no-progress", "--compile-budget", "0", "--json", str(tmp_path / "g.json"),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["meta"]["launches_counted"] == "CUDA kernels"
    assert data["meta"]["bandwidth_time"].startswith("device")
    for row in data["rows"]:
        assert row["status"] == "ok" and row["device_ms"] > 0 and row["launches"] >= 1
        assert row["gbps"] == pytest.approx(row["bytes_moved"] / (row["device_ms"] / 1e3) / 1e9)
    assert "| device ms |" in out


def test_busy_machine_is_flagged_and_gets_fewer_threads():
    from fusedclip.bench import load

    assert load.busy_threshold(2) == 0.5 and load.busy_threshold(64) == 16
    quiet = load.LoadReading(cpus=2, load_average_start=0.2, load_average_end=1.9, other_cpus=0.1, busy=False)
    busy = load.LoadReading(cpus=2, load_average_start=3.0, load_average_end=3.5, other_cpus=1.4, busy=True)
    assert quiet.describe.startswith("The machine was quiet: other processes used 0.1 of 2 CPUs")
    assert busy.describe.startswith("**The machine was busy**: other processes used 1.4 of 2 CPUs")
    assert load.reading_from_dict(busy.to_dict()) == busy
    assert load.threads_for(2, 0.1, 2) == 2 and load.threads_for(2, None, 2) == 2
    assert load.threads_for(2, 1.4, 2) == 1 and load.threads_for(2, 2.0, 2) == 1
    assert load.threads_for(16, 6.0, 16) == 10
    reading = load.LoadMeter().read()  # measurable here or not, it gives a sentence
    assert reading.cpus >= 1 and reading.describe


def test_headline_reports_speedups_sets_and_load():
    results = _tiny_results()
    results.meta["fusedclip_provider"] = "x"
    results.meta["load"] = {"cpus": 2, "load_average_start": 3.0, "load_average_end": 3.0, "other_cpus": 1.4,
                            "busy": True}  # fmt: skip
    text = report.headline(results)
    assert "**speedup 2.00× when clipping**" in text and "**speedup 2.00× when the norm is under `max_norm`**" in text
    assert "The machine was busy" in text and "in fp32" in text


def test_console_script_and_module_share_the_entry_point():
    from pathlib import Path

    from fusedclip.bench import __main__ as entry

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'fusedclip-bench = "fusedclip.bench.__main__:main"' in pyproject
    assert entry.main is cli.main
