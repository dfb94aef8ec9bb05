"""A plain Accelerate training loop whose ``accelerator.clip_grad_norm_`` runs a fusedclip.Clipper.

    python examples/accelerate_loop.py [--mode zclip] [--steps 30]

``route(accelerator, clipper)`` makes the loop's usual ``accelerator.clip_grad_norm_(...)`` call
unscale the grads (under fp16 mixed precision) and run the Clipper; ``accelerator.log`` sends its
statistics to the accelerator's trackers (none here, so they are also printed). For the stateless
drop-in see ``fusedclip.integrations.accelerate.clip_grad_norm_``. Needs
``pip install "fusedclip[integrations]"``.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import fusedclip
from fusedclip.integrations import accelerate as fc


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="zclip", choices=["norm", "autoclip", "zclip", "agc"])
    parser.add_argument("--steps", type=int, default=30)
    options = parser.parse_args(argv)

    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = x.sum(dim=1) * 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    clipper = fusedclip.Clipper(model.named_parameters(), options.mode, max_norm=1.0, warmup_steps=5)
    fc.route(accelerator, clipper)
    stats: dict[str, float] = {}
    for step, (inputs, targets) in zip(range(options.steps), loader):
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(inputs).squeeze(-1), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # once per optimizer step, as usual
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # runs the Clipper
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and clipper.steps % 5 == 0:
            stats = fc.statistics(clipper)
            accelerator.log(stats, step=step)
            print(f"step {step:>3} loss {loss.item():8.4f} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    print("summary:", clipper.summary())
    return stats


if __name__ == "__main__":
    main()
