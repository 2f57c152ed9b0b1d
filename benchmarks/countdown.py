"""Countdown-3 (datamodules/countdown.py): chain-of-thought NTP, MDLM, Coconut and LaDiR trained on the same trunk,
data and budget, then scored on held-out questions for accuracy, pass@k, the number of distinct valid solutions
among k samples, and generation speed.

    python -m benchmarks.countdown [--runs cot,mdlm,coconut,ladir] [--steps 1000] [--minutes 4]
        [--vae_steps 600] [--vae_minutes 2] [--d_model 128] [--n_layers 4] [--test_size 200] [--samples 8]
        [--decode_steps 1,2,4,8,16] [--ckpt_path CKPT] [--threads 1] [--json F]

Each run is `configs/experiments/countdown_<run>.yaml` with the trunk's width and depth, the learning rate and the
batch overridden from the command line; LaDiR is two fits, the step VAE (`ladir_vae_countdown.yaml`, its own
`--vae_steps` / `--vae_minutes`) and then the latent diffusion model on the frozen VAE (`ladir_countdown.yaml
--model.init_args.vae_from`), with the same steps and minutes as the other runs. A run trains for `steps`
optimizer steps or `minutes`, whichever ends first (a run cut by time is marked). The defaults keep the whole
benchmark under 30 minutes on 2 CPU cores (22 measured, BENCHMARKS.md "Countdown"; the time caps bound its
training at 18 minutes) with one thread, so that a second job on the other core does not oversubscribe them.
`--ckpt_path` scores a trained run instead (e.g. one of configs/experiments/zoo_countdown.yaml, Countdown-4 or 3 as
it was trained), `--runs` naming its family; `--decode_steps` adds one MDLM row per number of denoising steps
(accuracy against decoding steps).

Rows (every question is checked by `countdown.check`, so any valid solution counts):
  * one generation per question: CoT and Coconut greedy; MDLM greedy, most confident tokens first; LaDiR with 1
    trajectory and with `samples` trajectories by majority vote. Every family is scored by the same two rules:
    "answer %", the written answer is the target (exact match; weak on Countdown, where the target is in the
    question), and "valid %", the written steps and answer are a valid solution once preceded by some valid choice
    of the steps the family hid ("latent steps": Coconut's continuous thoughts / thoughts_per_step, 0 for the
    others), with at least one step written: an answer alone, the target copied, is no solution. So "valid %"
    grades CoT, MDLM and LaDiR on every step and Coconut on its written steps only; read it with "latent steps".
  * pass@k (k = `samples`, from k samples per question: any of them valid) and "distinct valid": the number of
    different valid solutions among the k, averaged over questions (a solution is its sequence of steps, the
    operands of + and * unordered). CoT: k samples at temperature 1; MDLM: k samples at temperature 1;
    LaDiR: k trajectories with the repulsion off and on. "sample acc" is the fraction of single samples valid.
  * tokens/s: the tokens each call produced (words through <eos>, plus Coconut's continuous thoughts) over its
    seconds, the test questions in batches of 256.

Papers: Ye et al. 2024 (arXiv:2410.14157), the abstract's Countdown figures: their multi-granularity masked
diffusion model (6M parameters, token reweighting, easy-first top-k decoding) 91.5%, autoregression 45.8%.
LaDiR (Kang et al. 2025, arXiv:2510.04573) reports higher accuracy and more diverse solutions than autoregressive
sampling on Countdown.
"""
from __future__ import annotations

import math
import statistics
from itertools import combinations
from pathlib import Path

import torch

from benchmarks.common import fit_experiment, parser, repeated, report, timed_generation
from datamodules.countdown import ARROW, OPS, apply, check
from datamodules.reasoning import STEP
from objectives.decoding.scoring import exact_match
from objectives.training.checkpoints import load_checkpoint

PAPER = {"cot": 45.8, "mdlm": 91.5}  # Ye et al. 2024, Countdown: AR and their masked diffusion model
RUNS = "cot,mdlm,coconut,ladir"


# --- scoring of k samples ---------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are valid (Chen et al. 2021): 1 - C(n-c, k) / C(n, k);
    with k = n it is 1 when any sample is valid."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def solution_key(words: list[str]) -> tuple:
    """A written solution as its sequence of steps (a, op, b, c), the operands of + and * in a fixed order, so
    that "3 * 7 = 21" and "7 * 3 = 21" are one solution; words after <ans> are not part of it."""
    body = words[: words.index("<ans>")] if "<ans>" in words else words
    steps, step = [], []
    for w in body + [STEP]:
        if w != STEP:
            step.append(w)
            continue
        if step:
            if len(step) == 5 and step[1] in "+*":
                a, b = sorted(step[0:3:2], key=lambda v: (len(v), v), reverse=True)
                step = [a, step[1], b, *step[3:]]
            steps.append(tuple(step))
        step = []
    return tuple(steps)


