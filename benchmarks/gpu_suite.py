"""The one script to run when a GPU is available: at most a few minutes, no downloads, a table at the end and JSON
under --out. On a CPU, `--tiny` runs the same cases on a tiny shape (the test suite does this).

    python -m benchmarks.gpu_suite --out results/ [--tiny] [--steps 20]

Cases: a GPT-2-124M-shaped transformer (configs/models/gpt2-124m.yaml, T=1024, batch 16, bf16) trained with
and without torch.compile, through the Lightning Trainer and through a bare PyTorch loop in the same run:
tokens/s and MFU against the card's datasheet bf16 rate. Families add their GPU cases to CASES: MTP memory,
speculative decoding, the Mamba scan and trunk, MDLM training and sampling.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.data import DataLoader

from benchmarks.common import (RandomTokens, attach_trainer_for_optimizers, bare_seconds_per_step,
                               lightning_seconds_per_step, random_batch, synchronize, table)
from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.callbacks import auto_precision, compute_dtype, flops_per_step

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64


def gpt2_shape(tiny: bool) -> tuple[dict, int, int, int]:
    """(trunk arguments, vocabulary, sequence length, batch size)."""
    if tiny:
        return dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64), 512, 64, 4
    spec = yaml.safe_load(open(ROOT / "configs" / "models" / "gpt2-124m.yaml"))["init_args"]
    return spec, GPT2_VOCAB, 1024, 16


def ntp_training_cases(args, device: torch.device, precision: str) -> list[dict]:
    trunk_args, vocab, seq_len, batch_size = gpt2_shape(args.tiny)
    rows = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = NextTokenPrediction(Transformer(**trunk_args), vocab_size=vocab).to(device)
        attach_trainer_for_optimizers(model, total_steps=10_000)
        flops = flops_per_step(model, random_batch(vocab, batch_size, seq_len, device))
        peak = get_available_flops(device, compute_dtype(precision)) if device.type == "cuda" else None
        if compiled:
            model.trunk.compile()
        loader = DataLoader(RandomTokens(vocab, seq_len + 1), batch_size=batch_size, num_workers=2 if device.type == "cuda" else 0,
                            pin_memory=device.type == "cuda")
        seconds = {"bare": bare_seconds_per_step(model, loader, args.steps, precision, warmup=args.warmup),
                   "Trainer": lightning_seconds_per_step(model, loader, args.steps, precision, warmup=args.warmup)}
        for loop, s in seconds.items():
            rows.append({"case": f"NTP gpt2-124m{' tiny' if args.tiny else ''}", "compile": compiled, "loop": loop,
                         "tokens/s": batch_size * seq_len / s, "MFU": flops / s / peak if peak and flops else None})
        rows.append({"case": "Trainer/bare", "compile": compiled, "loop": "ratio",
                     "tokens/s": seconds["bare"] / seconds["Trainer"], "MFU": None})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def mtp_memory_cases(args, device: torch.device, precision: str) -> list[dict]:
    """Peak memory of one MTP n=4 training step at V=131072 (benchmarks/mtp_memory.py's cases)."""
    from benchmarks.mtp_memory import CASES as MEMORY_CASES, one_step
    vocab, shape = (131072, (8, 1024, 768, 12)) if not args.tiny else (4096, (2, 64, 64, 4))
    if device.type != "cuda":
        return [{"case": "MTP memory", "loop": "skipped on CPU (see benchmarks/mtp_memory.py)"}]
    peaks = {}
    for case in MEMORY_CASES:
        peaks[case] = one_step(case, vocab, *shape, "cuda")
        torch.cuda.empty_cache()
    return [{"case": f"memory V={vocab}: {case}", "GiB": peak / 2**30, "x NTP": peak / peaks["NTP"]}
            for case, peak in peaks.items()]


def speculative_cases(args, device: torch.device, precision: str) -> list[dict]:
    """Greedy decoding on the GPT-2 shape with four heads of each type, chain and tree drafts, batch 1 and 8,
    against plain greedy (benchmarks/speculative.py's cases). Random weights: acceptance here says nothing about
    a trained model; the figure is the cost of a verify step in plain steps."""
    from benchmarks.speculative import decoding_cases, measure, rows_of
    from objectives import MultiTokenPrediction
    trunk_args, vocab, _, _ = gpt2_shape(args.tiny)
    new = 16 if args.tiny else 128
    rows = []
    for head_type in ("block", "mlp"):
        torch.manual_seed(0)
        model = MultiTokenPrediction(Transformer(**trunk_args), vocab_size=vocab, n_future=4,
                                     head_type=head_type).to(device).eval()
        cases = [c for c in decoding_cases(model, 3, [[3, 2, 1]]) if c[0].split(",")[0] in ("plain greedy", "heads")]
        for batch_size in (1, 8):
            batches = [torch.randint(0, vocab, (batch_size, 32), device=device) for _ in range(2)]
            results = measure(model, batches, cases, new)
            for row in rows_of(results, batch_size, new, f"MTP {head_type} heads"):
                rows.append({"case": f"greedy decode batch {batch_size}, {row['model']}, {row['decoding']}",
                             "tokens/s": row["tokens/s"], "loop": f"{row['accepted/step']:.2f} tokens/step, "
                             f"step {row['step cost (plain steps)']:.2f} plain steps"})
        del model
    return rows


def ssm_cases(args, device: torch.device, precision: str) -> list[dict]:
    """State-space trunks: the selective scan's forward at L=4096 (the chunked pure-PyTorch scan, and mamba_ssm's
    kernel where it is importable), Mamba-2's SSD forward (`ssd_cases`), and NTP training tokens/s and memory of
    the transformer, Mamba and Mamba-2 trunks of configs/models/*-quickstart.yaml at T in {1024, 4096, 16384}
    with equal tokens per step (benchmarks/ssm.py parts (a) and (b)); `--tiny`: tiny shapes."""
    from benchmarks.ssm import TRUNKS, scan_inputs, train_step_rate
    from models import selective_scan as mamba_module
    length, batch, dim = (64, 1, 32) if args.tiny else (4096, 2, 512)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in scan_inputs(batch, dim, 16, length).items()}
    rows = []
    kernels = {"chunked pure-PyTorch": None}
    if device.type == "cuda" and mamba_module.mamba_ssm_kernel is not None:
        kernels["mamba_ssm kernel"] = mamba_module.mamba_ssm_kernel
    for name, kernel in kernels.items():
        saved = mamba_module.mamba_ssm_kernel
        mamba_module.mamba_ssm_kernel = kernel  # None: selective_scan runs the chunked scan
        try:
            with torch.no_grad():
                for _ in range(args.warmup):
                    mamba_module.selective_scan(**kw)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    mamba_module.selective_scan(**kw)
                synchronize(device)
                s = (time.perf_counter() - start) / args.steps
        finally:
            mamba_module.mamba_ssm_kernel = saved
        rows.append({"case": f"selective scan fwd L={length} d_inner {dim} N 16 batch {batch}", "loop": name,
                     "tokens/s": batch * length / s})
    rows += ssd_cases(args, device)
    lengths, tokens = ((64,), 128) if args.tiny else ((1024, 4096, 16384), 32768)
    for seq_len in lengths:  # equal tokens per step at every length
        for kind, name in TRUNKS.items():
            r = train_step_rate(kind, seq_len, max(1, tokens // seq_len), args.steps, device.type,
                                d_model=64 if args.tiny else 256, vocab=512 if args.tiny else 4096,
                                warmup=args.warmup)
            rows.append({"case": f"NTP {name}{' tiny' if args.tiny else ''} T={seq_len}", "loop": "bare",
                         "tokens/s": r["tokens/s"], "GiB": r["peak"] / 2**30 if device.type == "cuda" else None})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def ssd_cases(args, device: torch.device) -> list[dict]:
    """Mamba-2's SSD layer forward at L=4096 (models/mamba2.py): the chunked pure-PyTorch algorithm, and
    mamba_ssm's fused Triton kernel where it is importable."""
    from models import mamba2
    length, batch, heads, P, N = (64, 1, 2, 16, 16) if args.tiny else (4096, 4, 8, 64, 128)
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(batch, length, heads, P, generator=g), dt=torch.randn(batch, length, heads, generator=g),
              A=-torch.rand(heads, generator=g) * 15 - 1, B=torch.randn(batch, length, 1, N, generator=g),
              C=torch.randn(batch, length, 1, N, generator=g))
    kw = {k: v.to(device) for k, v in kw.items()}
    bias = torch.full((heads,), -4.0, device=device)
    kernels = {"chunked pure-PyTorch": None}
    if device.type == "cuda" and mamba2._mamba_ssm_chunk_scan is not None:
        kernels["mamba_ssm Triton kernel"] = mamba2._mamba_ssm_chunk_scan
    rows = []
    for name, kernel in kernels.items():
        saved = mamba2._mamba_ssm_chunk_scan
        mamba2._mamba_ssm_chunk_scan = kernel
        try:
            with torch.no_grad():
                for _ in range(args.warmup):
                    mamba2.ssd_scan(**kw, chunk_size=64, dt_bias=bias, dt_softplus=True)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    mamba2.ssd_scan(**kw, chunk_size=64, dt_bias=bias, dt_softplus=True)
                synchronize(device)
                s = (time.perf_counter() - start) / args.steps
        finally:
            mamba2._mamba_ssm_chunk_scan = saved
        rows.append({"case": f"SSD fwd L={length} heads {heads} x {P} N {N} batch {batch}", "loop": name,
                     "tokens/s": batch * length / s})
    return rows


