"""Peak memory of one training step: NTP, MTP computed naively, and MTP as built (per-head backward), n=4.

    python -m benchmarks.mtp_memory [--vocab 32768 131072] [--cases NTP "MTP as built"] [--json out.json]

CPU: each case runs in a fresh subprocess and reports its peak resident memory. GPU: max memory allocated.
"MTP naive" keeps every head's full logits alive until one backward (no chunking, no per-head backward), the
way a straightforward implementation does; "NTP" and "MTP as built" use the project's chunked cross-entropy.
Both MTP cases move n-1 trunk layers into the heads (`match_params`), so all three hold the same parameters and
the figures isolate the memory of the loss. Goal: MTP as built at most 1.10x NTP.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from benchmarks.common import parser, random_batch, report

CASES = {
    "NTP": dict(n_future=1),
    "MTP naive": dict(n_future=4, per_head_backward=False, naive=True, match_params=True),
    "MTP as built": dict(n_future=4, per_head_backward=True, match_params=True),
}


def one_step(case: str, vocab: int, batch: int, seq_len: int, d_model: int, layers: int, device: str) -> float:
    """Bytes at the peak of one forward+backward+optimizer step of the case."""
    from models import Transformer
    from objectives import MultiTokenPrediction
    from objectives.runtime import auto_precision, compute_dtype
    options = dict(CASES[case])
    naive = options.pop("naive", False)
    torch.manual_seed(0)
    model = MultiTokenPrediction(Transformer(d_model=d_model, n_layers=layers, n_heads=8, max_seq_len=seq_len),
                                 vocab_size=vocab, ce_chunk_size=batch * seq_len if naive else 1024,
                                 **options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = random_batch(vocab, batch, seq_len, device)
    dtype = compute_dtype(auto_precision())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss = model.loss(data)["loss"]
    loss.backward()
    optimizer.step()
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="the cases to run (NTP first)")
    p.add_argument("--case", help="internal: run one case in this process and print its peak")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (args.batch, args.seq_len, args.d_model, args.layers)
    if args.case:
        print(json.dumps({"peak": one_step(args.case, args.vocab[0], *shape, device)}))
        return
    rows = []
    for vocab in args.vocab:
        peaks = {}
        for case in args.cases:
            if device == "cuda":
                peaks[case] = one_step(case, vocab, *shape, device)
                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, "-m", "benchmarks.mtp_memory", "--case", case, "--vocab", str(vocab),
                       "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--d_model", str(args.d_model),
                       "--layers", str(args.layers)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                peaks[case] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
        for case, peak in peaks.items():
            rows.append({"V": vocab, "case": case, "peak GiB": peak / 2**30, "x NTP": peak / peaks["NTP"]})
    what = "max memory allocated" if device == "cuda" else "peak RSS of a fresh process"
    report(rows, f"MTP training-step memory, n=4, batch {args.batch} x {args.seq_len} tokens, d_model {args.d_model}, "
                 f"{args.layers} layers ({what}, {device})", args.json)


if __name__ == "__main__":
    main()
