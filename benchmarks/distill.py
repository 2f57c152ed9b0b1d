"""The self-distillation retrofit (objectives/distill.py) against plain greedy decoding of its teacher.

    python -m benchmarks.distill --code_teacher CKPT --mult_teacher CKPT [--code_retrofit CKPT]
        [--mult_retrofit CKPT] [--retrofit_steps 40 160] [--mtp_ckpt CKPT] [--prompts 8] [--batch 1 8]

A retrofit not given is trained from its teacher by configs/experiments/distill_{code,multiplication}.yaml, the
trunk and sequence length taken from the teacher's checkpoint. Held-out code prompts (standard-library files of
the test split): for `verify` at k = 2, 4, 8 (tokens per forward at most; one retrofit trained with k = 8 decodes
with its first k-1 masks), `confidence` at three tau, prompt lookup on the teacher and, given an MTP checkpoint,
its heads: tokens per forward, the step cost (tokens per forward over speedup, in plain steps, the prefill's share
included), wall-clock speedup over the teacher's plain greedy decoding (every case alternated
prompt by prompt in one process; MTP's over its own plain greedy), agreement with the teacher's greedy
continuation (share of new tokens equal, position by position) and the repeated-4-gram share of the outputs (a
looping model inflates acceptance). Multiplication test questions: exact-match accuracy of the same decodings,
its relative drop from the teacher's, and tokens per forward.
Goals: verify equal to the teacher, >= 2.0x at batch 1 with >= 2.5 tokens per forward on code; confidence >= 3
tokens per forward with <= 5% relative accuracy drop on multiplication; retrofit <= 20% of the teacher's steps.
"""
from __future__ import annotations

import json
import shlex
import statistics
import time

import torch

from benchmarks.common import parser, report
from benchmarks.speculative import held_out_prompts, repeated_4gram_share
from objectives.training.checkpoints import load_checkpoint

RECIPES = {"code": "configs/experiments/distill_code.yaml", "mult": "configs/experiments/distill_multiplication.yaml"}


def retrofit(task: str, teacher: str, steps: int, save_dir: str, extra: str = "") -> str:
    """Train the retrofit of `teacher` by its recipe for `steps` steps (trunk and length from the teacher; `extra`:
    more train.py flags)."""
    from lab import cli as train
    saved = load_checkpoint(teacher)
    flags = ["--model.init_args.trunk", json.dumps(saved["hyper_parameters"]["trunk"])]
    seq_len = saved.get("datamodule_hyper_parameters", {}).get("seq_len")
    if task == "code" and seq_len:
        flags += ["--data.init_args.seq_len", str(seq_len)]
    cli = train.main(["fit", "-c", RECIPES[task], "--model.init_args.init_from", teacher, *flags,
                      "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                      "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", save_dir,
                      "--trainer.default_root_dir", save_dir, *shlex.split(extra)])
    path = f"{cli.trainer.log_dir}/checkpoints/final.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def timed(fn, model=None):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    stats = getattr(model, "decode_stats", None) if model is not None else None
    return out, seconds, stats


def run_cases(cases: list[tuple[str, object, callable]], batches: list[torch.Tensor]) -> dict:
    """Every case on every batch, alternating case by case: seconds, forwards after the prompt's, outputs."""
    results = {label: {"seconds": 0.0, "steps": 0, "outputs": []} for label, _, _ in cases}
    for label, model, fn in cases:  # warm up
        fn(batches[0][:, :8], 4)
    for batch in batches:
        for label, model, fn in cases:
            out, seconds, stats = timed(lambda: fn(batch, None), model)
            r = results[label]
            r["seconds"] += seconds
            r["steps"] += stats["steps"] if stats else 0
            r["outputs"].append(out)
    return results