def mdlm_cases(args, device: torch.device, precision: str) -> list[dict]:
    """MDLM on the GPT-2 shape: training tokens/s (bare loop) and ancestral sampling tokens/s of a full canvas at
    32 and 128 steps, batch 8 (random weights: the figure is the cost of a step)."""
    from objectives import MaskedDiffusion
    trunk_args, vocab, seq_len, batch_size = gpt2_shape(args.tiny)
    torch.manual_seed(0)
    model = MaskedDiffusion(Transformer(**trunk_args), vocab_size=vocab).to(device)
    attach_trainer_for_optimizers(model, total_steps=10_000)
    loader = DataLoader(RandomTokens(vocab, seq_len), batch_size=batch_size)
    seconds = bare_seconds_per_step(model, loader, args.steps, precision, warmup=args.warmup)
    rows = [{"case": f"MDLM gpt2-124m{' tiny' if args.tiny else ''} training", "loop": "bare",
             "tokens/s": batch_size * seq_len / seconds}]
    model.eval()
    dtype = compute_dtype(precision)
    canvas = torch.zeros(8, 0, dtype=torch.long, device=device)
    for steps in (32, 128):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model.generate(canvas, 16, steps=2)
            synchronize(device)
            start = time.perf_counter()
            model.generate(canvas, seq_len, temperature=1.0, steps=steps)
            synchronize(device)
        rows.append({"case": f"MDLM sampling {seq_len} tokens x 8, {steps} steps", "loop": "ancestral",
                     "tokens/s": 8 * seq_len / (time.perf_counter() - start)})
    return rows


CASES = [ntp_training_cases, mtp_memory_cases, speculative_cases, ssm_cases, mdlm_cases]


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="gpu_suite_results")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = auto_precision()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.time()
    rows = []
    for case in CASES:
        rows += case(args, device, precision)
    text = table(rows, f"GPU suite on {card} ({precision}, {time.time() - started:.0f}s)")
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(Path(args.out) / "gpu_suite.json", "w") as f:
        json.dump({"device": card, "precision": precision, "torch": torch.__version__, "rows": rows}, f, indent=1)
    (Path(args.out) / "gpu_suite.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
