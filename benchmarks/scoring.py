"""Answer scoring on reasoning data: the whole batch generated at once (ragged prompts, rows finishing on their
own) against one generate call per prompt length (how scoring ran before ragged batches), alternating in one
process, with the same per-row budgets.

    python -m benchmarks.scoring [--questions 64] [--trunk transformer|mamba] [--train_steps 60] [--repeats 3]
                                 [--threads 2] [--json PATH]

The questions are the val split of the ProsQA-style task of datamodules/reasoning.py (prompts of mixed lengths,
about 100-270 tokens); the model is a small next-token predictor, untrained or briefly trained (`--train_steps`
AdamW steps on the train split, so that it writes answers and stops at eos at different steps). Both ways must
give the same generations, hence the same val/accuracy and val/answer_tokens; the table gives the seconds of a
scoring pass (median over the repeats), questions per second and the speedup. Goal: at least 4x on 2 CPU cores.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

from benchmarks.common import parser, report
from datamodules.reasoning import ReasoningDataModule
from models import Mamba, Transformer
from objectives import NextTokenPrediction
from objectives.decoding.scoring import exact_match, generate_answers


def build(trunk: str, vocab_size: int, eos_id: int, max_seq_len: int) -> NextTokenPrediction:
    torch.manual_seed(0)
    net = (Transformer(d_model=64, n_layers=2, n_heads=4, max_seq_len=max_seq_len) if trunk == "transformer"
           else Mamba(d_model=64, n_layers=2, d_state=16, max_seq_len=max_seq_len))
    return NextTokenPrediction(net, vocab_size=vocab_size, eos_id=eos_id)


def train(model: NextTokenPrediction, data: ReasoningDataModule, steps: int, lr: float = 3e-3) -> float:
    """A few AdamW steps on the train split; the last loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    batches = iter(data.train_dataloader())
    for _ in range(steps):
        loss = model.loss(next(batches))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def score(model, batch, ragged: bool) -> tuple[float, list[list[int]], float, float]:
    """(seconds, generations, accuracy, answer tokens per question) of one scoring pass."""
    tokens, prompt_len, answers = batch["tokens"], batch["prompt_len"], batch["answer"]
    start = time.perf_counter()
    with torch.no_grad():
        generated = generate_answers(model, tokens, prompt_len, None, ragged=ragged)
    seconds = time.perf_counter() - start
    correct, lengths = [], []
    for row, gen in enumerate(generated):
        gold = [t for t in answers[row].tolist() if t >= 0]
        gen, right = exact_match(gen, gold, model.eos_id)
        correct.append(float(right))
        lengths.append(len(gen))
    return seconds, generated, sum(correct) / len(correct), sum(lengths) / len(lengths)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--trunk", choices=("transformer", "mamba"), default="transformer")
    p.add_argument("--train_steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = ReasoningDataModule(task="prosqa", val_size=args.questions, test_size=args.questions,
                               batch_size=args.questions, seed=0)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    model = build(args.trunk, data.vocab_size, data.eos_id, 400)  # the task's sequences are at most 384 tokens
    train_loss = train(model, data, args.train_steps) if args.train_steps else float("nan")
    model.eval()
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for ragged in (False, True):  # alternating, the per-length loop first
            seconds, generated, accuracy, answer_tokens = score(model, batch, ragged)
            times[ragged].append(seconds)
            results[ragged] = (generated, accuracy, answer_tokens)
    same = results[True][0] == results[False][0]
    base = statistics.median(times[False])
    rows = []
    for ragged, label in ((False, "one generate per prompt length"), (True, "whole batch at once (ragged)")):
        t = statistics.median(times[ragged])
        rows.append({"scoring": label, "seconds": t, "questions/s": args.questions / t,
                     "accuracy": results[ragged][1], "answer_tokens": results[ragged][2], "speedup": base / t})
    lengths = batch["prompt_len"]
    title = (f"Ragged answer scoring: {args.questions} ProsQA-style questions, prompts {int(lengths.min())}-"
             f"{int(lengths.max())} tokens ({len(lengths.unique())} lengths), {args.trunk} d64x2, "
             f"{args.train_steps} train steps (loss {train_loss:.3f}), fp32, {args.threads} threads")
    report(rows, title, args.json, same_generations=same, repeats=args.repeats, machine=platform.processor(),
           seconds={"per_length": times[False], "ragged": times[True]})
    print(f"same generations both ways: {same}; speedup {base / statistics.median(times[True]):.2f}x")
    if not same:
        raise SystemExit("the batched generations differ from the per-length ones")


if __name__ == "__main__":
    main()
