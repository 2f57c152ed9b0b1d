"""Future summary prediction (Mahajan et al. 2025, arXiv 2510.14751) against next-token and multi-token prediction.

    python -m benchmarks.fsp [--parts pathstar,code,overhead] [--graphs 5,8] [--runs ntp,bow,...]
                             [--steps 2000] [--code_steps 300] [--seeds 0,1] [--code_args FLAGS]
                             [--save_dir runs/fsp] [--json F]

(a) `pathstar`: test accuracy on path-star G(2, l, 50) for each l in --graphs, at the path-star table's budget
    (benchmarks/path_star.py: same trunk, data sizes, steps): NTP, NTP + bag-of-words (without and with tf-idf),
    NTP + reverse-LM (its companion trained first by configs/experiments/path_star_reverse_lm.yaml on the same
    graphs), MTP n=4, MTP n=4 + bag-of-words. The paper reports the bag-of-words summary solving path-star graphs
    where NTP stalls on the Clever-Hans plateau (1/degree) and MTP degrades with path length.
(b) `code`: final `val/ntp_loss` on the built-in code corpus at the quickstart budget, with and without each
    summary, for each seed in --seeds (the reverse LM is configs/experiments/reverse_lm_code.yaml, trained once
    per seed at the same budget).
(c) `overhead`: seconds per training step of NTP with and without the bag-of-words head (window 16) at the
    quickstart shape (batch 16 x 256, d_model 256, vocabulary 4096), in one process, alternating.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import RandomTokens, attach_trainer_for_optimizers, bare_seconds_per_step, parser, report
from benchmarks.path_star import EXPERIMENTS, train_and_test
from lab import cli as train
from objectives.training import metrics as M
from objectives.training.callbacks import auto_precision

SUMMARIES = Path(__file__).resolve().parent.parent / "configs" / "summaries"
QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def attach(summary: str) -> str:
    return f"--model.init_args.summaries+={SUMMARIES / summary}.yaml"


def revlm(checkpoint: str) -> str:
    spec = {"class_path": "objectives.ReverseLMSummary", "init_args": {"checkpoint": checkpoint}}
    return f"--model.init_args.summaries+={json.dumps(spec)}"


def final_checkpoint(config: Path, args: list[str], save_dir: str, name: str) -> str:
    """Train `config` and save its final weights (last.ckpt is only as new as the last checkpoint interval)."""
    cli = train.main(["fit", "-c", str(config), "--trainer.logger.init_args.save_dir", save_dir,
                      "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "final",
                      "--trainer.enable_progress_bar", "false", *args])
    path = f"{cli.trainer.log_dir}/checkpoints/final.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


# --- (a) path-star ------------------------------------------------------------------------------------------------
WEIGHT_1 = ["--model.init_args.summaries.init_args.weight", "1.0"]  # the weight of path_star_fsp_bow.yaml
PATH_STAR_RUNS = {  # name: (experiment config, extra flags); "revlm" also gets its companion's checkpoint
    "ntp": ("path_star_ntp", []),
    "bow": ("path_star_fsp_bow", []),
    "bow_tfidf": ("path_star_ntp", [attach("bow_tfidf"), *WEIGHT_1]),
    "revlm": ("path_star_ntp", []),
    "mtp": ("path_star_mtp", []),
    "mtp_bow": ("path_star_mtp", [attach("bow"), *WEIGHT_1]),
}


def path_star(graphs: list[int], runs: list[str], steps: int, minutes: float, save_dir: str,
              companion_steps: int) -> list[dict]:
    rows = []
    for length in graphs:
        data = ["--data.init_args.path_length", str(length)]
        for run in runs:
            config, extra = PATH_STAR_RUNS[run]
            if run == "revlm":
                companion = final_checkpoint(EXPERIMENTS / "path_star_reverse_lm.yaml",
                                             ["--trainer.max_steps", str(companion_steps), *data], save_dir,
                                             f"path_star_reverse_lm_l{length}")
                extra = [revlm(companion)]
            row = train_and_test(run, steps, minutes, save_dir, extra_args=(*data, *extra),
                                 config=EXPERIMENTS / f"{config}.yaml")
            rows.append({"graph": f"G(2,{length},50)", **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- (b) the code corpus ---------------------------------------------------------------------------------------------
CODE_RUNS = ["ntp", "bow", "bow_tfidf", "bow_w1", "bow_tfidf_w1", "revlm"]


def code(runs: list[str], steps: int, seeds: list[int], save_dir: str, flags: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        budget = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                  "--seed_everything", str(seed), *flags]
        for run in runs:
            extra = {"ntp": [], "bow": [attach("bow")], "bow_tfidf": [attach("bow_tfidf")],  # weight 0.1
                     "bow_w1": [attach("bow"), *WEIGHT_1], "bow_tfidf_w1": [attach("bow_tfidf"), *WEIGHT_1]}.get(run)
            if run == "revlm":
                extra = [revlm(final_checkpoint(EXPERIMENTS / "reverse_lm_code.yaml", budget, save_dir,
                                                f"reverse_lm_code_s{seed}"))]
            cli = train.main(["fit", "-c", str(QUICKSTART), "--trainer.logger.init_args.save_dir", save_dir,
                              "--trainer.logger.init_args.name", f"code_{run}_s{seed}",
                              "--trainer.enable_progress_bar", "false", *budget, *extra])
            metrics = cli.trainer.callback_metrics
            rows.append({"run": run, "seed": seed, "steps": cli.trainer.global_step,
                         "val/ntp_loss": float(metrics[M.VAL_NTP_LOSS]),
                         "summary loss": float(next((v for k, v in metrics.items() if k.startswith("val/fsp_")),
                                                    float("nan")))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- (c) overhead ----------------------------------------------------------------------------------------------------
def overhead(rounds: int, steps: int, precision: str) -> list[dict]:
    from models import Transformer
    from objectives import BagOfWordsSummary, NextTokenPrediction
    loader = torch.utils.data.DataLoader(RandomTokens(4096, 257), batch_size=16)
    models = {}
    cases = (("ntp", []), ("ntp + bag-of-words (window 16)", [BagOfWordsSummary(window=16)]),
             ("ntp + bag-of-words (window 16, a quarter of the positions)",
              [BagOfWordsSummary(window=16, positions=0.25)]))
    for name, summaries in cases:
        torch.manual_seed(0)
        models[name] = NextTokenPrediction(Transformer(d_model=256, n_layers=4, n_heads=4, max_seq_len=512),
                                           vocab_size=4096, summaries=summaries)
        attach_trainer_for_optimizers(models[name], total_steps=10_000)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(bare_seconds_per_step(model, loader, steps, precision))
    base = statistics.median(times["ntp"])
    return [{"model": name, "s/step": statistics.median(t), "vs ntp": statistics.median(t) / base}
            for name, t in times.items()]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", default="pathstar,code,overhead")
    p.add_argument("--graphs", default="5,8", help="path lengths l of G(2, l, 50)")
    p.add_argument("--runs", default=",".join(PATH_STAR_RUNS), help="path-star runs")
    p.add_argument("--code_runs", default=",".join(CODE_RUNS))
    p.add_argument("--steps", type=int, default=2000, help="path-star steps per run (the path-star table's)")
    p.add_argument("--companion_steps", type=int, default=2000, help="steps of the path-star reverse LM")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-time cap per path-star run")
    p.add_argument("--code_steps", type=int, default=300, help="code-corpus steps per run (the quickstart's)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--code_args", default="", help="extra train.py flags for every code-corpus run (a smaller shape)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overhead_steps", type=int, default=4)
    p.add_argument("--save_dir", default="runs/fsp")
    args = p.parse_args()
    parts, precision = args.parts.split(","), auto_precision()
    out = {}
    if "overhead" in parts:
        out["overhead"] = overhead(args.rounds, args.overhead_steps, precision)
        report(out["overhead"], f"bag-of-words head overhead ({precision}, bare loop, {args.rounds} alternating "
                                f"rounds of {args.overhead_steps} steps, batch 16 x 256)", None)
    if "pathstar" in parts:
        out["pathstar"] = path_star([int(g) for g in args.graphs.split(",")], args.runs.split(","), args.steps,
                                    args.minutes, args.save_dir, args.companion_steps)
        report(out["pathstar"], f"path-star G(2, l, 50): test accuracy (1000 graphs, {precision}, at most "
                                f"{args.steps} steps each)", None)
    if "code" in parts:
        out["code"] = code(args.code_runs.split(","), args.code_steps, [int(s) for s in args.seeds.split(",")],
                           args.save_dir, args.code_args.split())
        report(out["code"], f"code corpus: final val/ntp_loss ({precision}, {args.code_steps} steps each "
                            f"{args.code_args})", None)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
