"""Train an experiment's runs on the same data, trunk size, budget and seeds, and write the side-by-side report.

    python compare.py configs/experiments/zoo_code.yaml [--runs ntp,mdlm] [--seeds 0,1] [--dry-run] [--report-only]

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
    runs:
      ntp: {model: configs/objectives/ntp.yaml}
      mtp2: {model: configs/objectives/mtp.yaml, args: {model.init_args.n_future: 2}, label: "MTP n=2"}
      mamba: {model: configs/objectives/ntp.yaml, trunk: configs/models/mamba-quickstart.yaml}
      bow: {model: configs/objectives/ntp.yaml, summaries: [configs/summaries/bow.yaml]}

Each run trains in its own process through train.py (the same Lightning CLI path as a user's run), with the
experiment's callback `RunRecord` added: it logs tokens seen, peak memory and training wall-clock beside the
family's own metrics and marks the run finished. A finished run is skipped; an interrupted one resumes from its
`last.ckpt`. After training, every causal run gets the future-lens probes (benchmarks/future_lens.py). The report
is read back from the TensorBoard event files into runs/<name>/report/: report.md, report.json, PNG plots, and a
custom-scalars layout (TensorBoard's "Custom Scalars" tab) that puts every run's comparable figures on shared
charts: `tensorboard --logdir runs/<name>`.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from objectives.training import metrics as M
from objectives.training.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parent
TRAIN = ROOT / "train.py"
BASE_CONFIG = ROOT / "configs" / "base.yaml"

EXPERIMENT_KEYS = {"name": "the experiment's folder under runs/ (default: the file's stem)",
                   "description": "one line for the report", "base": "what every run shares",
                   "runs": "run name -> its objective and overrides"}
BASE_KEYS = {"configs": "train.py config files every run starts from", "args": "train.py flags every run gets",
             "steps": "optimizer steps per run", "tokens": "stop a run once it has seen this many training tokens",
             "seeds": "seeds every run is trained with", "checkpoint_every": "steps between checkpoints",
             "future_lens": "probe settings for causal runs (train_windows, val_windows, epochs, max_k) or false"}
RUN_KEYS = {"model": "an objective config (configs/objectives/*.yaml)", "trunk": "a trunk config (configs/models/)",
            "data": "a data config (configs/data/)", "configs": "more train.py config files",
            "summaries": "future-summary configs to attach (configs/summaries/*.yaml)",
            "args": "train.py flags of this run", "label": "the run's name in the report",
            "headline": "the family's own figure: a scalar tag, or hparams.<name>"}
LENS_KEYS = {"train_windows", "val_windows", "epochs", "max_k"}

# the tags RunRecord logs at every validation (and at the end), beside the family's own metrics
TOKENS_SEEN, PEAK_MEMORY, WALL_CLOCK = "perf/tokens_seen", "perf/peak_memory_mib", "perf/wall_clock_s"
FUTURE_LENS = "future_lens/k{}_acc"  # held-out accuracy of the probe h_t -> x_(t+k)
REPORT_LENS_KS = (2, 4)

# the family's own headline figure: a scalar tag, or hparams.<name> for a setting (sampling steps)
HEADLINES = {"MultiTokenPrediction": (M.ACCEPT_LEN_TEACHER_FORCED, "accepted length (teacher-forced)"),
             "DeepSeekMTP": (M.ACCEPT_LEN_TEACHER_FORCED, "accepted length (teacher-forced)"),
             "Coconut": ("train/coconut_stage", "latent stage"),
             "MaskedDiffusion": ("hparams.sampling_steps", "sampling steps"),
             "DiffusionLM": ("hparams.sampling_steps", "sampling steps")}
REASONING_HEADLINE = (M.VAL_ANSWER_TOKENS, "answer tokens")


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


def load_experiment(path: str) -> dict:
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
    lens = base.get("future_lens", {})
    if lens:
        check_keys(f"{where}: base.future_lens", lens, LENS_KEYS)
    experiment = {
        "name": spec.get("name") or Path(path).stem, "description": spec.get("description", ""),
        "configs": [config_file(f"{where}: base.configs", c) for c in as_list(base.get("configs"))],
        "args": base.get("args") or {}, "steps": int(base["steps"]), "tokens": base.get("tokens"),
        "seeds": [int(s) for s in as_list(base.get("seeds", [0]))],
        "checkpoint_every": int(base.get("checkpoint_every", max(1, int(base["steps"]) // 4))),
        "future_lens": ({"train_windows": 64, "val_windows": 16, "epochs": 6, "max_k": 8, **lens}
                        if lens is not False else None),
        "runs": {}, "overrides": [],
    }
    for name, run in runs.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ExperimentError(f"{where}: run name {name!r} must be letters, digits, - and _ (it names a folder)")
        check_keys(f"{where}: run {name!r}", run, RUN_KEYS)
        if "model" not in run:
            raise ExperimentError(f"{where}: run {name!r} has no `model` (an objective config, e.g. "
                                  f"configs/objectives/ntp.yaml). Known keys: {', '.join(RUN_KEYS)}")
        if not isinstance(run.get("args") or {}, dict):
            raise ExperimentError(f"{where}: run {name!r}: `args` must map train.py flags (dotted keys) to values")
        experiment["runs"][name] = {
            "model": config_file(f"{where}: run {name!r}: model", run["model"]),
            "trunk": config_file(f"{where}: run {name!r}: trunk", run["trunk"]) if "trunk" in run else None,
            "data": config_file(f"{where}: run {name!r}: data", run["data"]) if "data" in run else None,
            "configs": [config_file(f"{where}: run {name!r}: configs", c) for c in as_list(run.get("configs"))],
            "summaries": [config_file(f"{where}: run {name!r}: summaries", c) for c in as_list(run.get("summaries"))],
            "args": run.get("args") or {}, "label": run.get("label", name), "headline": run.get("headline"),
        }
    return experiment


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def flag_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --- one run: the train.py command, and the callback that records it -----------------------------------------------------
def run_dir(runs_dir: Path, experiment: dict, run: str, seed: int) -> Path:
    return runs_dir / experiment["name"] / run / f"seed{seed}"


def callbacks(experiment: dict, configs: list[str]) -> list[dict]:
    """The trainer's callbacks of the last config that sets them, with checkpoints every `checkpoint_every` steps
    (and `last.ckpt`), plus RunRecord."""
    found = yaml.safe_load(BASE_CONFIG.read_text())["trainer"]["callbacks"]
    for config in configs:
        trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
        found = trainer.get("callbacks", found)
    out = []
    for callback in found:
        callback = dict(callback)
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"] = {**(callback.get("init_args") or {}), "save_last": True,
                                     "every_n_train_steps": experiment["checkpoint_every"]}
        out.append(callback)
    return out + [{"class_path": "compare.RunRecord", "init_args": {"max_tokens": experiment["tokens"]}}]


def train_command(runs_dir: Path, experiment: dict, name: str, seed: int, resume: Path | None = None) -> list[str]:
    run, out = experiment["runs"][name], run_dir(runs_dir, experiment, name, seed)
    configs = [*experiment["configs"], *run["configs"]]
    cmd = [sys.executable, str(TRAIN), "fit"]
    for config in configs:
        cmd += ["--config", config]
    cmd += ["--model", run["model"]]
    for key, value in experiment["args"].items():
        cmd += [f"--{key}", flag_value(value)]
    if run["trunk"]:  # a run's own trunk and data replace the base's
        cmd += ["--model.init_args.trunk", run["trunk"]]
    if run["data"]:
        cmd += ["--data", run["data"]]
    for summary in run["summaries"]:
        cmd += [f"--model.init_args.summaries+={summary}"]
    for key, value in run["args"].items():
        cmd += [f"--{key}", flag_value(value)]
    cmd += ["--trainer.callbacks", json.dumps(callbacks(experiment, configs)),
            "--trainer.max_steps", str(experiment["steps"]), "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(out.parent.parent), "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", out.name, "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false"]
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    return cmd


class RunRecord(L.Callback):
    """Added to every run of an experiment: logs the training tokens seen, the peak memory and the training
    wall-clock (kept across resumes) at every validation and at the end, writes `progress.json` for the progress
    line, stops at `max_tokens`, and writes `run.json` (family, trunk, parameters, finished) in the log folder."""

    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens
        self.tokens, self.seconds, self.started, self.written = 0, 0.0, None, 0.0

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.seconds = int(state["tokens"]), float(state["seconds"])

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    @staticmethod
    def folder(trainer) -> Path | None:
        return Path(trainer.logger.log_dir) if trainer.logger is not None and trainer.is_global_zero else None

    def write(self, trainer, pl_module, finished: bool) -> None:
        folder = self.folder(trainer)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        info = {"family": type(pl_module).__name__, "trunk": type(pl_module.trunk).__name__,
                "d_model": getattr(pl_module.trunk, "d_model", None),
                "n_layers": len(getattr(pl_module.trunk, "blocks", [])),
                "parameters": sum(p.numel() for p in pl_module.parameters()),
                "causal": "full" not in pl_module.required_masks,
                "hparams": {k: v for k, v in pl_module.hparams.items() if isinstance(v, (int, float, str, bool))},
                "steps": trainer.global_step, "max_steps": trainer.max_steps, "tokens_seen": self.tokens,
                "wall_clock_s": self.elapsed(), "peak_memory_mib": peak_memory_mib(pl_module.device),
                "finished": finished}
        (folder / "run.json").write_text(json.dumps(info, indent=1))

    def figures(self, pl_module) -> dict[str, float]:
        return {TOKENS_SEEN: float(self.tokens), WALL_CLOCK: self.elapsed(), PEAK_MEMORY: peak_memory_mib(pl_module.device)}

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()
        self.write(trainer, pl_module, finished=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["tokens"].numel()) * trainer.world_size
        if self.max_tokens and self.tokens >= self.max_tokens:
            trainer.should_stop = True
        folder = self.folder(trainer)
        if folder is not None and time.perf_counter() - self.written > 2.0:
            self.written = time.perf_counter()
            (folder / "progress.json").write_text(json.dumps(
                {"step": trainer.global_step, "max_steps": trainer.max_steps, "seconds": self.elapsed()}))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # logged through Lightning: the same step as the validation's metrics
            for name, value in self.figures(pl_module).items():
                pl_module.log(name, value, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.logger is not None:  # the totals, validation or not
            trainer.logger.log_metrics(self.figures(pl_module), step=trainer.global_step)
        self.write(trainer, pl_module, finished=True)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set (the run is its own process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def state(runs_dir: Path, experiment: dict, name: str, seed: int) -> tuple[str, Path | None]:
    """("finished", None), ("resume", last.ckpt) or ("new", None)."""
    out = run_dir(runs_dir, experiment, name, seed)
    info = read_json(out / "run.json")
    if info and info.get("finished"):
        return "finished", None
    last = out / "checkpoints" / "last.ckpt"
    return ("resume", last) if last.is_file() else ("new", None)


# --- training the experiment --------------------------------------------------------------------------------------------
def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_all(runs_dir: Path, experiment: dict, names: list[str], seeds: list[int], poll: float = 5.0) -> list[str]:
    """Train every (run, seed) that is not finished, one process each; returns the ones that failed."""
    jobs = [(n, s) for n in names for s in seeds]
    todo = [(n, s) for n, s in jobs if state(runs_dir, experiment, n, s)[0] != "finished"]
    for n, s in jobs:
        if (n, s) not in todo:
            print(f"[{experiment['name']}] {n} seed{s}: finished, skipped", flush=True)
    done_steps, busy, failed = 0, 0.0, []
    for i, (name, seed) in enumerate(todo):
        status, last = state(runs_dir, experiment, name, seed)
        out = run_dir(runs_dir, experiment, name, seed)
        out.mkdir(parents=True, exist_ok=True)
        if status == "new":  # an attempt that died before its first checkpoint starts over, without its old events
            for stale in glob.glob(str(out / "events.out.tfevents.*")):
                os.remove(stale)
        start_step = int(load_checkpoint(last)["global_step"]) if last else 0
        print(f"[{experiment['name']} {i + 1}/{len(todo)}] {name} seed{seed}: "
              f"{'resuming from ' + str(last) + f' (step {start_step})' if last else 'training'}", flush=True)
        (out / "progress.json").unlink(missing_ok=True)
        started = time.perf_counter()
        with open(out / "train.log", "a") as log:
            process = subprocess.Popen(train_command(runs_dir, experiment, name, seed, last), cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT)
            step = start_step
            while process.poll() is None:
                time.sleep(poll)
                step = (read_json(out / "progress.json") or {}).get("step", step)
                run_seconds = time.perf_counter() - started
                trained = done_steps + step - start_step  # steps trained by this invocation so far
                rate = (busy + run_seconds) / trained if trained > 0 else None
                remaining = experiment["steps"] - step + experiment["steps"] * (len(todo) - i - 1)
                eta = clock(rate * remaining) if rate else "--"
                print(f"[{experiment['name']} {i + 1}/{len(todo)}] {name} seed{seed}: step {step}/"
                      f"{experiment['steps']}, {clock(run_seconds)} in this run, experiment ETA {eta}", flush=True)
        busy += time.perf_counter() - started
        done_steps += experiment["steps"] - start_step
        if process.returncode != 0 or state(runs_dir, experiment, name, seed)[0] != "finished":
            tail = (out / "train.log").read_text(errors="replace").splitlines()[-5:]
            print(f"[{experiment['name']}] {name} seed{seed} FAILED (exit {process.returncode}); "
                  f"log {out / 'train.log'}:\n  " + "\n  ".join(tail), flush=True)
            failed.append(f"{name} seed{seed}")
        else:  # probe it now, so that an experiment stopped later still has this run's figures
            lens_all(runs_dir, experiment, [name], [seed])
    return failed


def lens_all(runs_dir: Path, experiment: dict, names: list[str], seeds: list[int]) -> None:
    """Future-lens probes for every finished causal run that has none yet, written as future_lens.json and as
    scalars in the run's folder."""
    settings = experiment["future_lens"]
    if not settings:
        return
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.future_lens import future_lens
    for name in names:
        for seed in seeds:
            out = run_dir(runs_dir, experiment, name, seed)
            info = read_json(out / "run.json") or {}
            if not info.get("finished") or not info.get("causal") or (out / "future_lens.json").is_file():
                continue
            print(f"[{experiment['name']}] {name} seed{seed}: future lens", flush=True)
            started = time.perf_counter()
            try:
                results = future_lens(str(out / "checkpoints" / "last.ckpt"), settings["max_k"],
                                      settings["train_windows"], settings["val_windows"], settings["epochs"], seed)
            except Exception as error:  # the report still comes out, without this run's probe
                print(f"[{experiment['name']}] {name} seed{seed}: future lens failed: {error}", flush=True)
                continue
            writer = SummaryWriter(str(out), filename_suffix=".future_lens")
            for k, r in results.items():
                writer.add_scalar(FUTURE_LENS.format(k), r["accuracy"], info["steps"])
            writer.close()
            (out / "future_lens.json").write_text(json.dumps(
                {"settings": settings, "seconds": time.perf_counter() - started,
                 "results": {str(k): r for k, r in results.items()}}, indent=1))


