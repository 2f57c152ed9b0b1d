"""Lightning Trainer against a bare PyTorch loop: the same model, data and step, alternating in one process.

    python -m benchmarks.overhead [--rounds 3] [--steps 10] [--json out.json]

The Trainer runs as the CLI does (TensorBoard logging, the throughput callback, gradient clipping, the
hardware's precision); the bare loop does the same arithmetic by hand. Goal: ratio >= 0.95.
"""
from __future__ import annotations

import statistics
import tempfile

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.common import attach_trainer_for_optimizers, bare_seconds_per_step, lightning_seconds_per_step, parser, report
from datamodules import TextDataModule
from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.callbacks import Throughput, auto_precision


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default=auto_precision())
    args = p.parse_args()

    torch.manual_seed(0)
    data = TextDataModule(seq_len=256, batch_size=16)
    model = NextTokenPrediction(Transformer(d_model=256, n_layers=4, n_heads=4, max_seq_len=512),
                                vocab_size=data.vocab_size, bytes_per_token=data.bytes_per_token)
    attach_trainer_for_optimizers(model, total_steps=10_000)
    loader = data.train_dataloader()
    lightning, bare = [], []
    with tempfile.TemporaryDirectory() as logs:
        for _ in range(args.rounds):
            lightning.append(lightning_seconds_per_step(model, loader, args.steps, args.precision,
                                                        callbacks=[Throughput()], logger=TensorBoardLogger(logs)))
            bare.append(bare_seconds_per_step(model, loader, args.steps, args.precision))
    rows = [{"loop": "Lightning Trainer", "steps/s": 1 / statistics.median(lightning)},
            {"loop": "bare PyTorch", "steps/s": 1 / statistics.median(bare)}]
    ratio = statistics.median(bare) / statistics.median(lightning)
    report(rows, f"Trainer overhead ({args.precision}, {args.rounds} alternating rounds of {args.steps} steps, "
                 f"batch 16 x 256 tokens)", args.json, ratio=ratio, precision=args.precision)
    print(f"Lightning/bare ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
