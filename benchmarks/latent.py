"""Latent reasoning on ProsQA-style questions (Coconut, Hao et al. 2024, Table 1): test accuracy and generated
tokens per question for No-CoT, CoT, Coconut, pause as thought, Coconut w/o curriculum and Coconut on Mamba,
trained on the same trunk, data and budget; then the throughput of batched Coconut generation.

    python -m benchmarks.latent [--runs no_cot,cot,coconut,pause,coconut_no_curriculum,coconut_mamba]
        [--steps 600] [--stage_every 60] [--minutes 9] [--d_model 64] [--n_layers 2] [--num_nodes 23]
        [--test_size 200] [--json F]

Each run is `configs/experiments/prosqa_<run>.yaml` with the trunk width, depth, steps and curriculum overridden
from the command line (the configs' own sizes are the recipe; this benchmark shrinks them to the CPU budget). A run
trains for `steps` optimizer steps (or `minutes`, whichever ends first: a run cut by time is marked), then its own
`generate()` answers the held-out test questions. "tokens" is what the model itself produced per question: the
words before <eos> plus, for Coconut, its continuous thoughts (the paper's count: pause tokens and the <bot>/<eot>
markers are inputs, not generated). The paper (GPT-2, ProsQA, accuracy / tokens): CoT 77.5% / 49.4,
No-CoT 76.7% / 8.2, Coconut 97.0% / 14.2, pause as thought 96.6% / 8.2, w/o curriculum 76.1%.

The throughput part times the trained Coconut model answering `--speed_questions` test questions (ragged prompts)
in one batched `generate` call against one question at a time (the reference code's mode), the two alternated in
one process, and checks that both give the same tokens.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import train
from benchmarks.common import parser, report
from datamodules.reasoning import collate
from objectives import metrics as M

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"

PAPER = {"no_cot": (76.7, 8.2), "cot": (77.5, 49.4), "coconut": (97.0, 14.2), "pause": (96.6, 8.2),
         "coconut_no_curriculum": (76.1, None), "coconut_mamba": (None, None)}
RUNS = ",".join(PAPER)


def train_run(run: str, steps: int, minutes: float, save_dir: str, test_size: int, extra: list[str]):
    """Fit `prosqa_<run>.yaml` with the overrides, then score the test split; returns (row, cli)."""
    start = time.perf_counter()
    cli = train.main(["fit", "-c", str(EXPERIMENTS / f"prosqa_{run}.yaml"), "--trainer.max_steps", str(steps),
                      "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                      "--trainer.logger.init_args.save_dir", save_dir, "--trainer.enable_progress_bar", "false",
                      "--data.init_args.test_size", str(test_size), *extra])
    minutes_taken = (time.perf_counter() - start) / 60
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"run": run, "objective": type(cli.model).__name__, "trunk": type(cli.model.trunk).__name__,
            "steps": cli.trainer.global_step, "train min": minutes_taken,
            "test acc %": 100 * tested[M.TEST_ACCURACY], "answer_tokens": tested[M.TEST_ANSWER_TOKENS]}, cli


def generated_tokens(model, datamodule, n: int) -> float:
    """Tokens the model produces per test question: words through <eos>, plus continuous thoughts."""
    items = [datamodule.test_set[i] for i in range(min(n, len(datamodule.test_set)))]
    extra = getattr(model, "latent_id", None)
    counts = []
    for item in items:
        prompt = torch.tensor(item["tokens"][: item["prompt_len"]])[None]
        gen = model.generate(prompt, len(item["tokens"]) - item["prompt_len"] + 16)[0, prompt.shape[1]:].tolist()
        if model.eos_id in gen:
            gen = gen[: gen.index(model.eos_id) + 1]
        thoughts = sum(t == extra for t in gen) if getattr(model, "thought", "") == "continuous" else 0
        counts.append(sum(t < model.vocab_size for t in gen) + thoughts)
    return statistics.mean(counts)


def generation_speed(model, datamodule, questions: int, repeats: int = 2) -> dict:
    """Questions per second of one batched ragged `generate` call against one question at a time."""
    model.eval()
    items = [datamodule.test_set[i] for i in range(questions)]
    batch = collate(items, datamodule.pad_id)
    lengths = batch["prompt_len"]
    prompts = batch["tokens"][:, : int(lengths.max())]
    new = model.thoughts_at(model.stage) + 2 + 16  # the same work for both modes, whether or not rows stop
    batched_s, single_s = [], []
    for _ in range(repeats):  # alternated, so that load from other jobs hits both cases alike
        start = time.perf_counter()
        together = model.generate(prompts, new, prompt_lengths=lengths)
        batched_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        alone = [model.generate(prompts[b : b + 1, : int(lengths[b])], new)[0] for b in range(questions)]
        single_s.append(time.perf_counter() - start)
    same = all(torch.equal(together[b, : int(lengths[b]) + new], alone[b]) for b in range(questions))
    batched, single = questions / min(batched_s), questions / min(single_s)
    return {"questions": questions, "batched q/s": batched, "one at a time q/s": single,
            "speedup": batched / single, "same tokens": same}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--stage_every", type=int, default=60, help="steps per curriculum stage (stages 0..6)")
    p.add_argument("--minutes", type=float, default=9.0)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_nodes", type=int, default=23)
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--token_questions", type=int, default=50, help="test questions whose generation is counted")
    p.add_argument("--speed_questions", type=int, default=64)
    p.add_argument("--precision", default=None, help="the trainer's precision (default: the hardware's pick)")
    p.add_argument("--save_dir", default="runs/latent")
    args = p.parse_args()
    rows, coconut = [], None
    for run in args.runs.split(","):
        extra = ["--model.init_args.trunk.init_args.d_model", str(args.d_model),
                 "--model.init_args.trunk.init_args.n_layers", str(args.n_layers),
                 "--model.init_args.optimizer.init_args.lr", str(args.lr),
                 "--data.init_args.num_nodes", str(args.num_nodes), "--data.init_args.batch_size", str(args.batch_size),
                 "--data.init_args.val_size", "64", "--model.init_args.eval_examples", "32",
                 "--trainer.val_check_interval", str(args.steps), "--trainer.limit_val_batches", "1",
                 "--trainer.num_sanity_val_steps", "0"]
        if args.precision:
            extra += ["--trainer.precision", args.precision]
        if "coconut" in run or run == "pause":
            if run != "coconut_no_curriculum":
                extra += ["--model.init_args.stage_every", str(args.stage_every)]
        if run != "coconut_mamba":
            extra += ["--model.init_args.trunk.init_args.n_heads", "4"]
        row, cli = train_run(run, args.steps, args.minutes, args.save_dir, args.test_size, extra)
        model = cli.model.eval()
        row["tokens"] = generated_tokens(model, cli.datamodule, args.token_questions)
        row["stage"] = getattr(model, "stage", None)
        acc, toks = PAPER.get(run, (None, None))
        row["paper acc %"], row["paper tokens"] = acc, toks
        row["cut by time"] = row["steps"] < args.steps
        rows.append(row)
        print(row, flush=True)
        if run == "coconut":
            coconut = cli
    context = {"precision": args.precision or "auto", "steps": args.steps, "stage_every": args.stage_every, "d_model": args.d_model,
               "n_layers": args.n_layers, "num_nodes": args.num_nodes, "test_size": args.test_size}
    if coconut is not None and args.speed_questions:
        context["generation"] = generation_speed(coconut.model, coconut.datamodule, args.speed_questions)
        print(context["generation"], flush=True)
    report(rows, f"ProsQA-style questions ({args.test_size} test, {args.num_nodes}-node graphs): test accuracy and "
                 f"tokens generated per question; d_model {args.d_model}, {args.n_layers} layers, {args.steps} steps, "
                 f"a stage every {args.stage_every}", args.json, **context)


if __name__ == "__main__":
    main()