# --- reading the runs back -------------------------------------------------------------------------------------------------
def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every finite scalar in the event files of one run folder: tag -> [(step, value)] by step; where a resumed
    run logged a step twice, the later write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for e in accumulator.Scalars(tag):
                if math.isfinite(e.value) and (e.step not in by_tag.setdefault(tag, {})
                                               or by_tag[tag][e.step][0] <= e.wall_time):
                    by_tag[tag][e.step] = (e.wall_time, e.value)
    return {tag: sorted((step, v) for step, (_, v) in values.items()) for tag, values in by_tag.items()}


def summarise(values: list[float | None]) -> dict | None:
    """Mean and spread (sample standard deviation; 0 with one seed) over seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def seed_figures(folder: Path, run: dict) -> dict:
    """The figures of one (run, seed), all from its event files except the static facts in run.json."""
    info = read_json(folder / "run.json") or {}
    scalars = read_scalars(folder)
    last = lambda tag: scalars[tag][-1][1] if scalars.get(tag) else None  # noqa: E731
    best = lambda tag: min(v for _, v in scalars[tag]) if scalars.get(tag) else None  # noqa: E731
    throughput = [v for _, v in scalars.get(M.TOKENS_PER_SEC, [])]
    figures = {M.VAL_BPB: last(M.VAL_BPB), "best val/bpb": best(M.VAL_BPB), M.VAL_NTP_LOSS: last(M.VAL_NTP_LOSS),
               M.VAL_NLL_BOUND: last(M.VAL_NLL_BOUND), M.VAL_ACCURACY: last(M.VAL_ACCURACY),
               "tokens seen": last(TOKENS_SEEN), "tokens/s": statistics.median(throughput) if throughput else None,
               "peak memory MiB": last(PEAK_MEMORY), "wall-clock s": last(WALL_CLOCK),
               "steps": max((s for values in scalars.values() for s, _ in values), default=0)}
    for k in REPORT_LENS_KS:
        figures[f"future lens k={k}"] = last(FUTURE_LENS.format(k))
    tag, _ = headline(run, info, scalars)
    if tag is not None:
        figures["headline"] = (info.get("hparams", {}).get(tag.split(".", 1)[1]) if tag.startswith("hparams.")
                               else last(tag))
    return {"info": info, "figures": figures, "scalars": scalars}


def headline(run: dict, info: dict, scalars: dict) -> tuple[str | None, str | None]:
    """The family's own figure: the run's `headline`, else the family's default, else answer tokens on reasoning
    data. Returns (tag or hparams.<name>, label)."""
    if run.get("headline"):
        return run["headline"], run["headline"]
    tag, label = HEADLINES.get(info.get("family"), (None, None))
    if tag is not None and (tag.startswith("hparams.") or tag in scalars):
        return tag, label
    return REASONING_HEADLINE if REASONING_HEADLINE[0] in scalars else (None, None)


def collect(runs_dir: Path, experiment: dict, names: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for name in names:
        run = experiment["runs"][name]
        per_seed = {s: seed_figures(run_dir(runs_dir, experiment, name, s), run) for s in seeds
                    if run_dir(runs_dir, experiment, name, s).is_dir()}
        if not per_seed:
            continue
        info = next(iter(per_seed.values()))["info"]
        first = next(iter(per_seed.values()))
        tag, label = headline(run, info, first["scalars"])
        keys = list(first["figures"])
        rows.append({
            "run": name, "label": run["label"], "family": info.get("family"), "trunk": info.get("trunk"),
            "d_model": info.get("d_model"), "n_layers": info.get("n_layers"), "parameters": info.get("parameters"),
            "causal": info.get("causal"), "seeds": sorted(per_seed),
            "finished": all((p["info"] or {}).get("finished") for p in per_seed.values()),
            "likelihood": "bound" if any(p["figures"][M.VAL_NLL_BOUND] is not None for p in per_seed.values())
            else "likelihood",
            "headline_tag": tag, "headline_label": label,
            "figures": {k: summarise([p["figures"].get(k) for p in per_seed.values()]) for k in keys},
            "curves": {str(s): {t: p["scalars"].get(t, []) for t in (M.VAL_BPB, M.VAL_ACCURACY, TOKENS_SEEN)}
                       for s, p in per_seed.items()},
        })
    return rows


# --- the report ------------------------------------------------------------------------------------------------------------
def cell(summary: dict | None, digits: int = 3, prefix: str = "") -> str:
    if summary is None:
        return "-"
    fmt = lambda v: f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"  # noqa: E731
    text = prefix + fmt(summary["mean"])
    return text + f" ± {fmt(summary['std'])}" if summary["n"] > 1 else text


def markdown(experiment: dict, rows: list[dict]) -> str:
    columns = ["run", "family", "trunk", "params", "tokens seen", "final val/bpb", "best val/bpb",
               M.VAL_NTP_LOSS, "val/nll_bound (bound)", M.VAL_ACCURACY, "tokens/s", "peak MiB", "wall-clock",
               "future lens k=2", "future lens k=4", "family's figure"]
    reduced = (f"Run with {' '.join(experiment['overrides'])} on top of the experiment file (a reduced budget)."
               if experiment.get("overrides") else "")
    lines = [f"# {experiment['name']}", "", experiment["description"], "", *([reduced, ""] if reduced else []),
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        f, bound = row["figures"], row["likelihood"] == "bound"
        trunk = f"{row['trunk']} d{row['d_model']}x{row['n_layers']}" if row["trunk"] else "-"
        wall = f["wall-clock s"]
        h = f.get("headline")
        figure = (f"{row['headline_label']} {cell(h, 0 if h and float(h['mean']).is_integer() else 2)}"
                  if row["headline_tag"] else "-")
        values = [row["label"] + ("" if row["finished"] else " (unfinished)"), row["family"] or "-", trunk,
                  f"{row['parameters'] / 1e6:.2f}M" if row["parameters"] else "-",
                  cell(f["tokens seen"], 0), cell(f[M.VAL_BPB], 3, "≤ " if bound else ""),
                  cell(f["best val/bpb"], 3, "≤ " if bound else ""), cell(f[M.VAL_NTP_LOSS]),
                  cell(f[M.VAL_NLL_BOUND], 3, "≤ " if bound else ""), cell(f[M.VAL_ACCURACY]),
                  cell(f["tokens/s"], 0), cell(f["peak memory MiB"], 0),
                  clock(wall["mean"]) if wall else "-", cell(f["future lens k=2"]), cell(f["future lens k=4"]),
                  figure]
        lines.append("| " + " | ".join(values) + " |")
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines += ["", f"Seeds: {', '.join(map(str, seeds))} (a ± is the standard deviation over seeds). "
              "`val/ntp_loss` is the next-token NLL in nats/token; `val/nll_bound` is an upper bound on the NLL "
              "(diffusion families), and their `val/bpb` (marked ≤) is the same bound in bits per byte, not a "
              "likelihood. Future lens: held-out accuracy of a linear probe from the trunk's hidden state at t to "
              "the token at t+k (causal runs). Peak memory: allocated GPU memory, or the process's peak resident "
              "set on CPU. Wall-clock: training time, validation included, data preparation not."]
    return "\n".join(lines) + "\n"


def tokens_at(curves: dict, steps: list[int]) -> list[float]:
    """Tokens seen at each step, interpolated from the run's perf/tokens_seen points."""
    import numpy as np
    points = curves.get(TOKENS_SEEN) or []
    if not points:
        return [float("nan")] * len(steps)
    xs, ys = zip(*points)
    slope = ys[-1] / xs[-1] if xs[-1] else 0.0
    return [float(np.interp(s, (0, *xs), (0, *ys))) if s <= xs[-1] else s * slope for s in steps]


