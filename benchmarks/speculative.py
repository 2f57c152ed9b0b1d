"""Self-speculative decoding on held-out code: plain greedy against speculative greedy with each drafter the
checkpoint's objective offers (multi-token heads or DeepSeek modules, prompt lookup, both), alternating prompt by
prompt in one process, at batch 1.

    python -m benchmarks.speculative --ckpt_path runs/mtp_code/version_0/checkpoints/last.ckpt [--prompts 16]

For each drafter: tokens/s, speedup over plain greedy, mean accepted length (tokens per forward), whether every
output equals plain greedy output, and the share of repeated 4-grams in the outputs (a weak model's loops are
easy to draft and inflate acceptance without meaning anything). Goals on the mtp_code model: speedup >= 2.0x,
mean accepted length >= 2.5.
"""
from __future__ import annotations

import os
import random
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from benchmarks.common import parser, report
from datamodules.text import _bucket
from generate import load


def held_out_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Windows of `length` tokens from standard-library files in the test split (never trained on)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(p for p in Path(root).rglob("*.py") if "site-packages" not in str(p)
                   and _bucket(os.path.relpath(p, root), 0.02, 0.02) == "test")
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        ids = tokenizer.encode(rng.choice(files).read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) > 2 * length:
            start = rng.randrange(0, len(ids) - length)
            prompts.append(ids[start : start + length])
    return prompts


def repeated_4gram_share(ids: list[int]) -> float:
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_drafts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (batch-1 decoding is latency bound: a second thread mostly adds synchronisation)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.ckpt_path)
    model.eos_id = None  # measure full-length continuations
    drafters = list(model.drafters(args.num_drafts))
    prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
    seconds = {"plain": [], **{d: [] for d in drafters}}
    steps = {d: 0 for d in drafters}
    identical = {d: True for d in drafters}
    repeats = []
    model.generate(torch.tensor([prompts[0]]), 8)  # warm up
    for ids in prompts:
        prompt = torch.tensor([ids])
        start = time.perf_counter()
        plain = model.generate(prompt, args.max_new_tokens)
        seconds["plain"].append(time.perf_counter() - start)
        repeats.append(repeated_4gram_share(plain[0, len(ids):].tolist()))
        for drafter in drafters:
            start = time.perf_counter()
            out = model.generate(prompt, args.max_new_tokens, speculative=True, drafter=drafter,
                                 num_drafts=args.num_drafts)
            seconds[drafter].append(time.perf_counter() - start)
            steps[drafter] += model.decode_stats["steps"]
            identical[drafter] &= torch.equal(out, plain)
    tokens = args.max_new_tokens * len(prompts)
    plain_rate = tokens / sum(seconds["plain"])
    rows = [{"decoding": "plain greedy", "tokens/s": plain_rate, "speedup": 1.0, "accepted/step": 1.0,
             "identical": True, "repeated 4-grams": statistics.mean(repeats)}]
    for drafter in drafters:
        rate = tokens / sum(seconds[drafter])
        rows.append({"decoding": f"speculative ({drafter})", "tokens/s": rate, "speedup": rate / plain_rate,
                     "accepted/step": tokens / steps[drafter], "identical": identical[drafter],
                     "repeated 4-grams": statistics.mean(repeats)})
    report(rows, f"greedy decoding at batch 1, {len(prompts)} held-out code prompts of {args.prompt_tokens} tokens, "
                 f"{args.max_new_tokens} new tokens each ({type(model).__name__}, {args.ckpt_path})", args.json)


if __name__ == "__main__":
    main()
