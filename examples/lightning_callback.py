"""Train a tiny Lightning model, clipping with fusedclip's Lightning callback.

    python examples/lightning_callback.py [--mode autoclip] [--steps 40]

A two-layer regression model on random data, on the CPU in a few seconds. The callback clips in
``on_before_optimizer_step`` (leave ``gradient_clip_val`` unset) and logs ``grad_norm`` and the
Clipper's statistics (``clip/...``) through ``self.log``: any Lightning logger receives them; this
example writes them with a CSVLogger and prints the last rows. Needs
``pip install "fusedclip[integrations]"``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from fusedclip.integrations.lightning import FusedClipCallback


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="autoclip", choices=["norm", "autoclip", "zclip", "agc"])
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x.sum(dim=1) * 5 + torch.randn(256, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    callback = FusedClipCallback(options.mode, max_norm=1.0)
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(
            max_steps=options.steps,
            accelerator="cpu",
            devices=1,
            callbacks=[callback],  # no gradient_clip_val: the callback clips
            logger=CSVLogger(out, name="fusedclip"),
            log_every_n_steps=max(1, options.steps // 8),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Regression(), loader)
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
            rows = [row for row in csv.DictReader(file) if row.get("grad_norm")]
    for row in rows[-3:]:
        print({key: value for key, value in row.items() if value})
    print("summary:", callback.clipper.summary())
    return rows


if __name__ == "__main__":
    main()