def plot(rows: list[dict], tag: str, ylabel: str, path: Path, title: str) -> bool:
    """`tag` against tokens seen, one line per run (the mean over seeds) and a band from the lowest to the highest
    seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for row in rows:
        series = []
        for curves in row["curves"].values():
            points = curves.get(tag) or []
            if points:
                steps, values = zip(*points)
                series.append((tokens_at(curves, list(steps)), list(values)))
        if not series:
            continue
        grid = np.array(series[0][0])
        values = np.array([np.interp(grid, x, y) for x, y in series])
        line, = ax.plot(grid, values.mean(0), marker="o", markersize=3,
                        label=row["label"] + (" (bound)" if row["likelihood"] == "bound" and tag == M.VAL_BPB else ""))
        if len(series) > 1:
            ax.fill_between(grid, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
        drawn = True
    if drawn:
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def layout(experiment: dict) -> dict:
    """TensorBoard custom-scalars layout: the comparable figures of every run of the experiment on shared charts
    (each chart's tags are regular expressions matched in every run)."""
    return {f"{experiment['name']}: comparison": {
        "val/bpb (diffusion families: a bound)": ["Multiline", [r"^val/bpb$"]],
        "likelihood and bound: val/ntp_loss beside val/nll_bound": ["Multiline", [r"^val/ntp_loss$", r"^val/nll_bound$"]],
        "val/accuracy (reasoning data)": ["Multiline", [r"^val/accuracy$"]],
        "future lens: probe accuracy of x(t+k) from h(t)": ["Multiline", [r"^future_lens/"]],
        "training tokens/s": ["Multiline", [r"^perf/tokens_per_sec$"]],
        "training tokens seen": ["Multiline", [r"^perf/tokens_seen$"]],
    }}


def write_layout(folder: Path, experiment: dict) -> None:
    """The layout as its own small event file in the report folder (a run named `report` in TensorBoard)."""
    from torch.utils.tensorboard import SummaryWriter
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(folder))
    writer.add_custom_scalars(layout(experiment))
    writer.close()