def sample_scores(question: list[str], samples: list[list[str]], k: int) -> dict:
    """One question's k samples (words after the question): pass@k, distinct valid solutions, valid fraction."""
    valid = [check(question, s) for s in samples]
    return {"pass": pass_at_k(len(samples), sum(valid), k),
            "distinct": len({solution_key(s) for s, ok in zip(samples, valid) if ok}),
            "valid": sum(valid) / len(samples)}


def latent_prefix_check(question: list[str], written: list[str], latent_steps: int = 0) -> bool:
    """Whether some `latent_steps` valid steps on the question's numbers, then the written words, are a valid
    solution (hidden first steps, Coconut's, cannot be read, only whether the rest fits some valid beginning).
    At least one step must be written: with every step hidden only the answer, the target itself, would be
    checked. With latent_steps = 0 this is `countdown.check` of the written words."""
    if ARROW not in question or not solution_key(written):
        return False
    try:
        numbers = [int(t) for t in question[: question.index(ARROW)]]
    except ValueError:
        return False

    def prefixes(pool: list[int], depth: int):
        if depth == 0:
            yield []
            return
        for i, j in combinations(range(len(pool)), 2):
            rest = [v for n, v in enumerate(pool) if n not in (i, j)]
            for p, q in {(pool[i], pool[j]), (pool[j], pool[i])}:
                for op in OPS:
                    c = apply(op, p, q, 10**9)
                    if c is not None:
                        for tail in prefixes(rest + [c], depth - 1):
                            yield [str(p), op, str(q), "=", str(c), STEP] + tail

    return any(check(question, prefix + written) for prefix in prefixes(numbers, latent_steps))


# --- one run's rows -----------------------------------------------------------------------------------------------
def words(datamodule, ids: list[int]) -> list[str]:
    return datamodule.decode([i for i in ids if i < datamodule.vocab_size]).split()


