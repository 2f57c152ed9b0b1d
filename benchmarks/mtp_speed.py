"""Training step time of multi-token prediction (n=4) over next-token prediction at equal parameter count,
alternating in one process.

    python -m benchmarks.mtp_speed [--layers 8] [--rounds 3] [--steps 5] [--json out.json]

NTP has `layers` trunk blocks; MTP moves n-1 of them into heads 2..n (`match_params`). Goal: ratio <= 1.10.
"""
from __future__ import annotations

import statistics

import torch
from torch.utils.data import DataLoader

from benchmarks.common import RandomTokens, attach_trainer_for_optimizers, bare_seconds_per_step, parser, report
from models import Transformer
from objectives import MultiTokenPrediction, NextTokenPrediction
from objectives.training.callbacks import auto_precision


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = auto_precision()

    def trunk():
        return Transformer(d_model=args.d_model, n_layers=args.layers, n_heads=4, max_seq_len=args.seq_len)

    models = {"NTP": NextTokenPrediction(trunk(), vocab_size=args.vocab),
              "MTP n=4 (per-head backward)": MultiTokenPrediction(trunk(), vocab_size=args.vocab, n_future=4,
                                                                  match_params=True)}
    loader = DataLoader(RandomTokens(args.vocab, args.seq_len + 1), batch_size=args.batch)
    seconds = {name: [] for name in models}
    for model in models.values():
        model.to(device)
        attach_trainer_for_optimizers(model, total_steps=10_000)
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds[name].append(bare_seconds_per_step(model, loader, args.steps, precision))
    ntp = statistics.median(seconds["NTP"])
    rows = [{"objective": name, "params M": sum(p.numel() for p in models[name].parameters()) / 1e6,
             "s/step": statistics.median(s), "x NTP": statistics.median(s) / ntp} for name, s in seconds.items()]
    report(rows, f"training step time at equal parameters ({device}, {precision}, {args.layers} layers, d_model "
                 f"{args.d_model}, V {args.vocab}, batch {args.batch} x {args.seq_len})", args.json)


if __name__ == "__main__":
    main()