def write_report(runs_dir: Path, experiment: dict, names: list[str], seeds: list[int]) -> Path:
    folder = runs_dir / experiment["name"] / "report"
    folder.mkdir(parents=True, exist_ok=True)
    rows = collect(runs_dir, experiment, names, seeds)
    if not rows:
        raise SystemExit(f"no runs of {experiment['name']} under {runs_dir / experiment['name']}: train them first "
                         f"(python compare.py EXPERIMENT without --report-only)")
    plots = []
    if plot(rows, M.VAL_BPB, "val/bpb (bits per byte)", folder / "val_bpb.png",
            f"{experiment['name']}: val/bpb against training tokens"):
        plots.append("val_bpb.png")
    if plot(rows, M.VAL_ACCURACY, "val/accuracy (exact match)", folder / "val_accuracy.png",
            f"{experiment['name']}: val/accuracy against training tokens"):
        plots.append("val_accuracy.png")
    text = markdown(experiment, rows) + "".join(f"\n![{p}]({p})\n" for p in plots)
    (folder / "report.md").write_text(text)
    (folder / "report.json").write_text(json.dumps(
        {"experiment": experiment["name"], "description": experiment["description"], "steps": experiment["steps"],
         "overrides": experiment.get("overrides", []),
         "plots": plots, "rows": rows}, indent=1))
    write_layout(folder, experiment)
    return folder