def accuracy_row(model, dm, size: int, decoding: str, generate=None, **options) -> dict:
    """One generation per question, scored alike for every family: the answer (exact match) and the validity of
    the written steps after the hidden ones (`latent_prefix_check`); and the tokens/s of producing them."""
    questions, gold, gens, seconds = timed_generation(model, dm, size, generate, **options)
    latent = getattr(model, "latent_id", None)  # Coconut writes <bot>, its thoughts as this id, <eot>, then words
    answered, valid, hidden, tokens = [], [], [], 0
    for q, g, gen in zip(questions, gold, gens):
        thoughts = 0 if latent is None else sum(t == latent for t in gen)
        hidden.append(thoughts // model.c if thoughts else 0)
        answered.append(exact_match(gen, g, model.eos_id)[1])
        valid.append(latent_prefix_check(words(dm, q), words(dm, gen), hidden[-1]))
        tokens += thoughts + sum(t < dm.vocab_size for t in gen)
    return {"decoding": decoding, "answer %": 100 * statistics.mean(answered), "valid %": 100 * statistics.mean(valid),
            "latent steps": statistics.mean(hidden), "tokens/s": tokens / seconds}


def samples_row(model, dm, size: int, k: int, decoding: str, generate, **options) -> dict:
    """pass@k, distinct valid solutions and single-sample accuracy of k generations per question
    (`generate` returns [B, k, W])."""
    questions, _, gens, seconds = timed_generation(model, dm, size, generate, batch_size=max(1, 256 // k), **options)
    scores = [sample_scores(words(dm, q), [words(dm, s) for s in samples], k) for q, samples in zip(questions, gens)]
    tokens = sum(len(s) for samples in gens for s in samples)
    return {"decoding": decoding, "sample acc %": 100 * statistics.mean(s["valid"] for s in scores),
            f"pass@{k} %": 100 * statistics.mean(s["pass"] for s in scores),
            "distinct valid": statistics.mean(s["distinct"] for s in scores), "tokens/s": tokens / seconds}


def evaluate(run: str, model, dm, size: int, k: int, decode_steps: tuple[int, ...] = ()) -> list[dict]:
    if run == "ladir":
        return [accuracy_row(model, dm, size, "1 trajectory", num_trajectories=1),
                accuracy_row(model, dm, size, f"{k} trajectories, majority vote", num_trajectories=k),
                samples_row(model, dm, size, k, f"{k} trajectories, repulsion off", model.sample_trajectories,
                            num_trajectories=k, repulsion=0.0),
                samples_row(model, dm, size, k, f"{k} trajectories, repulsion on", model.sample_trajectories,
                            num_trajectories=k, repulsion=None)]
    greedy = {"cot": "greedy", "mdlm": "greedy, most confident first", "coconut": "greedy"}[run]
    rows = [accuracy_row(model, dm, size, greedy)]
    if run == "mdlm":
        rows += [accuracy_row(model, dm, size, f"{greedy}, {n} steps", steps=n) for n in decode_steps]
    if run in ("cot", "mdlm"):
        rows.append(samples_row(model, dm, size, k, f"{k} samples, T=1", repeated(model.generate, k),
                                temperature=1.0))
    return rows


def fit_run(run: str, args, extra: list[str]):
    """Fit the run's experiment(s); LaDiR: the step VAE first, then the latent diffusion model on it."""
    save_dir = args.save_dir
    if run != "ladir":
        flags = extra + (["--model.init_args.stage_every", str(args.stage_every or max(1, args.steps // 2))]
                         if run == "coconut" else [])
        return fit_experiment(f"countdown_{run}.yaml", args.steps, args.minutes, save_dir, flags)
    vae, vae_info = fit_experiment("ladir_vae_countdown.yaml", args.vae_steps, args.vae_minutes, save_dir,
                                   extra + ["--model.init_args.vae_steps", str(args.vae_steps), *args.vae_flags])
    path = f"{vae.trainer.log_dir}/vae_last.ckpt"
    vae.trainer.save_checkpoint(path)
    cli, info = fit_experiment("ladir_countdown.yaml", args.steps, args.minutes, save_dir,
                               extra + ["--model.init_args.vae_from", path])
    info.update({"vae steps": vae_info["steps"], "train min": info["train min"] + vae_info["train min"]})
    return cli, info


def trained_run(ckpt_path: str, save_dir: str):
    """A trained run's objective (eval mode) and datamodule, rebuilt by the CLI from the config.yaml it saved beside
    its checkpoints folder, the weights loaded by one validation (the project's checkpoint loader reads the families
    that decode left to right, not MDLM)."""
    from lab.cli import main  # the CLI (and every objective behind it) only where a benchmark needs it
    config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    cli = main(["validate", "-c", str(config), "--ckpt_path", ckpt_path, "--trainer.logger", "false",
                "--trainer.default_root_dir", save_dir, "--trainer.enable_progress_bar", "false"])
    return cli.model.eval(), cli.datamodule


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=4.0, help="time budget of each fit")
    p.add_argument("--vae_steps", type=int, default=600, help="LaDiR stage 1 (the step VAE)")
    p.add_argument("--vae_minutes", type=float, default=2.0)
    p.add_argument("--vae_flags", nargs="*", default=[], help="more flags for the VAE fit only")
    p.add_argument("--stage_every", type=int, default=0, help="Coconut steps before the first step is latent "
                                                                  "(0: half the steps)")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="k of pass@k: samples / trajectories per question")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default=None, help="the trainer's precision (default: the hardware's pick)")
    p.add_argument("--save_dir", default="runs/countdown")
    p.add_argument("--decode_steps", default="", help="MDLM: one more row per number of denoising steps, e.g. 1,2,4,8")
    p.add_argument("--ckpt_path", help="score this trained run instead of fitting one (--runs names its family)")
    args = p.parse_args()
    decode_steps = tuple(int(n) for n in args.decode_steps.split(",") if n)
    torch.set_num_threads(args.threads)
    extra = ["--model.init_args.trunk.init_args.d_model", str(args.d_model),
             "--model.init_args.trunk.init_args.n_layers", str(args.n_layers),
             "--model.init_args.trunk.init_args.n_heads", str(args.n_heads),
             "--model.init_args.optimizer.init_args.lr", str(args.lr),
             "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.val_size", "64",
             "--data.init_args.test_size", str(args.test_size),
             # no validation during the fit: every figure is computed here after it
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    if args.precision:
        extra += ["--trainer.precision", args.precision]
    rows = []
    if args.ckpt_path and "," in args.runs:
        p.error("--ckpt_path scores one trained run: give its family alone in --runs")
    for run in args.runs.split(","):
        if args.ckpt_path:
            model, dm = trained_run(args.ckpt_path, args.save_dir)
            precision = "32-true"
            info = {"steps": load_checkpoint(args.ckpt_path)["global_step"], "train min": None, "cut by time": None}
        else:
            cli, info = fit_run(run, args, extra)
            model, dm = cli.model.eval(), cli.datamodule
            precision = str(cli.trainer.precision)
        k = args.samples
        for scores in evaluate(run, model, dm, args.test_size, k, decode_steps):
            row = {"run": run, "objective": type(model).__name__, "decoding": scores["decoding"]}
            for column in ("answer %", "valid %", "latent steps", "sample acc %", f"pass@{k} %", "distinct valid",
                           "tokens/s"):
                row[column] = scores.get(column)
            row.update({"paper acc %": PAPER.get(run) if "valid %" in scores else None, "steps": info["steps"],
                        "vae steps": info.get("vae steps"), "train min": info["train min"],
                        "cut by time": info["cut by time"]})
            rows.append(row)
            print(row, flush=True)
    context = {"precision": args.precision or precision, "threads": args.threads, "steps": args.steps,
               "minutes": args.minutes, "vae_steps": args.vae_steps, "d_model": args.d_model,
               "n_layers": args.n_layers, "test_size": args.test_size, "samples": args.samples}
    trained = (f"{args.ckpt_path} at step {info['steps']}" if args.ckpt_path else
               f"d_model {args.d_model}, {args.n_layers} layers, {args.steps} steps or {args.minutes:g} min per fit")
    report(rows, f"Countdown-{dm.generator.n} ({args.test_size} test questions): right answers, valid solutions, "
                 f"pass@{args.samples} and distinct valid solutions among {args.samples} samples; {trained}",
           args.json, **context)


if __name__ == "__main__":
    main()
