"""An experiment file (`configs/experiments/*.yaml`, its format in compare.py's docstring) read into an
`Experiment`: every key known, every config file present, every run complete, or an `ExperimentError` that
names the key and the fix."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent  # config paths in an experiment file are relative to the project

EXPERIMENT_KEYS = {"name": "the experiment's folder under runs/ (default: the file's stem)",
                   "description": "one line for the report", "base": "what every run shares",
                   "runs": "run name -> its objective and overrides"}
BASE_KEYS = {"configs": "train.py config files every run starts from", "args": "train.py flags every run gets",
             "steps": "optimizer steps per run", "tokens": "stop a run once it has seen this many training tokens",
             "seeds": "seeds every run is trained with", "checkpoint_every": "steps between checkpoints",
             "future_lens": "probe settings for causal runs (train_windows, val_windows, epochs, max_k) or false",
             "jobs": "runs trained at a time, each with an equal share of the CPU cores (compare.py --jobs)",
             "minutes": "the stated budget: minutes the whole experiment should take alone (compare.py's estimate "
                        "until a run here has finished)"}
RUN_KEYS = {"model": "an objective config (configs/objectives/*.yaml)", "trunk": "a trunk config (configs/models/)",
            "data": "a data config (configs/data/)", "configs": "more train.py config files",
            "summaries": "future-summary configs to attach (configs/summaries/*.yaml)",
            "args": "train.py flags of this run", "label": "the run's name in the report",
            "headline": "the family's own figure: a scalar tag, or hparams.<name>",
            "steps": "this run's optimizer steps instead of base.steps (a recipe that needs a longer budget)"}
LENS_KEYS = {"train_windows", "val_windows", "epochs", "max_k"}


@dataclass
class Run:
    """One run of an experiment: config files (absolute paths) and train.py flags on top of the base."""
    model: str
    trunk: str | None = None
    data: str | None = None
    configs: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    label: str = ""
    headline: str | None = None  # a scalar tag or hparams.<name>; default: the family's `headline_metric`
    steps: int | None = None  # this run's budget; None: the base's


@dataclass
class Experiment:
    """The shared base (configs, flags, budget, seeds, checkpoints, probe settings) and the runs by name.
    `overrides` lists the command-line changes (a reduced budget) the report names; `set_args` are the command
    line's train.py flags (`compare.py --set`), which every run gets after its own."""
    name: str
    description: str
    configs: list[str]
    args: dict
    steps: int
    tokens: int | None
    seeds: list[int]
    checkpoint_every: int
    future_lens: dict | None
    minutes: float | None = None
    jobs: int = 1
    runs: dict[str, Run] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    set_args: dict = field(default_factory=dict)

    def run_steps(self, name: str) -> int:
        """The optimizer steps run `name` trains for: its own `steps`, else the base's."""
        return self.runs[name].steps or self.steps

    def scale_steps(self, steps: int) -> None:
        """A new budget of `steps` for the base (compare.py --steps); a run with its own budget keeps its ratio
        to the base's, so that a reduced check of the experiment stays in proportion."""
        for run in self.runs.values():
            if run.steps:
                run.steps = max(1, round(run.steps * steps / self.steps))
        if self.minutes:  # the stated budget was for the file's steps
            self.minutes *= steps / self.steps
        self.steps = steps


class ExperimentError(ValueError):
    pass


# --- the experiment file ---------------------------------------------------------------------------------------------
def check_keys(where: str, given: dict, known: dict | set) -> None:
    if not isinstance(given, dict):
        raise ExperimentError(f"{where} must be a mapping, got {type(given).__name__}: {given!r}")
    unknown = sorted(set(given) - set(known))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in known.items()) if isinstance(known, dict) else ", ".join(sorted(known))
        raise ExperimentError(f"unknown key {', '.join(map(repr, unknown))} in {where}. Known keys: {listing}")


def config_file(where: str, path) -> str:
    if not isinstance(path, str) or not (ROOT / path).is_file() and not Path(path).is_file():
        raise ExperimentError(f"{where}: no config file {path!r} (paths are relative to {ROOT})")
    return str(ROOT / path) if (ROOT / path).is_file() else str(Path(path).resolve())


def load_experiment(path: str) -> Experiment:
    """The experiment file, checked: every key known, every config file present, every run complete."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    where = f"experiment file {path}"
    check_keys(where, spec, EXPERIMENT_KEYS)
    base, runs = spec.get("base") or {}, spec.get("runs")
    check_keys(f"{where}: base", base, BASE_KEYS)
    if not runs or not isinstance(runs, dict):
        raise ExperimentError(f"{where} names no runs: add a `runs:` mapping of run name -> "
                              f"{{{', '.join(RUN_KEYS)}}}")
    if not isinstance(base.get("args") or {}, dict):
        raise ExperimentError(f"{where}: base.args must map train.py flags (dotted keys) to values")
    if "steps" not in base:
        raise ExperimentError(f"{where}: base needs `steps` (the optimizer steps every run trains for)")
    minutes = base.get("minutes")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0):
        raise ExperimentError(f"{where}: base.minutes must be a positive number of minutes, got {minutes!r}")
    jobs = base.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ExperimentError(f"{where}: base.jobs must be a whole number of runs trained at a time (1 or more), "
                              f"got {jobs!r}")
    lens = base.get("future_lens", {})
    if lens:
        check_keys(f"{where}: base.future_lens", lens, LENS_KEYS)
    experiment = Experiment(
        name=spec.get("name") or Path(path).stem, description=spec.get("description", ""),
        configs=[config_file(f"{where}: base.configs", c) for c in as_list(base.get("configs"))],
        args=base.get("args") or {}, steps=int(base["steps"]), tokens=base.get("tokens"),
        seeds=[int(s) for s in as_list(base.get("seeds", [0]))],
        checkpoint_every=int(base.get("checkpoint_every", max(1, int(base["steps"]) // 4))),
        future_lens=({"train_windows": 64, "val_windows": 16, "epochs": 6, "max_k": 8, **lens}
                     if lens is not False else None),
        minutes=None if minutes is None else float(minutes), jobs=jobs)
    for name, run in runs.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ExperimentError(f"{where}: run name {name!r} must be letters, digits, - and _ (it names a folder)")
        check_keys(f"{where}: run {name!r}", run, RUN_KEYS)
        if "model" not in run:
            raise ExperimentError(f"{where}: run {name!r} has no `model` (an objective config, e.g. "
                                  f"configs/objectives/ntp.yaml). Known keys: {', '.join(RUN_KEYS)}")
        if not isinstance(run.get("args") or {}, dict):
            raise ExperimentError(f"{where}: run {name!r}: `args` must map train.py flags (dotted keys) to values")
        steps = run.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ExperimentError(f"{where}: run {name!r}: `steps` must be a positive whole number of optimizer "
                                  f"steps, got {steps!r} (leave it out to train base.steps)")
        experiment.runs[name] = Run(
            model=config_file(f"{where}: run {name!r}: model", run["model"]),
            trunk=config_file(f"{where}: run {name!r}: trunk", run["trunk"]) if "trunk" in run else None,
            data=config_file(f"{where}: run {name!r}: data", run["data"]) if "data" in run else None,
            configs=[config_file(f"{where}: run {name!r}: configs", c) for c in as_list(run.get("configs"))],
            summaries=[config_file(f"{where}: run {name!r}: summaries", c) for c in as_list(run.get("summaries"))],
            args=run.get("args") or {}, label=run.get("label", name), headline=run.get("headline"),
            steps=steps)
    return experiment


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def flag_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
