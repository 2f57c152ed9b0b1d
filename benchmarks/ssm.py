"""The Mamba trunk's speed: the chunked selective scan and the Mamba block.

    python -m benchmarks.ssm [--parts a] [--repeats 5] [--threads N] [--json out.json]

(a) scan: forward of `models.mamba.selective_scan` (the chunked pure-PyTorch scan) against the step-by-step loop
    `selective_scan_reference` at L in {256, 1024, 4096}, d_inner 512, N 16, batch 2 (goal: >= 10x at L=1024
    on CPU); and one Mamba block's forward+backward at d_model 256, d_state 16, batch 2, L 1024 against
    `mambapy`'s block (its parallel scan; optional dependency: pip install mambapy), in the same process
    (goal: >= 2x its tokens/s).
Parts (b) training tokens/s and peak memory vs the transformer, (c) decode latency against context length and
(d) induction-heads length generalisation are to be added as further `part_*` functions in PARTS.

Timings are the best of `--repeats` runs after a warm-up, the compared implementations alternating, so that
other load on the machine disturbs both alike. On a machine whose cores other processes also use, pass
`--threads 1`: OpenMP threads competing for the same cores stall every small op (both the scan's and the
loop's), by up to 100x.
"""
from __future__ import annotations

import json
import time

import torch

from benchmarks.common import parser, table
from models.mamba import MambaBlock, selective_scan, selective_scan_reference


def best_of_alternating(fns: dict, repeats: int) -> dict:
    """{name: best seconds}, running the functions in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def scan_inputs(batch: int, dim: int, n: int, length: int, seed: int = 0) -> dict:
    """Inputs shaped as in a Mamba block: softplus(delta + bias) with dt around 0.001..0.1, S4D-real A."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, n, length, generator=g),
        C=torch.randn(batch, n, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.log(torch.expm1(torch.exp(torch.empty(dim).uniform_(-6.9, -2.3, generator=g)))),
        delta_softplus=True,
    )


def bench_scan(lengths=(256, 1024, 4096), batch: int = 2, dim: int = 512, n: int = 16, repeats: int = 5) -> list[dict]:
    """Forward of the chunked scan against the sequential loop, inputs (batch, dim, L) contiguous."""
    rows = []
    for length in lengths:
        kw = scan_inputs(batch, dim, n, length)
        with torch.no_grad():
            t = best_of_alternating({"chunked": lambda: selective_scan(**kw),
                                     "loop": lambda: selective_scan_reference(**kw)},
                                    repeats if length <= 1024 else max(2, repeats // 2))
        rows.append({"benchmark": "scan forward", "L": length, "chunked ms": 1e3 * t["chunked"],
                     "loop ms": 1e3 * t["loop"], "chunked tok/s": batch * length / t["chunked"],
                     "loop tok/s": batch * length / t["loop"], "speedup": t["loop"] / t["chunked"]})
    return rows


def _mambapy_block(d_model: int, d_state: int):
    try:
        from mambapy.mamba import MambaBlock as MambaPyBlock, MambaConfig
    except ImportError:
        return None
    return MambaPyBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state))


def bench_block(d_model: int = 256, d_state: int = 16, batch: int = 2, length: int = 1024,
                repeats: int = 5) -> list[dict]:
    """One Mamba block (mixer) forward+backward, fp32, against mambapy's block in the same process."""
    torch.manual_seed(0)
    ours = MambaBlock(d_model, d_state=d_state)
    x = torch.randn(batch, length, d_model)

    def step(block):
        def run():
            block.zero_grad(set_to_none=True)
            inp = x.clone().requires_grad_()
            block(inp).square().mean().backward()
        return run

    fns = {"ours": step(ours)}
    other = _mambapy_block(d_model, d_state)
    if other is not None:
        fns["mambapy"] = step(other)
    t = best_of_alternating(fns, repeats)
    tokens = batch * length
    rows = [{"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "models.mamba (chunked scan)",
             "ms": 1e3 * t["ours"], "tok/s": tokens / t["ours"]}]
    if other is None:
        rows.append({"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "mambapy not installed"})
    else:
        rows.append({"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "mambapy (pscan)",
                     "ms": 1e3 * t["mambapy"], "tok/s": tokens / t["mambapy"]})
        rows[0]["speedup"] = t["mambapy"] / t["ours"]
    return rows


def part_a(args) -> list[tuple[str, list[dict]]]:
    scan = bench_scan(repeats=args.repeats)
    block = bench_block(repeats=args.repeats)
    return [(f"(a) selective scan forward: chunked vs step-by-step loop (d_inner 512, N 16, batch 2, fp32, "
             f"{torch.get_num_threads()} threads)", scan),
            (f"(a) Mamba block forward+backward (d_model 256, d_state 16, batch 2, L 1024, fp32, "
             f"{torch.get_num_threads()} threads)", block)]


PARTS = {"a": part_a}  # (b) training vs transformer, (c) decode latency, (d) induction heads: to be added


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", default="a", help="which parts to run, e.g. 'a' (available: %s)" % ",".join(PARTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    for part in args.parts.replace(",", ""):
        if part not in PARTS:
            raise SystemExit(f"part {part!r} is not implemented yet (available: {', '.join(PARTS)})")
        tables += PARTS[part](args)
    for title, rows in tables:
        print(table(rows, title), end="\n\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "repeats": args.repeats,
                       "tables": [{"title": title, "rows": rows} for title, rows in tables]}, f, indent=1)


if __name__ == "__main__":
    main()
