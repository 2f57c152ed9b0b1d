"""LaDiR's test-time compute on Countdown-3 (issue 27, part 3; Kang et al. 2025, "LaDiR: Latent Diffusion Enhances
LLMs for Text Reasoning", arXiv:2510.04573; the model is objectives/ladir.py): from one trained checkpoint, accuracy
against the Euler steps per latent block and against the trajectories per question, and pass@k, distinct valid
solutions and sample validity with the annealed diversity term off and on.

    python -m benchmarks.ladir --ckpt_path CKPT [--denoising 1,2,4,8,16,32] [--trajectories 1,2,4,8] [--samples 8]
        [--diversity W] [--guidance W] [--test_size 200] [--threads 1] [--seed 0] [--json F]
    python -m benchmarks.ladir [--steps 1000] [--minutes 4] [--vae_steps 600] [--vae_minutes 2] [--d_model 128] ...

CKPT is the `last.ckpt` of a `ladir_countdown.yaml` fit (its VAE companion, `vae_from`, where it was). Without
`--ckpt_path` the checkpoint is trained first, the two fits of benchmarks/countdown.py's LaDiR run with the same flags.

Rows, each from `sample_trajectories` on the first `test_size` test questions, every trajectory checked by
`countdown.check` (any valid solution counts), the noise drawn from `--seed` before every row (so the rows with the
diversity term off and on start every trajectory from the same noise):
  * "steps": 1 trajectory with S Euler steps per block, S in `--denoising`: "valid %" is the accuracy.
  * "trajectories": N trajectories at the model's own steps, the diversity term off: "valid %" of the trajectory the
    majority vote over answers picks (`generate`'s answer), and "pass@N %" (any of the N valid).
  * "diversity": `--samples` trajectories with the diversity term off and at weight `--diversity` (default: the
    model's `repulsion`, or the release's 0.1 where that is 0): "pass@N %", "distinct valid" (different valid
    solutions among the N, benchmarks/countdown.py's `solution_key`, averaged over questions) and "sample valid %"
    (the fraction of single trajectories valid: what the term must not cost).
Every row has every column, and "s/question", the sampling seconds per question (fp32, `--threads` threads).

The goals (issue 27): accuracy rises with denoising steps and with trajectories; with the annealed diversity term,
pass@8 and distinct valid solutions above those without it, at no loss in sample validity. The paper reports
accuracy rising with diffusion steps and with parallel trajectories (its test-time-compute figures) and more diverse
solutions than autoregressive sampling on Countdown.
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch

from benchmarks.common import parser, report, timed_generation
from benchmarks.countdown import sample_scores, words
from datamodules.countdown import check
from objectives.latent_flow import majority

RELEASE_DIVERSITY = 0.1  # mk322/LaDiR model.py: generate_batch_diversity(diversity_scale=0.10)


def trajectory_scores(model, dm, questions: list[list[int]], generations: list[list[list[int]]]) -> dict:
    """The figures of N trajectories per question (per question, N token lists after its prompt): the validity of the
    majority-vote trajectory, pass@N, the distinct valid solutions and the fraction of trajectories valid."""
    vote, scores = [], []
    for question, gens in zip(questions, generations):
        q, written = words(dm, question), [words(dm, g) for g in gens]
        scores.append(sample_scores(q, written, len(gens)))
        vote.append(check(q, written[majority([model.answer_of(g) for g in gens])]))
    return {"valid %": 100 * statistics.mean(vote), "pass@N %": 100 * statistics.mean(s["pass"] for s in scores),
            "distinct valid": statistics.mean(s["distinct"] for s in scores),
            "sample valid %": 100 * statistics.mean(s["valid"] for s in scores)}


def sampled_row(model, dm, size: int, section: str, steps: int, trajectories: int, diversity: float,
                guidance: float | None, seed: int) -> dict:
    """One configuration's row: `trajectories` per question, `steps` Euler steps per block, diversity weight
    `diversity`, the noise drawn from `seed`."""
    torch.manual_seed(seed)
    questions, _, gens, seconds = timed_generation(
        model, dm, size, model.sample_trajectories, batch_size=max(1, 256 // trajectories),
        num_trajectories=trajectories, denoising_steps=steps, repulsion=diversity, guidance_scale=guidance)
    return {"section": section, "denoising steps": steps, "trajectories": trajectories, "diversity": diversity,
            **trajectory_scores(model, dm, questions, gens), "s/question": seconds / len(questions)}


def compute_curves(model, dm, size: int, denoising=(1, 2, 4, 8, 16, 32), trajectories=(1, 2, 4, 8),
                   samples: int = 8, diversity: float | None = None, guidance: float | None = None,
                   seed: int = 0) -> list[dict]:
    """The three sections' rows (the module docstring); `diversity` None: the model's `repulsion`, or the release's
    0.1 where that is 0; `guidance` None: the model's `guidance_scale`."""
    model.eval()
    on = diversity if diversity is not None else (model.repulsion or RELEASE_DIVERSITY)
    own = model.denoising_steps

    def row(*config):
        result = sampled_row(model, dm, size, *config, guidance, seed)
        print(result, flush=True)
        return result
    return ([row("steps", s, 1, 0.0) for s in denoising] + [row("trajectories", own, n, 0.0) for n in trajectories]
            + [row("diversity", own, samples, w) for w in (0.0, on)])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def trained_checkpoint(args) -> str:
    """Fit the step VAE and the latent model as benchmarks/countdown.py does; the latent model's checkpoint path."""
    from benchmarks.countdown import fit_run
    extra = ["--model.init_args.trunk.init_args.d_model", str(args.d_model),
             "--model.init_args.trunk.init_args.n_layers", str(args.n_layers),
             "--model.init_args.trunk.init_args.n_heads", str(args.n_heads),
             "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.val_size", "64",
             "--data.init_args.test_size", str(args.test_size),
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    fit_args = argparse.Namespace(save_dir=args.save_dir, steps=args.steps, minutes=args.minutes,
                                  vae_steps=args.vae_steps, vae_minutes=args.vae_minutes, vae_flags=[])
    cli, info = fit_run("ladir", fit_args, extra)
    path = f"{cli.trainer.log_dir}/ladir_last.ckpt"
    cli.trainer.save_checkpoint(path)
    print(f"trained: {info}, {path}", flush=True)
    return path


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", help="a ladir_countdown.yaml checkpoint (default: train one first)")
    p.add_argument("--denoising", default="1,2,4,8,16,32", help="Euler steps per block of the steps curve")
    p.add_argument("--trajectories", default="1,2,4,8", help="trajectories per question of the trajectories curve")
    p.add_argument("--samples", type=int, default=8, help="trajectories of the diversity rows (k of pass@k)")
    p.add_argument("--diversity", type=float, default=None, help="the diversity term's weight in its 'on' row")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: model's)")
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000, help="without --ckpt_path: the latent model's steps")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_minutes", type=float, default=2.0)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--save_dir", default="runs/ladir_ttc")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lab.future_lens import load_run  # a checkpoint's objective and datamodule, rebuilt from its settings
    path = args.ckpt_path or trained_checkpoint(args)
    model, dm = load_run(path)
    model.float()
    rows = compute_curves(model, dm, args.test_size, [int(s) for s in args.denoising.split(",")],
                             [int(n) for n in args.trajectories.split(",")], args.samples, args.diversity,
                             args.guidance, args.seed)
    context = {"ckpt_path": path, "precision": "fp32", "threads": args.threads, "cpu": cpu_name(),
               "test_size": args.test_size, "model denoising steps": model.denoising_steps,
               "guidance": model.guidance_scale if args.guidance is None else args.guidance, "seed": args.seed}
    report(rows, f"LaDiR test-time compute, Countdown-3 ({args.test_size} test questions): accuracy against denoising "
                 f"steps and trajectories; pass@N, distinct valid solutions and sample validity with the diversity "
                 f"term off and on", args.json, **context)


if __name__ == "__main__":
    main()
