"""Training tokens/s of the quickstart model in fp32 and in bf16 autocast on this machine, alternating in one
process (bare loop, so only the arithmetic differs).

    python -m benchmarks.precision [--rounds 3] [--steps 6] [--json out.json]
"""
from __future__ import annotations

import statistics

import torch
from torch.utils.data import DataLoader

from benchmarks.common import RandomTokens, attach_trainer_for_optimizers, bare_seconds_per_step, parser, report
from models import Transformer
from objectives import NextTokenPrediction

BATCH, SEQ_LEN, VOCAB = 16, 256, 4096


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=256, n_layers=4, n_heads=4, max_seq_len=512), vocab_size=VOCAB)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    attach_trainer_for_optimizers(model, total_steps=10_000)
    loader = DataLoader(RandomTokens(VOCAB, SEQ_LEN + 1), batch_size=BATCH)
    seconds = {"32-true": [], "bf16-mixed": []}
    for _ in range(args.rounds):
        for precision in seconds:
            seconds[precision].append(bare_seconds_per_step(model, loader, args.steps, precision))
    rows = [{"precision": p, "tokens/s": BATCH * SEQ_LEN / statistics.median(s)} for p, s in seconds.items()]
    rows.append({"precision": "bf16 / fp32", "tokens/s": statistics.median(seconds["32-true"]) / statistics.median(seconds["bf16-mixed"])})
    report(rows, f"quickstart model training throughput by precision ({device}, batch {BATCH} x {SEQ_LEN})", args.json)


if __name__ == "__main__":
    main()
