"""Peak memory of one training step: multi-token prediction (n=4, per-head backward) against next-token prediction.

    python -m benchmarks.mtp_memory [--vocab 131072] [--d_model 256] [--layers 4] [--batch 4] [--seq_len 512]
                                    [--ce_chunk_mib 256] [--cases NTP MTP] [--repeats 2] [--json out.json]

"NTP" is `NextTokenPrediction`; "MTP" is `MultiTokenPrediction(n_future=4)` with the paper's per-head backward and
`match_params` (n-1 trunk layers move into the heads), so both hold the same parameters on the same trunk, vocabulary,
batch and precision, and both chunk the cross-entropy at the same budget (`ce_chunk_mib`, MiB of fp32 logits per
chunk). "MTP naive" (not run by default) keeps every head's full logits until one backward, as a straightforward
implementation does. One step is forward, backward and an AdamW step under bf16 autocast where the CPU or GPU
computes bf16 natively (fp32 otherwise).

CPU: each run is a fresh subprocess reporting its peak resident memory (Python and torch included), the cases
alternating over `--repeats` rounds; a case's figure is its highest peak. GPU: max memory allocated, in process.
Goal: MTP at most 1.10x NTP.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from benchmarks.common import parser, random_batch, report
from objectives.training.losses import CHUNK_MIB
from objectives.training.callbacks import auto_precision, compute_dtype

CASES = {  # the options of MultiTokenPrediction; "NTP" is NextTokenPrediction
    "NTP": dict(),
    "MTP": dict(n_future=4, per_head_backward=True, match_params=True),
    "MTP naive": dict(n_future=4, per_head_backward=False, match_params=True, naive=True),
}


def one_step(case: str, vocab: int, batch: int, seq_len: int, d_model: int, layers: int, device: str,
             chunk_mib: float = CHUNK_MIB) -> float:
    """Bytes at the peak of one forward+backward+optimizer step of the case."""
    from models import Transformer
    from objectives import MultiTokenPrediction, NextTokenPrediction
    options = dict(CASES[case])
    if options.pop("naive", False):  # one chunk: every head's whole logits alive at once
        chunk_mib = batch * seq_len * vocab * 4 / 2**20
    torch.manual_seed(0)
    trunk = Transformer(d_model=d_model, n_layers=layers, n_heads=8, max_seq_len=seq_len)
    family = NextTokenPrediction if case == "NTP" else MultiTokenPrediction
    model = family(trunk, vocab_size=vocab, ce_chunk_size=chunk_mib, **options).to(device)
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
    p.add_argument("--vocab", type=int, nargs="+", default=[131072])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="trunk layers of NTP (MTP moves 3 of them into its heads)")
    p.add_argument("--ce_chunk_mib", type=float, default=CHUNK_MIB, help="MiB of fp32 logits per chunk, both cases")
    p.add_argument("--cases", nargs="+", default=["NTP", "MTP"], choices=list(CASES), help="the cases (NTP first)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case, alternating (CPU)")
    p.add_argument("--case", help="internal: run one case in this process and print its peak")
    args = p.parse_args()
    if args.cases[0] != "NTP":
        p.error("--cases must start with NTP: the ratios are to it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (args.batch, args.seq_len, args.d_model, args.layers)
    if args.case:
        print(json.dumps({"peak": one_step(args.case, args.vocab[0], *shape, device, args.ce_chunk_mib)}))
        return
    rows = []
    for vocab in args.vocab:
        peaks = {case: [] for case in args.cases}
        for _ in range(args.repeats if device == "cpu" else 1):
            for case in args.cases:
                if device == "cuda":
                    peaks[case].append(one_step(case, vocab, *shape, device, args.ce_chunk_mib))
                    torch.cuda.empty_cache()
                    continue
                cmd = [sys.executable, "-m", "benchmarks.mtp_memory", "--case", case, "--vocab", str(vocab),
                       "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--d_model", str(args.d_model),
                       "--layers", str(args.layers), "--ce_chunk_mib", str(args.ce_chunk_mib)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                peaks[case].append(json.loads(done.stdout.strip().splitlines()[-1])["peak"])
        ntp = max(peaks["NTP"])
        for case, runs in peaks.items():
            rows.append({"V": vocab, "case": case, "peak MiB": max(runs) / 2**20, "x NTP": max(runs) / ntp,
                         "runs MiB": " ".join(f"{r / 2**20:.0f}" for r in runs)})
    what = "max memory allocated" if device == "cuda" else "peak RSS of a fresh process"
    report(rows, f"Training-step memory, MTP n=4 (per-head backward) against NTP: batch {args.batch} x "
                 f"{args.seq_len}, d_model {args.d_model}, {args.layers} layers, cross-entropy chunks of "
                 f"{args.ce_chunk_mib:g} MiB, {auto_precision()} ({what}, {device})", args.json,
           shape=vars(args) | {"device": device, "precision": auto_precision()})


if __name__ == "__main__":
    main()
