"""Path-star G(2, 5, 50) (Bachmann & Nagarajan 2024, "The Pitfalls of Next-Token Prediction"): test accuracy of
exact-match generated paths for each objective, trained on the same model, data and budget.

    python -m benchmarks.path_star [--runs ntp,reverse,teacherless,mtp,mdlm] [--steps 2000] [--minutes 10] [--json F]

Each run is an experiment config under configs/experiments/ (`path_star_<run>.yaml`), trained for `steps` optimizer
steps or `minutes` of wall time, whichever ends first, then scored on the held-out test graphs (1000) with the
objective's own greedy `generate()` (teacherless decoding for the teacherless model). The paper's finding:
teacher-forced NTP learns the "Clever Hans" shortcut and stalls near 1/degree = 50%; the reversed answer solves
the task; masked diffusion (the `mdlm` run) is reported to solve planning tasks where autoregression fails. Add
a run with `--runs name` and a `configs/experiments/path_star_<name>.yaml`.
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import parser, report
from lab import cli as train
from objectives.training import metrics as M
from objectives.training.callbacks import auto_precision

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
CHANCE = 1 / 2  # picking one of the degree-2 arms at random
BUDGET_STEPS, BUDGET_MINUTES = 2000, 10.0  # per run, whichever ends first


def train_and_test(run: str, steps: int, minutes: float, save_dir: str, test_size: int = 1000,
                   extra_args: tuple[str, ...] = (), config: Path | None = None) -> dict:
    """Train one run (`config`, by default `path_star_<run>.yaml`, with `extra_args` appended) and test it."""
    config = config or EXPERIMENTS / f"path_star_{run}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no experiment config {config} for run {run!r}: add it or drop the run from --runs")
    start = time.perf_counter()
    cli = train.main(["fit", "-c", str(config), "--trainer.max_steps", str(steps),
                      "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                      "--trainer.logger.init_args.save_dir", save_dir, "--trainer.enable_progress_bar", "false",
                      "--data.init_args.test_size", str(test_size), *extra_args])
    seconds = time.perf_counter() - start
    metrics = cli.trainer.callback_metrics
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"run": run, "objective": type(cli.model).__name__, "steps": cli.trainer.global_step,
            "train min": seconds / 60, "val/loss": float(metrics.get(M.VAL_LOSS, float("nan"))),
            "test accuracy": tested[M.TEST_ACCURACY], "answer tokens": tested[M.TEST_ANSWER_TOKENS]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", default="ntp,reverse,teacherless,mtp,mdlm")
    p.add_argument("--steps", type=int, default=BUDGET_STEPS)
    p.add_argument("--minutes", type=float, default=BUDGET_MINUTES)
    p.add_argument("--save_dir", default="runs", help="TensorBoard logs and checkpoints go under this folder")
    p.add_argument("--test_size", type=int, default=1000, help="held-out test graphs")
    args = p.parse_args()
    rows = [train_and_test(run, args.steps, args.minutes, args.save_dir, args.test_size)
            for run in args.runs.split(",")]
    report(rows, f"path-star G(2, 5, 50): test accuracy of generated paths ({args.test_size} graphs, "
                 f"chance {CHANCE:.0%}; "
                 f"{auto_precision()}, at most {args.steps} steps / {args.minutes:g} min each)", args.json)


if __name__ == "__main__":
    main()
