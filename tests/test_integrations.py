"""Framework integrations against each framework's own clipping: Accelerate, the Hugging Face
Trainer and Lightning, each training a tiny model built from code (no downloads) for a few steps.

With ``mode="norm"`` the norms the framework logs must agree with its own clipping's within
fusedclip's accuracy contract (the total is accumulated in float64 and rounded once, never farther
from the exact norm than torch's float32 per-tensor sum: a few float32 ulps apart at most), and
the parameters after the steps must agree to float32 rounding. SGD is used for the parameter
comparison: Adam turns the last-bit differences of near-zero grads (a GPT-2 key bias has an
exactly-zero true gradient) into visible parameter differences, which says nothing about clipping.
Each test skips when its framework is not installed (``pip install -e ".[test]"`` installs them).
"""

from __future__ import annotations

import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedclip

ROOT = Path(__file__).resolve().parents[1]
NORM_RTOL = 1e-6  # about 8 float32 ulps: torch's rounding error plus fusedclip's half ulp
PARAM_ATOL = 1e-6
LIGHTNING_MISSING = "lightning is not installed (pip install -e '.[integrations]')"


def assert_params_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=PARAM_ATOL, msg=lambda m: f"{name}: {m}")


def test_core_never_imports_a_framework():
    code = (
        "import sys, fusedclip, fusedclip.integrations\n"
        "loaded = {'transformers', 'accelerate', 'lightning', 'pytorch_lightning'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# -- Accelerate ---------------------------------------------------------------------------------
def _accelerate_run(clip, *, steps: int = 5, fp16_scaler: bool = False):
    """Train a small model with ``clip(accelerator, model)`` as the clipping call; returns (model, norms)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    accelerator = Accelerator(cpu=True)
    if fp16_scaler:  # Accelerate makes a GradScaler only for fp16 on accelerators; give it a CPU one
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        accelerator.native_amp = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen) * 10
        accelerator.backward(torch.nn.functional.mse_loss(model(x).squeeze(-1), y))
        norms.append(float(clip(accelerator, model)))
        optimizer.step()
        optimizer.zero_grad()
    return accelerator.unwrap_model(model), norms


def _routed(mode: str, **kwargs):
    from fusedclip.integrations import accelerate as fc

    def clip(accelerator, model):
        if fc.routed_clipper(accelerator) is None:
            fc.route(accelerator, fusedclip.Clipper(model.named_parameters(), mode, **kwargs))
        return accelerator.clip_grad_norm_(model.parameters(), 123.0)  # the Clipper's threshold applies

    return clip


@pytest.mark.parametrize("fp16_scaler", [False, True], ids=["fp32", "fp16-scaler"])
def test_accelerate_matches_accelerator_clip_grad_norm(monkeypatch, fp16_scaler):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[integrations]')")
    from accelerate import Accelerator

    from fusedclip.integrations import accelerate as fc

    if fp16_scaler:  # makes unscale_gradients() unscale, as under fp16 mixed precision
        monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    reference, ref_norms = _accelerate_run(
        lambda acc, m: acc.clip_grad_norm_(m.parameters(), 0.5), fp16_scaler=fp16_scaler
    )
    stateless, norms = _accelerate_run(
        lambda acc, m: fc.clip_grad_norm_(acc, m.parameters(), 0.5), fp16_scaler=fp16_scaler
    )
    routed, routed_norms = _accelerate_run(_routed("norm", max_norm=0.5), fp16_scaler=fp16_scaler)
    assert min(ref_norms) > 0.5  # every step clipped
    assert max(ref_norms) < 1e3  # unscaled norms (the scale is 4096)
    for got in (norms, routed_norms):
        assert got == pytest.approx(ref_norms, rel=NORM_RTOL)
    assert_params_close(reference, stateless)
    assert_params_close(reference, routed)


def test_accelerate_route_statistics_and_unroute():
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[integrations]')")
    from accelerate import Accelerator

    from fusedclip.integrations import accelerate as fc

    _, norms = _accelerate_run(_routed("autoclip", percentile=50), steps=4)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    clipper = fusedclip.Clipper(model.named_parameters(), "zclip")
    fc.route(accelerator, clipper)
    model(torch.randn(2, 4)).sum().backward()
    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
    stats = fc.statistics(clipper)
    expected = {"grad_norm", "clip/threshold", "clip/ema_norm", "clip/clipped_fraction", "clip/nonfinite_steps"}
    assert set(stats) == expected
    assert stats["grad_norm"] == pytest.approx(float(norm), rel=NORM_RTOL) and clipper.steps == 1
    fc.unroute(accelerator)
    assert fc.routed_clipper(accelerator) is None and "clip_grad_norm_" not in vars(accelerator)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    assert clipper.steps == 1  # Accelerate's own method again


# -- Hugging Face Trainer -----------------------------------------------------------------------
def _trainer_run(tmp_path: Path, attach_mode: str | None, **clipper_kwargs):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

    from fusedclip.integrations.transformers import attach

    class Reported(TrainerCallback):  # sees each log as the report_to integrations do
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    set_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 16), generator=gen)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    reported = Reported()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[reported])
    callback = attach(trainer, attach_mode, **clipper_kwargs) if attach_mode else None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    return model, logs, reported.logs, callback


def test_hf_trainer_norm_matches_trainer_clipping(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[integrations]')")
    reference, ref_logs, _, _ = _trainer_run(tmp_path, None)
    model, logs, reported, callback = _trainer_run(tmp_path, "norm")
    assert len(logs) == len(ref_logs) == 3 and callback.clipper.steps == 3  # one clip per optimizer step
    ref_norms = [entry["grad_norm"] for entry in ref_logs]
    assert min(ref_norms) > 0.5
    assert [entry["grad_norm"] for entry in logs] == pytest.approx(ref_norms, rel=NORM_RTOL)
    assert_params_close(reference, model)
    for entry in logs + [r for r in reported if "grad_norm" in r]:  # in log_history and what report_to gets
        assert entry["clip/threshold"] == 0.5 and entry["clip/clipped_fraction"] == 1.0
        assert entry["clip/nonfinite_steps"] == 0.0 and entry["clip/ema_norm"] > 0.5
    assert callback.clipper.summary()["last_norm"] == pytest.approx(ref_norms[-1], rel=NORM_RTOL)


def test_hf_trainer_adaptive_mode_logs_its_statistics(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[integrations]')")
    _, logs, _, callback = _trainer_run(tmp_path, "autoclip", percentile=50)
    norms = [entry["grad_norm"] for entry in logs]
    # AutoClip's threshold: the median of the norms so far (this one included)
    medians = [float(torch.tensor(norms[: i + 1], dtype=torch.float64).quantile(0.5)) for i in range(3)]
    assert [entry["clip/threshold"] for entry in logs] == pytest.approx(medians, rel=NORM_RTOL)
    assert callback.clipper.mode == "autoclip" and callback.clipper.steps == 3


# -- Lightning ----------------------------------------------------------------------------------
def _lightning_run(callbacks, gradient_clip_val=None, steps: int = 4):
    pl = pytest.importorskip("lightning.pytorch", reason=LIGHTNING_MISSING)

    class MemoryLogger(pl.loggers.Logger):
        name, version = "memory", 0

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, float]] = []

        def log_metrics(self, metrics, step=None):
            self.rows.append(dict(metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, generator=gen) * 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model, logger = Net(), MemoryLogger()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        gradient_clip_val=gradient_clip_val,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    return model, logger.rows


def test_lightning_norm_matches_gradient_clip_val():
    pl = pytest.importorskip("lightning.pytorch", reason=LIGHTNING_MISSING)
    from fusedclip.integrations.lightning import FusedClipCallback

    class Recorder(pl.Callback):  # runs before Lightning's own clipping: the norm it clips with
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters()]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    recorder = Recorder()
    reference, _ = _lightning_run([recorder], gradient_clip_val=0.5)
    callback = FusedClipCallback("norm", max_norm=0.5)
    model, rows = _lightning_run([callback])
    assert min(recorder.norms) > 0.5 and len(rows) == 4
    assert [row["grad_norm"] for row in rows] == pytest.approx(recorder.norms, rel=NORM_RTOL)
    assert all(row["clip/threshold"] == 0.5 and row["clip/clipped_fraction"] == 1.0 for row in rows)
    assert_params_close(reference, model)
    state = callback.state_dict()  # saved in Lightning checkpoints
    assert state["steps"] == 4
    fresh = FusedClipCallback("norm", max_norm=0.5)
    fresh.load_state_dict(state)
    _, rows = _lightning_run([fresh], steps=1)
    assert fresh.clipper.steps == 5 and rows[0]["clip/clipped_fraction"] == 1.0


def test_lightning_refuses_double_clipping_and_runs_adaptive_modes():
    pytest.importorskip("lightning.pytorch", reason=LIGHTNING_MISSING)
    from fusedclip.integrations.lightning import FusedClipCallback

    with pytest.raises(ValueError, match="gradient_clip_val"):
        _lightning_run([FusedClipCallback("norm")], gradient_clip_val=1.0)
    callback = FusedClipCallback("zclip", warmup_steps=2)
    _, rows = _lightning_run([callback])
    assert [row["clip/threshold"] for row in rows[:2]] == [1.0, 1.0]  # max_norm during the warm-up
    assert all(math.isfinite(row["clip/ema_norm"]) for row in rows) and callback.clipper.steps == 4


# -- the examples -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("example", "framework"),
    [
        ("accelerate_loop.py", "accelerate"),
        ("hf_trainer.py", "transformers"),
        ("lightning_callback.py", "lightning.pytorch"),
    ],
)
def test_example_runs(example, framework, monkeypatch, capsys):
    pytest.importorskip(framework, reason=f"{framework} is not installed (pip install -e '.[integrations]')")
    monkeypatch.setattr(sys, "argv", [example, "--steps", "3"])
    runpy.run_path(str(ROOT / "examples" / example), run_name="__main__")
    assert "summary: {'mode'" in capsys.readouterr().out
