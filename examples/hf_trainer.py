"""Train a tiny GPT-2 with the Hugging Face Trainer, clipping with a fusedclip.Clipper.

    python examples/hf_trainer.py [--mode zclip] [--steps 20]

The model is built from a config (no download) and trained on random tokens on the CPU in a few
seconds. ``attach`` routes the Trainer's own clipping call through the Clipper, so the
``grad_norm`` the Trainer logs is the Clipper's, and adds the Clipper's statistics (``clip/...``)
to every training log: they reach ``state.log_history`` and every ``report_to`` integration.
Needs ``pip install "fusedclip[integrations]"``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from fusedclip.integrations.transformers import attach


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="zclip", choices=["norm", "autoclip", "zclip", "agc"])
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args(argv)

    set_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (64, 16), generator=gen)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=options.steps,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            max_grad_norm=1.0,  # the Clipper's max_norm (mode "norm"; "zclip" during its warm-up)
            logging_steps=max(1, options.steps // 4),
            report_to="none",  # or "tensorboard", "wandb"...: the clip/ statistics go there too
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        callback = attach(trainer, options.mode, warmup_steps=5)  # any fusedclip.Clipper keyword
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    print(f"{'step':>4} {'loss':>7} {'grad_norm':>9} {'threshold':>9} {'clipped':>7}")
    for entry in logs:
        print(
            f"{entry['step']:>4} {entry['loss']:7.4f} {entry['grad_norm']:9.4f} {entry['clip/threshold']:9.4f}"
            f" {entry['clip/clipped_fraction']:7.0%}"
        )
    print("summary:", callback.clipper.summary())
    return logs


if __name__ == "__main__":
    main()
