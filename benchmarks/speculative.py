"""Self-speculative decoding on held-out code: plain greedy against speculative greedy with each drafter the
checkpoint's objective offers (multi-token heads of either type or DeepSeek modules, prompt lookup, both), as
chain drafts and as tree drafts, at batch 1 and batch 8, alternating case by case in one process.

    python -m benchmarks.speculative --ckpt_path runs/mtp_mlp_code/version_0/checkpoints/last.ckpt \
        [more checkpoints] [--prompts 16] [--batch 1 8] [--trees 3,2,1 4,2]

For each case: the most drafts a step may carry, tokens/s, speedup over plain greedy at the same batch, accepted
tokens per verify forward (per row), the cost of one verify step in plain decoding steps, whether every output
equals plain greedy output row by row, the ceiling (1 + drafts) / (step cost), the speedup if every draft were
accepted (DeepSeek's modules at depth 1 draft one token, so theirs is 2 over their step cost), and at batch 1 the speedup on the prompts whose plain outputs repeat under
40% of their 4-grams (a weak model's loops are easy to draft and flatter lookup); --low_repeat N adds batch-1
rows on N prompts screened for such outputs. The step cost leaves out the
prefill (timed apart, per case, as a generation of one token), which a decode pays once whatever its steps: with
it, a drafter that takes few steps would be charged the prompt's forward over fewer steps. The speedup is end to
end, prefill included, so it is (accepted/step) / (step cost) up to the prefill's share. The drafters that read
the text (prompt lookup, alone or with the heads) draft up to --lookup_drafts tokens while their match continues;
the others up to --num_drafts. At batch 1 greedy chain drafts run the lean loop
(`objectives.decoding.speculative.greedy_chain`). Decoding runs in bfloat16 where the CPU computes it natively
(as training does), else float32; --dtype float32 bfloat16 runs every case on the checkpoint's weights in each
dtype, alternated in one process: speedups and "identical" against plain greedy in the same dtype, and "x float32
plain" against plain greedy in float32 (the end-to-end gain of changing both).
Goals (issue 28) on the mtp_mlp_code model: the best drafter >= 2.0x and the heads alone >= 1.5x at batch 1, a
verify step of 4 tokens <= 1.45 plain steps, >= 1.3x at batch 8; DeepSeek's speedup beside its ceiling.
"""
from __future__ import annotations

import os
import random
import statistics
import sysconfig
import time
from copy import deepcopy
from pathlib import Path

import torch

from benchmarks.common import parser, report, synchronize


