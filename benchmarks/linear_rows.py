"""The products of decoding on a CPU: F.linear against weight @ x^T (and `models.layers.linear`, which picks between
them) for a few rows, on the quickstart trunk's 16 weight matrices and its 4096 x 256 unembedding, read cold.

    python -m benchmarks.linear_rows [--rows 1 2 4 8 12 16] [--dtype float32] [--json PATH]

A decoding step multiplies each weight by the 1 to 16 rows of its fed tokens; the weights do not stay in the caches
between layers, so every case cycles over copies that together exceed them (the trunk's 16 matrices, 4 copies of
the unembedding). One thread; the cases alternate, best of `--repeats` rounds of `--calls` calls each.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import parser, report
from models.layers import linear

TRUNK = [(768, 256), (256, 256), (1408, 256), (256, 704)] * 4  # qkv, out, gate_up, down of 4 blocks (d256)


FORMS = {"F.linear": lambda x, w: F.linear(x, w),
         "weight @ x^T": lambda x, w: torch.mm(w, x.t()).t().contiguous(),
         "models.layers.linear": lambda x, w: linear(x, w)}


def measure(weights: list[torch.Tensor], rows: int, form, calls: int, repeats: int) -> float:
    """Milliseconds of one pass over `weights` (each times its own input of `rows` rows)."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            for w in weights:
                form(inputs[w.shape[1]], w)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    sets = {"trunk, 16 matrices": [torch.randn(n, k, dtype=dtype) for n, k in TRUNK],
            "unembedding 4096 x 256": [torch.randn(4096, 256, dtype=dtype) for _ in range(4)]}
    rows = []
    with torch.no_grad():
        for name, weights in sets.items():
            per_pass = 1 if name.startswith("trunk") else len(weights)  # the unembedding: one of its copies
            for count in args.rows:
                times = {label: [] for label in FORMS}
                for _ in range(2):  # alternate the forms, twice
                    for label, form in FORMS.items():
                        times[label].append(measure(weights, count, form, args.calls, args.repeats) / per_pass)
                rows.append({"weights": name, "rows": count, "dtype": args.dtype,
                             **{f"{label} (ms)": min(t) for label, t in times.items()}})
    report(rows, f"a pass of products at each row count, {args.dtype}, 1 thread (best of rounds)", args.json)
    return rows


if __name__ == "__main__":
    main()