# --- the command line -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="an experiment file, e.g. configs/experiments/zoo_code.yaml")
    p.add_argument("--runs", help="comma-separated subset of the experiment's runs")
    p.add_argument("--seeds", help="comma-separated seeds instead of the experiment's")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs/<experiment>/ lives")
    p.add_argument("--dry-run", action="store_true", help="print what would run, train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the existing runs")
    p.add_argument("--steps", type=int, help="a smaller (or larger) budget than the experiment's, in steps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a train.py flag for every run on top of the experiment's base (repeatable), e.g. "
                        "--set data.init_args.batch_size=8; the report names it")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as error:
        p.error(str(error))
    names = list(experiment["runs"])
    if args.runs:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = [n for n in names if n not in experiment["runs"]]
        if unknown:
            p.error(f"--runs names {', '.join(unknown)}, not runs of {args.experiment}: it has {', '.join(experiment['runs'])}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else experiment["seeds"]
    if args.steps:
        experiment["steps"] = args.steps
        experiment["overrides"].append(f"--steps {args.steps}")
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set takes KEY=VALUE (a train.py flag without its dashes), got {item!r}")
        experiment["args"][key] = yaml.safe_load(value)
        experiment["overrides"].append(f"--set {item}")
    runs_dir = Path(args.runs_dir).resolve()
    if args.dry_run:
        for name in names:
            for seed in seeds:
                status, last = state(runs_dir, experiment, name, seed)
                print(f"# {name} seed{seed}: {status}" + (f" from {last}" if last else ""))
                if status != "finished":
                    print(" ".join(quote(a) for a in train_command(runs_dir, experiment, name, seed, last)))
        print(f"# then the future lens on each causal run and the report in {runs_dir / experiment['name'] / 'report'}")
        return 0
    failed = []
    if not args.report_only:
        failed = train_all(runs_dir, experiment, names, seeds, args.poll)
        lens_all(runs_dir, experiment, names, seeds)
    folder = write_report(runs_dir, experiment, names, seeds)
    print((folder / "report.md").read_text())
    print(f"report: {folder / 'report.md'}; TensorBoard: tensorboard --logdir {runs_dir / experiment['name']}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
