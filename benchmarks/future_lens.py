"""The future lens of one checkpoint (`lab/future_lens.py`: linear probes from the hidden state at t to the token
at t + k, Pal et al. 2023), printed as a table with the floor of always guessing the most frequent token.

    python -m benchmarks.future_lens --ckpt_path runs/zoo_code/ntp/seed0/checkpoints/last.ckpt [--max_k 8]
        [--train_windows 64] [--val_windows 16] [--epochs 8] [--json F]
"""
from __future__ import annotations

import time

from benchmarks.common import parser, report
from lab.future_lens import future_lens


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--max_k", type=int, default=8)
    p.add_argument("--train_windows", type=int, default=64)
    p.add_argument("--val_windows", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    results = future_lens(args.ckpt_path, args.max_k, args.train_windows, args.val_windows, args.epochs, args.seed)
    rows = [{"k": k, "probe accuracy": r["accuracy"], "most frequent token": r["floor"]} for k, r in results.items()]
    report(rows, f"future lens of {args.ckpt_path}: held-out accuracy of a linear probe h_t -> x_(t+k) "
                 f"({args.train_windows} train / {args.val_windows} val windows, {args.epochs} epochs, "
                 f"{time.perf_counter() - start:.0f} s)", args.json)


if __name__ == "__main__":
    main()