def code_rows(args, teacher, retro, mtp, tokenizer) -> list[dict]:
    prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
    n = args.max_new_tokens
    for model in (teacher, retro, mtp):
        if model is not None:
            model.eos_id = None  # full-length continuations

    def case(model, **options):
        def fn(batch, max_new):
            return model.generate(batch, max_new or n, **options)
        return fn

    def plain_steps(model):
        return lambda batch, max_new: (setattr(model, "decode_stats", {"steps": (max_new or n) - 1}),
                                       model.generate(batch, max_new or n))[1]

    cases = [("teacher greedy", teacher, plain_steps(teacher)),
             ("teacher + prompt lookup", teacher, case(teacher, speculative=True, drafter="lookup", num_drafts=7))]
    cases += [(f"retrofit verify k={k}", retro, case(retro, decoding="verify", k=k)) for k in args.verify_k
              if k <= retro.k]
    if args.batch == [1]:  # groups after the ends of a step only: a form of batch-1 decoding
        cases += [(f"retrofit verify k={k}, groups at the ends", retro,
                   case(retro, decoding="verify", k=k, groups="ends")) for k in args.ends_k if k <= retro.k]
        cases += [(f"retrofit verify k={k}, groups at the ends, lookup first", retro,
                   case(retro, decoding="verify", k=k, groups="ends", lookup=7)) for k in args.ends_k
                  if k <= retro.k]
    cases += [(f"retrofit confidence k={retro.k} tau={tau}", retro, case(retro, decoding="confidence", tau=tau))
              for tau in args.tau]
    if mtp is not None:
        cases += [("MTP plain greedy", mtp, plain_steps(mtp)),
                  ("MTP heads", mtp, case(mtp, speculative=True, drafter="heads"))]
    rows = []
    for batch_size in args.batch:
        batches = [torch.tensor(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        batches = [b for b in batches if b.shape[0] == batch_size]
        results = run_cases(cases, batches)
        base = results["teacher greedy"]
        for label, model, _ in cases:
            r = results[label]
            reference = results["MTP plain greedy"] if label.startswith("MTP") else base
            new = [o[:, args.prompt_tokens:] for o in r["outputs"]]
            gold = [o[:, args.prompt_tokens:] for o in base["outputs"]]
            agree = sum(float((a == b).float().mean()) for a, b in zip(new, gold)) / len(new)
            repeats = statistics.mean(repeated_4gram_share(row.tolist()) for o in new for row in o)
            tokens_per_forward = n * len(batches) / max(r["steps"] + len(batches), 1)
            speedup = reference["seconds"] / r["seconds"]
            rows.append({"task": "code", "decoding": label, "batch": batch_size,
                         "tokens/forward": tokens_per_forward, "speedup": speedup,
                         # the two factors of a speedup: tokens a forward, and what a forward costs
                         "step cost (plain steps)": tokens_per_forward / speedup,
                         "agreement with teacher": agree if not label.startswith("MTP") else None,
                         "repeated 4-grams": repeats})
    return rows


def multiplication_rows(args, teacher, retro) -> list[dict]:
    import datamodules
    saved = load_checkpoint(args.mult_teacher)
    hparams = {k: v for k, v in saved["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    data = datamodules.ReasoningDataModule(**hparams)
    data.setup("test")
    questions = []
    for batch in data.test_dataloader():
        for row in range(len(batch["tokens"])):
            plen = int(batch["prompt_len"][row])
            gold = [t for t in batch["answer"][row].tolist() if t >= 0]
            questions.append((batch["tokens"][row, :plen], gold, batch["tokens"].shape[1] - plen + 8))
            if len(questions) == args.questions:
                break
        if len(questions) == args.questions:
            break
    eos = teacher.eos_id

    def correct(generated: list[int], gold: list[int]) -> bool:
        if eos in generated:
            generated = generated[: generated.index(eos)]
        return len(generated) >= len(gold) and generated[len(generated) - len(gold):] == gold

    cases = [("teacher greedy", teacher, {}), ("retrofit verify", retro, {"decoding": "verify"})]
    cases += [(f"retrofit confidence tau={tau}", retro, {"decoding": "confidence", "tau": tau}) for tau in args.tau]
    stats = {label: {"right": 0, "seconds": 0.0, "steps": 0, "tokens": 0} for label, _, _ in cases}
    for prompt, gold, max_new in questions:
        for label, model, options in cases:
            start = time.perf_counter()
            out = model.generate(prompt[None], max_new, **options)[0, len(prompt):].tolist()
            s = stats[label]
            s["seconds"] += time.perf_counter() - start
            s["right"] += correct(out, gold)
            used = out.index(eos) + 1 if eos in out else len(out)
            s["tokens"] += used
            s["steps"] += model.decode_stats["steps"] + 1 if options else used
    teacher_accuracy = stats["teacher greedy"]["right"] / len(questions)
    rows = []
    for label, _, _ in cases:
        s = stats[label]
        accuracy = s["right"] / len(questions)
        rows.append({"task": f"multiplication ({len(questions)} test questions)", "decoding": label, "batch": 1,
                     "accuracy": accuracy,
                     "relative drop": (teacher_accuracy - accuracy) / teacher_accuracy if teacher_accuracy else None,
                     "tokens/forward": s["tokens"] / max(s["steps"], 1),
                     "speedup": stats["teacher greedy"]["seconds"] / s["seconds"]})
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", nargs="+", default=["code", "mult"], choices=["code", "mult"])
    p.add_argument("--code_teacher")
    p.add_argument("--mult_teacher")
    p.add_argument("--code_retrofit")
    p.add_argument("--mult_retrofit")
    p.add_argument("--retrofit_steps", type=int, nargs=2, default=[60, 160], help="code, multiplication")
    p.add_argument("--code_args", default="", help="more train.py flags for the code retrofit")
    p.add_argument("--mult_args", default="", help="more train.py flags for the multiplication retrofit")
    p.add_argument("--mtp_ckpt")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=48)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tau", type=float, nargs=3, default=[0.5, 0.7, 0.9])
    p.add_argument("--verify_k", type=int, nargs="+", default=[2, 3, 4, 8],
                   help="tokens per forward at most of the verify cases")
    p.add_argument("--ends_k", type=int, nargs="*", default=[4, 8],
                   help="the same with mask groups after a step's ends only (with --batch 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save_dir", default="runs")
    args = p.parse_args()
    from objectives.training.checkpoints import load_with_tokenizer as load
    for part in args.parts:
        if getattr(args, f"{part}_teacher") is None:
            p.error(f"--parts {part} needs --{part}_teacher (a next-token checkpoint of the project)")
    code_retrofit = mult_retrofit = None
    if "code" in args.parts:
        code_retrofit = args.code_retrofit or retrofit("code", args.code_teacher, args.retrofit_steps[0],
                                                       args.save_dir, args.code_args)
    if "mult" in args.parts:
        mult_retrofit = args.mult_retrofit or retrofit("mult", args.mult_teacher, args.retrofit_steps[1],
                                                       args.save_dir, args.mult_args)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    rows = []
    if code_retrofit is not None:
        teacher, tokenizer = load(args.code_teacher)
        mtp = load(args.mtp_ckpt)[0] if args.mtp_ckpt else None
        rows += code_rows(args, teacher, load(code_retrofit)[0], mtp, tokenizer)
    if mult_retrofit is not None:
        rows += multiplication_rows(args, load(args.mult_teacher)[0], load(mult_retrofit)[0])
    report(rows, f"self-distillation retrofit, {args.prompts} held-out code prompts of {args.prompt_tokens} tokens "
                 f"and {args.max_new_tokens} new tokens, {args.threads} thread(s)", args.json,
           code_retrofit=code_retrofit, mult_retrofit=mult_retrofit)


if __name__ == "__main__":
    main()
