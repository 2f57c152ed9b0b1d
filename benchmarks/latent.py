"""Latent reasoning on ProsQA-style questions (Coconut, Hao et al. 2024, Table 1): test accuracy and generated
tokens per question for No-CoT, CoT, Coconut, pause as thought, Coconut w/o curriculum, Coconut on Mamba and LaDiR,
trained on the same trunk, data and budget; then the throughput of batched Coconut generation.

    python -m benchmarks.latent [--runs no_cot,cot,coconut,pause,coconut_no_curriculum,coconut_mamba,ladir]
        [--steps 600] [--stage_every 60] [--minutes 9] [--vae_steps 300] [--vae_minutes 3] [--d_model 64]
        [--n_layers 2] [--num_nodes 23] [--test_size 200] [--trajectories 4] [--json F]

Each run is `configs/experiments/prosqa_<run>.yaml` with the trunk width, depth, steps and curriculum overridden
from the command line (the configs' own sizes are the recipe; this benchmark shrinks them to the CPU budget). A run
trains for `steps` optimizer steps (or `minutes`, whichever ends first: a run cut by time is marked), then its own
`generate()` answers the held-out test questions. "tokens" is what the model itself produced per question: the
words before <eos> plus, for Coconut, its continuous thoughts (the paper's count: pause tokens and the <bot>/<eot>
markers are inputs, not generated). The paper (GPT-2, ProsQA, accuracy / tokens): CoT 77.5% / 49.4,
No-CoT 76.7% / 8.2, Coconut 97.0% / 14.2, pause as thought 96.6% / 8.2, w/o curriculum 76.1%.

LaDiR (Kang et al. 2025, arXiv:2510.04573) is two fits: the step VAE (`ladir_vae_prosqa.yaml`, `--vae_steps` /
`--vae_minutes`), then the latent diffusion model on the frozen VAE (`ladir_prosqa.yaml --model.init_args.vae_from`,
the same steps and minutes as the other runs). It gives two rows: 1 trajectory, and `--trajectories` trajectories
sampled in parallel with the answer by majority vote; its tokens are the words its VAE decodes (the latent blocks
are not counted).

The throughput part times the trained Coconut model answering `--speed_questions` test questions (ragged prompts)
in one batched `generate` call against one question at a time (the reference code's mode), the two alternated in
one process, and checks that both give the same tokens.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import fit_experiment, judge, parser, report, timed_generation, trainer_test
from datamodules.reasoning import collate

PAPER = {"no_cot": (76.7, 8.2), "cot": (77.5, 49.4), "coconut": (97.0, 14.2), "pause": (96.6, 8.2),
         "coconut_no_curriculum": (76.1, None), "coconut_mamba": (None, None), "ladir": (None, None)}
RUNS = ",".join(PAPER)


def train_run(run: str, steps: int, minutes: float, save_dir: str, test_size: int, extra: list[str]):
    """Fit `prosqa_<run>.yaml` with the overrides, then score the test split; returns (row, cli)."""
    cli, info = fit_experiment(f"prosqa_{run}.yaml", steps, minutes, save_dir,
                               ["--data.init_args.test_size", str(test_size), *extra])
    return {"run": run, "objective": type(cli.model).__name__, "trunk": type(cli.model.trunk).__name__,
            "steps": info["steps"], "train min": info["train min"], **trainer_test(cli)}, cli


def ladir_rows(args, extra: list[str]) -> list[dict]:
    """LaDiR's two fits (the step VAE, then the latent diffusion model on it) and its rows: 1 trajectory and
    `args.trajectories` by majority vote, exact match of the answer on the test questions."""
    flags = ["--data.init_args.test_size", str(args.test_size), *extra]
    vae, vae_info = fit_experiment("ladir_vae_prosqa.yaml", args.vae_steps, args.vae_minutes, args.save_dir,
                                   flags + ["--model.init_args.vae_steps", str(args.vae_steps), *args.vae_flags])
    path = f"{vae.trainer.log_dir}/vae_last.ckpt"
    vae.trainer.save_checkpoint(path)
    cli, info = fit_experiment("ladir_prosqa.yaml", args.steps, args.minutes, args.save_dir,
                               flags + ["--model.init_args.vae_from", path])
    model, dm, rows = cli.model.eval(), cli.datamodule, []
    for n in sorted({1, args.trajectories}):
        questions, gold, gens, _ = timed_generation(model, dm, args.test_size, num_trajectories=n)
        rows.append({"run": "ladir" if n == 1 else f"ladir_{n}", "objective": type(model).__name__,
                     "trunk": type(model.trunk).__name__, "steps": info["steps"], "vae steps": vae_info["steps"],
                     "train min": info["train min"] + vae_info["train min"], "trajectories": n,
                     "test acc %": 100 * statistics.mean(judge(dm, q, g, a, model.eos_id)
                                                         for q, a, g in zip(questions, gold, gens)),
                     "tokens": statistics.mean(sum(t < model.vocab_size for t in g)
                                               for g in gens[: args.token_questions]),
                     "cut by time": info["steps"] < args.steps})
    return rows


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
    p.add_argument("--vae_steps", type=int, default=300, help="LaDiR stage 1 (the step VAE)")
    p.add_argument("--vae_minutes", type=float, default=3.0)
    p.add_argument("--vae_flags", nargs="*", default=[], help="more flags for the VAE fit only")
    p.add_argument("--trajectories", type=int, default=4, help="LaDiR's second row: trajectories by majority vote")
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
        if run == "ladir":
            for row in ladir_rows(args, extra):
                rows.append(row)
                print(row, flush=True)
            continue
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