def held_out_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Windows of `length` tokens from standard-library files in the test split (never trained on)."""
    from datamodules.text import _bucket
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


LOW_REPEAT_SHARE = 0.4  # the low-repetition prompts: plain output repeating under this share of its 4-grams


def low_repeat_prompts(model, candidates: list[list[int]], count: int, max_new_tokens: int
                       ) -> tuple[list[list[int]], int]:
    """Up to `count` of the candidate prompts whose plain greedy continuation repeats under LOW_REPEAT_SHARE of
    its 4-grams, screened in order: (prompts, how many were screened). Why: a weak model's continuations often
    loop, and a loop is what prompt lookup copies best; on these prompts lookup has little to copy and the heads
    must predict."""
    chosen, screened = [], 0
    for ids in candidates:
        screened += 1
        out = model.generate(torch.tensor([ids]), max_new_tokens)
        if repeated_4gram_share(out[0, len(ids):].tolist()) < LOW_REPEAT_SHARE:
            chosen.append(ids)
            if len(chosen) == count:
                break
    return chosen, screened


def decoding_cases(model, num_drafts: int, trees: list[list[int]], lookup_drafts: int = 8
                   ) -> list[tuple[str, dict]]:
    """(label, generate options): plain, then every drafter as a chain and, where it ranks candidates, as trees.
    Drafters named for prompt lookup may draft `lookup_drafts` tokens (the heads among them still reach n-1)."""
    cases = [("plain greedy", {})]
    for name, propose in model.drafters(num_drafts).items():
        n = max(num_drafts, lookup_drafts) if "lookup" in name else num_drafts
        cases.append((f"{name}, chain", dict(speculative=True, drafter=name, num_drafts=n)))
        if propose.ranks_candidates and "tensor" in model.trunk.supported_masks:
            for widths in trees:
                cases.append((f"{name}, tree {'x'.join(map(str, widths))}",
                              dict(speculative=True, drafter=name, num_drafts=n, tree=widths)))
    return cases


def in_dtype(model, dtype: str, num_drafts: int, trees: list[list[int]], lookup_drafts: int) -> list:
    """The decoding cases on a copy of the model in `dtype` (float32: the model itself), labelled with the dtype
    unless it is float32. Why bfloat16: where the CPU has native bf16 products (AVX-512 bf16, AMX), a product of
    a few rows costs about what one row costs (fp32: about twice from 1 to 4 rows), so a verify forward of 4
    tokens is barely dearer than a plain step; elsewhere bf16 is emulated and slower. Every case is still
    compared with plain greedy decoding of the same copy."""
    copy = model if dtype == "float32" else deepcopy(model).to(getattr(torch, dtype))
    suffix = "" if dtype == "float32" else f" [{dtype}]"
    return [(label + suffix, {**options, "model": copy})
            for label, options in decoding_cases(copy, num_drafts, trees, lookup_drafts)]


def measure(model, batches: list[torch.Tensor], cases: list[tuple[str, dict]], max_new_tokens: int) -> dict:
    """Runs every case on every batch, alternating; per case: seconds per batch, seconds of its prefill (a
    generation of one token, which takes no step), verify forwards, outputs."""
    device = batches[0].device
    results = {label: {"seconds": [], "prefill": [], "steps": 0, "outputs": []} for label, _ in cases}
    # a case may name its own copy of the model ("model": the same weights in another dtype)
    cases = [(label, options.get("model", model), {k: v for k, v in options.items() if k != "model"})
             for label, options in cases]
    for label, case_model, options in cases:  # warm up
        case_model.generate(batches[0][:, :16], 4, **options)

    def timed(case_model, batch, new, options):
        synchronize(device)
        start = time.perf_counter()
        out = case_model.generate(batch, new, **options)
        synchronize(device)
        return time.perf_counter() - start, out

    for batch in batches:
        for label, case_model, options in cases:
            results[label]["prefill"].append(timed(case_model, batch, 1, options)[0])
            seconds, out = timed(case_model, batch, max_new_tokens, options)
            results[label]["seconds"].append(seconds)
            results[label]["steps"] += case_model.decode_stats["steps"] if options else max_new_tokens - 1
            results[label]["outputs"].append(out)
    return results


def rows_of(results: dict, batch_size: int, max_new_tokens: int, model_name: str,
            low_repeat: list[int] | None = None, plain_label: str = "plain greedy") -> list[dict]:
    plain = results[plain_label]
    tokens = max_new_tokens * batch_size * len(plain["seconds"])
    plain_rate = tokens / sum(plain["seconds"])
    # a plain step: the time past the prefill over the tokens past the prefill's first one
    plain_step = (sum(plain["seconds"]) - sum(plain["prefill"])) / plain["steps"]
    rows = []
    for label, r in results.items():
        rate = tokens / sum(r["seconds"])
        row = {"model": model_name, "decoding": label, "batch": batch_size, "drafts": r.get("drafts", 0),
               "tokens/s": rate, "speedup": rate / plain_rate,
               # tokens a step adds: every token but the first, which the prefill gives
               "accepted/step": (max_new_tokens - 1) * len(r["seconds"]) / max(r["steps"], 1),
               "step cost (plain steps)": (sum(r["seconds"]) - sum(r["prefill"])) / max(r["steps"], 1) / plain_step,
               "identical": all(torch.equal(a, b) for a, b in zip(r["outputs"], plain["outputs"]))}
        # the speedup this drafter could reach at this step cost if every draft were accepted: 1 + drafts tokens a
        # step (DeepSeek's modules at depth D draft D: with D = 1 at most 2 tokens a step)
        row["ceiling"] = (1 + row["drafts"]) / row["step cost (plain steps)"] if row["drafts"] else 1.0
        if low_repeat is not None:
            chosen = low_repeat or [0]
            row["speedup, <40% repeats"] = (sum(plain["seconds"][i] for i in chosen)
                                            / sum(r["seconds"][i] for i in chosen)) if low_repeat else None
        rows.append(row)
    return rows


def timed_rows(model, groups: dict, batches: list[torch.Tensor], max_new_tokens: int, model_name: str,
               repeats_column: bool = False) -> list[dict]:
    """Every case of every dtype group ({dtype: cases}, `in_dtype`) timed on the batches, alternating, as table
    rows; with `repeats_column` (batch 1) also the speedup on the prompts whose plain output repeats under
    LOW_REPEAT_SHARE of its 4-grams."""
    results = measure(model, batches, [case for cases in groups.values() for case in cases], max_new_tokens)
    for cases in groups.values():
        for label, options in cases:
            results[label]["drafts"] = options.get("num_drafts", 0)
    batch_size, low = batches[0].shape[0], None
    if repeats_column:
        plain = results[next(iter(groups.values()))[0][0]]["outputs"]
        repeats = [repeated_4gram_share(o[0, b.shape[1]:].tolist()) for o, b in zip(plain, batches)]
        low = [i for i, share in enumerate(repeats) if share < LOW_REPEAT_SHARE]
        print(f"{model_name}: repeated 4-gram share of the plain outputs {statistics.mean(repeats):.2f}; "
              f"{len(low)} of {len(repeats)} prompts under {LOW_REPEAT_SHARE:.0%}")
    rows = []
    for dtype, cases in groups.items():
        group = rows_of({label: results[label] for label, _ in cases}, batch_size, max_new_tokens, model_name, low,
                        plain_label=cases[0][0])
        for row in group:
            row["dtype"] = dtype
            if "float32" in groups and len(groups) > 1:  # end to end against the float32 baseline
                fp32_plain = sum(results[groups["float32"][0][0]]["seconds"])
                row["x float32 plain"] = fp32_plain / sum(results[row["decoding"]]["seconds"])
        rows += group
    return rows


def decoding_dtype() -> str:
    """bfloat16 where the CPU (or GPU) computes it natively, as training's precision rule, else float32: on such a
    CPU a bf16 linear layer costs about the same for 1 to 8 rows where an fp32 one doubles from 1 to 4, so a
    verify step of 4 tokens costs 1.33 plain steps in bf16 against 1.62 in fp32 (BENCHMARKS.md, "bf16
    decoding"), with the same output as plain greedy decoding in the same precision."""
    from objectives.training.callbacks import auto_precision, compute_dtype
    return "bfloat16" if compute_dtype(auto_precision()) == torch.bfloat16 else "float32"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", nargs="+", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_drafts", type=int, default=4, help="most drafts per step of the heads or modules")
    p.add_argument("--lookup_drafts", type=int, default=8,
                   help="most drafts per step of prompt lookup (alone or with the heads), while its match continues")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--low_repeat", type=int, default=0,
                   help="also time batch 1 on this many held-out prompts whose plain output repeats under 40%% of "
                        "its 4-grams (screened from up to 16x as many candidates), rows marked in 'prompts'")
    p.add_argument("--trees", nargs="*", default=["3,2,1", "4,2"],
                   help="tree shapes as widths per depth (Medusa-style product trees)")
    p.add_argument("--dtype", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                   help="weights and activations while decoding (auto: bfloat16 where the CPU computes it natively, "
                        "as training's precision, else float32); several: each case in each, alternated in one "
                        "process, speedups over plain greedy in the same dtype and (column 'x float32 plain') "
                        "over plain greedy in float32")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (batch-1 decoding is latency bound: a second thread mostly adds synchronisation)")
    args = p.parse_args()
    from objectives.training.checkpoints import load_with_tokenizer as load
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    trees = [[int(w) for w in t.split(",")] for t in args.trees]
    args.dtype = list(dict.fromkeys(decoding_dtype() if d == "auto" else d for d in args.dtype))
    rows = []
    for ckpt in args.ckpt_path:
        model, tokenizer = load(ckpt)
        model.eos_id = None  # measure full-length continuations
        name = f"{type(model).__name__}" + (f" ({model.head_type} heads)" if hasattr(model, "head_type") else "")
        prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
        groups = {dtype: in_dtype(model, dtype, args.num_drafts, trees, args.lookup_drafts) for dtype in args.dtype}
        for batch_size in args.batch:
            batches = [torch.tensor(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
            batches = [b for b in batches if b.shape[0] == batch_size]
            rows += timed_rows(model, groups, batches, args.max_new_tokens, name, repeats_column=batch_size == 1)
        if args.low_repeat:
            candidates = held_out_prompts(tokenizer, 16 * args.low_repeat, args.prompt_tokens, seed=1)
            chosen, screened = low_repeat_prompts(model, candidates, args.low_repeat, args.max_new_tokens)
            print(f"{name}: {len(chosen)} low-repetition prompts (plain output under {LOW_REPEAT_SHARE:.0%} "
                  f"repeated 4-grams) in {screened} screened")
            if chosen:
                group = timed_rows(model, groups, [torch.tensor([ids]) for ids in chosen], args.max_new_tokens, name)
                for row in group:
                    row["prompts"] = f"{len(chosen)} low-repetition"
                rows += group
    report(rows, f"greedy decoding, {args.prompts} held-out code prompts of {args.prompt_tokens} tokens, "
                 f"{args.max_new_tokens} new tokens each, {args.threads} thread(s)", args.json)


if __name__ == "__main__":
    main()
