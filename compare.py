"""Train an experiment's runs on the same data, trunk size, budget and seeds, and write the side-by-side report.

    python compare.py configs/experiments/zoo_code.yaml [--runs ntp,mdlm] [--seeds 0,1] [--dry-run] [--report-only]
        [--test] [--report-dir docs/zoo]
    python compare.py configs/experiments/zoo_*.yaml --report-only --report-dir docs/zoo   # every report, rebuilt

An experiment file names a shared base and the runs:

    name: zoo_code                    # optional, default the file's stem: runs go to runs/<name>/<run>/seed<k>
    description: one line for the report
    base:
      configs: [configs/quickstart.yaml]  # train.py config files every run starts from (after configs/base.yaml)
      args: {trainer.val_check_interval: 100}   # train.py flags every run gets (dotted keys)
      steps: 300                      # the budget: optimizer steps per run ...
      tokens: null                    # ... or stop earlier once this many training tokens are seen
      seeds: [0]
      checkpoint_every: 100           # steps between checkpoints (an interrupted run resumes from the last one)
      future_lens: {train_windows: 64, val_windows: 16, epochs: 6}   # or false
      minutes: 30                     # optional: the stated budget, the time estimate until a run here has finished
      jobs: 2                         # optional: runs trained at a time, cores / jobs threads each (--jobs)
    runs:
      ntp: {model: configs/objectives/ntp.yaml}
      mtp2: {model: configs/objectives/mtp.yaml, args: {model.init_args.n_future: 2}, label: "MTP n=2"}
      mamba: {model: configs/objectives/ntp.yaml, trunk: configs/models/mamba-quickstart.yaml}
      bow: {model: configs/objectives/ntp.yaml, summaries: [configs/summaries/bow.yaml]}
      long: {model: configs/objectives/ntp.yaml, steps: 600}   # a run's own budget instead of base.steps

Each run trains in its own process through train.py (the same Lightning CLI path as a user's run), with the
experiment's callback `RunRecord` added: it logs tokens seen, peak memory and training wall-clock beside the
family's own metrics and marks the run finished. A finished run is skipped; an interrupted one resumes from its
`last.ckpt`. Before training it says how long the runs still to train should take (from the seconds per step of
the runs that finished here, else from `minutes`). After training, every causal run gets the future-lens probes
(lab/future_lens.py). The report is read back from the TensorBoard event files into runs/<name>/report/, or with
`--report-dir DIR` into DIR/<name>/ (the reports kept in the repository: docs/zoo/): report.md, report.json and
PNG plots, each figure beside its floor, the same bytes from the same event files apart from the line that dates
the report. runs/<name>/report/ also gets a custom-scalars layout (TensorBoard's "Custom Scalars" tab) that puts
every run's comparable figures on shared charts: `tensorboard --logdir runs/<name>`. With --report-only (or
--dry-run) several experiment files may be given; one without runs is skipped with a line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lab.experiment import ROOT, RUN_KEYS, ExperimentError, load_experiment  # noqa: F401 (used by tests)
from lab.report import write_report
from lab.runner import (TOKENS_SEEN, WALL_CLOCK, RunRecord, estimate, lens_all, run_dir, state,  # noqa: F401
                        test_all, train_all, train_command)


# --- the command line -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", metavar="experiment",
                   help="an experiment file, e.g. configs/experiments/zoo_code.yaml (several with --report-only)")
    p.add_argument("--runs", help="comma-separated subset of the experiment's runs")
    p.add_argument("--seeds", help="comma-separated seeds instead of the experiment's")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs/<experiment>/ lives")
    p.add_argument("--dry-run", action="store_true", help="print what would run, train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the existing runs")
    p.add_argument("--report-dir", metavar="DIR",
                   help="write the report of experiment NAME to DIR/NAME/ (e.g. docs/zoo) instead of runs/NAME/report/")
    p.add_argument("--steps", type=int, help="a smaller (or larger) budget than the experiment's, in steps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a train.py flag for every run, over the experiment file's (the runs' own included; repeatable), e.g. "
                        "--set data.init_args.batch_size=8; the report names it")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="train N runs at a time, each with 1/N of the CPU cores as threads (default: the experiment "
                        "file's base.jobs, else 1); small models train faster side by side on a CPU")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--test", action="store_true", help="also score every finished run on the test split (once)")
    args = p.parse_args(argv)
    if len(args.experiments) > 1 and not (args.report_only or args.dry_run):
        p.error("several experiment files are read with --report-only (or --dry-run): train one experiment at a time")
    experiments = []
    for path in args.experiments:
        try:
            experiments.append((path, load_experiment(path)))
        except ExperimentError as error:
            p.error(str(error))
    outcomes = [one_experiment(p, args, path, experiment) for path, experiment in experiments]
    if args.dry_run:
        return 0
    failed = any(code == "failed" for code in outcomes)
    return 1 if failed or all(code == "no runs" for code in outcomes) else 0


def one_experiment(p: argparse.ArgumentParser, args, path: str, experiment) -> str:
    """Train (unless --report-only), probe and report one experiment, or print its plan (--dry-run): "reported",
    "failed", "no runs" or "dry run"."""
    names = list(experiment.runs)
    if args.runs:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = [n for n in names if n not in experiment.runs]
        if unknown:
            p.error(f"--runs names {', '.join(unknown)}, not runs of {path}: it has {', '.join(experiment.runs)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else experiment.seeds
    if args.steps:
        experiment.scale_steps(args.steps)
        experiment.overrides.append(f"--steps {args.steps}")
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set takes KEY=VALUE (a train.py flag without its dashes), got {item!r}")
        experiment.set_args[key] = yaml.safe_load(value)
        experiment.overrides.append(f"--set {item}")
    if args.jobs is not None:
        if args.jobs < 1:
            p.error(f"--jobs takes the number of runs trained at a time, 1 or more, got {args.jobs}")
        experiment.jobs = args.jobs
    runs_dir = Path(args.runs_dir).resolve()
    report_dir = Path(args.report_dir).resolve() / experiment.name if args.report_dir else None
    if args.dry_run:
        for name in names:
            for seed in seeds:
                status, last = state(runs_dir, experiment, name, seed)
                print(f"# {name} seed{seed}: {status}" + (f" from {last}" if last else ""))
                if status != "finished":
                    print(" ".join(quote(a) for a in train_command(runs_dir, experiment, name, seed, last)))
        pairs = [(n, s) for n in names for s in seeds]
        print(f"# estimate: {estimate(runs_dir, experiment, pairs, experiment.jobs)}")
        print(f"# then the future lens on each causal run and the report in "
              f"{report_dir or runs_dir / experiment.name / 'report'}")
        return "dry run"
    failed = []
    if not args.report_only:
        failed = train_all(runs_dir, experiment, names, seeds, args.poll, experiment.jobs)
        lens_all(runs_dir, experiment, names, seeds)
    if args.test:
        test_all(runs_dir, experiment, names, seeds)
    folder = write_report(runs_dir, experiment, names, seeds, report_dir)
    if folder is None:
        print(f"[{experiment.name}] no runs under {runs_dir / experiment.name}: no report (python compare.py {path} "
              f"trains them)")
        return "no runs"
    print((folder / "report.md").read_text())
    print(f"report: {folder / 'report.md'}; TensorBoard: tensorboard --logdir {runs_dir / experiment.name}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return "failed" if failed else "reported"


def quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
