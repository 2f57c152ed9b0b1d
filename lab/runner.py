"""Training an experiment's runs: one train.py process per (run, seed) with the `RunRecord` callback, resumed
from its last checkpoint when interrupted and skipped when finished, then the future-lens probe of each causal
run (`lab/future_lens.py`)."""
from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml

from lab.experiment import ROOT, Experiment, flag_value
from objectives.training.checkpoints import load_checkpoint

TRAIN = ROOT / "train.py"
BASE_CONFIG = ROOT / "configs" / "base.yaml"

# the tags RunRecord logs at every validation (and at the end), beside the family's own metrics
TOKENS_SEEN, PEAK_MEMORY, WALL_CLOCK = "perf/tokens_seen", "perf/peak_memory_mib", "perf/wall_clock_s"
FUTURE_LENS = "future_lens/k{}_acc"  # held-out accuracy of the probe h_t -> x_(t+k)
REPORT_LENS_KS = (2, 4)
START_UP_S = 15  # a run's process start, imports and data preparation, which its wall_clock_s leaves out
RUNS_AT_ONCE = "BEYOND_NTP_RUNS_AT_ONCE"  # set by compare.py for its runs' processes: how many train side by side


# --- one run: the train.py command, and the callback that records it -----------------------------------------------------
def run_dir(runs_dir: Path, experiment: Experiment, run: str, seed: int) -> Path:
    return runs_dir / experiment.name / run / f"seed{seed}"


def callbacks(experiment: Experiment, configs: list[str]) -> list[dict]:
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
                                     "every_n_train_steps": experiment.checkpoint_every}
        out.append(callback)
    return out + [{"class_path": "lab.runner.RunRecord", "init_args": {"max_tokens": experiment.tokens}}]


def train_command(runs_dir: Path, experiment: Experiment, name: str, seed: int, resume: Path | None = None) -> list[str]:
    run, out = experiment.runs[name], run_dir(runs_dir, experiment, name, seed)
    configs = [*experiment.configs, *run.configs]
    cmd = [sys.executable, str(TRAIN), "fit"]
    for config in configs:
        cmd += ["--config", config]
    cmd += ["--model", run.model]
    for key, value in experiment.args.items():
        cmd += [f"--{key}", flag_value(value)]
    if run.trunk:  # a run's own trunk and data replace the base's
        cmd += ["--model.init_args.trunk", run.trunk]
    if run.data:
        cmd += ["--data", run.data]
    for summary in run.summaries:
        cmd += [f"--model.init_args.summaries+={summary}"]
    for key, value in {**run.args, **experiment.set_args}.items():  # the command line's flags win
        cmd += [f"--{key}", flag_value(value)]
    cmd += ["--trainer.callbacks", json.dumps(callbacks(experiment, configs)),
            "--trainer.max_steps", str(experiment.run_steps(name)), "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(out.parent.parent), "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", out.name, "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false"]
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    return cmd


def own_parameters(module) -> int:
    """Parameters of the objective itself: a frozen companion it holds (a teacher, the checkpoint k-means reads) is
    another model, left out as the objective's checkpoint leaves it out."""
    from objectives.training.checkpoints import FrozenCompanion
    borrowed = {id(p) for m in module.modules() if isinstance(m, FrozenCompanion) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in borrowed)


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
                "parameters": own_parameters(pl_module),
                "causal": "full" not in pl_module.required_masks,
                "hparams": {k: v for k, v in pl_module.hparams.items() if isinstance(v, (int, float, str, bool))},
                "steps": trainer.global_step, "max_steps": trainer.max_steps, "tokens_seen": self.tokens,
                "wall_clock_s": self.elapsed(), "threads": torch.get_num_threads(),
                "runs_at_once": int(os.environ.get(RUNS_AT_ONCE, "1")),
                "peak_memory_mib": peak_memory_mib(pl_module.device),
                "finished": finished, **data_floors(trainer.datamodule)}
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


def data_floors(datamodule) -> dict[str, float]:
    """What a trivial model scores on the run's data, where the datamodule knows it: `unigram_entropy` (nats/token
    of a context-free model of the val split, with the split's `bytes_per_token` to turn it into bits per byte) and
    `chance_accuracy` (val/accuracy of a guess)."""
    def fact(name: str) -> float | None:
        try:
            value = getattr(datamodule, name, None)
        except KeyError:  # a corpus whose metadata lacks it (no val split)
            return None
        return float(value) if value else None  # bytes_per_token 0: no bytes (a word-level vocabulary)
    floors = {"unigram_entropy": fact("unigram_entropy"), "chance_accuracy": fact("chance_accuracy")}
    if floors["unigram_entropy"] is not None:
        floors["bytes_per_token"] = fact("bytes_per_token")
    return {k: v for k, v in floors.items() if v is not None}


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


def state(runs_dir: Path, experiment: Experiment, name: str, seed: int) -> tuple[str, Path | None]:
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


def steps_done(last: Path | None) -> int:
    """The step an interrupted run resumes from (0 for a new one)."""
    return int(load_checkpoint(last)["global_step"]) if last else 0


def estimate(runs_dir: Path, experiment: Experiment, pairs: list[tuple[str, int]], jobs: int = 1) -> str:
    """How long the (run, seed)s still to train should take on this machine, said before training starts: the
    seconds per step of the runs of this experiment that finished here (plus a start-up per run), else the
    experiment file's stated `minutes` (its share for these steps), else no figure. With `jobs` runs at a time the
    measured pace is divided by `jobs` (the finished runs' own pace was taken the way they were trained)."""
    states = {(n, s): state(runs_dir, experiment, n, s) for n, s in pairs}
    todo = [(n, last) for (n, _), (status, last) in states.items() if status != "finished"]
    if not todo:
        return "nothing to train"
    steps_left = sum(experiment.run_steps(n) - steps_done(last) for n, last in todo)
    what = f"for the {len(todo)} run{'s' * (len(todo) > 1)} still to train"
    finished = [info for path in sorted((runs_dir / experiment.name).glob("*/seed*/run.json"))
                if (info := read_json(path)) and info.get("finished") and info.get("steps")
                and info.get("wall_clock_s")]
    if finished:
        per_step = sum(i["wall_clock_s"] for i in finished) / sum(i["steps"] for i in finished)
        side = f", {jobs} at a time" if jobs > 1 else ""
        return (f"about {clock((per_step * steps_left + START_UP_S * len(todo)) / max(1, jobs))} {what} "
                f"({per_step:.2f} s/step, measured on {len(finished)} finished run{'s' * (len(finished) > 1)} here, "
                f"plus {START_UP_S} s start-up a run{side})")
    if experiment.minutes:
        budget_steps = sum(map(experiment.run_steps, experiment.runs)) * len(experiment.seeds)
        return (f"about {clock(experiment.minutes * 60 * steps_left / budget_steps)} {what} (the experiment "
                f"file's stated budget, minutes: {experiment.minutes:g} for all its runs)")
    return "no estimate yet (the first run's progress line gives one)"


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def run_environment(jobs: int) -> dict[str, str] | None:
    """The environment of a run's process when `jobs` runs train side by side: each gets an equal share of the
    cores as its intra-op threads (OMP_NUM_THREADS, which torch reads at start-up), so that they do not
    oversubscribe the CPU. One run at a time keeps the parent's environment."""
    if jobs <= 1:
        return None
    threads = str(max(1, cpu_cores() // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, RUNS_AT_ONCE: str(jobs)}


@dataclass
class Job:
    """A (run, seed) whose train.py process is running."""
    name: str
    seed: int
    index: int
    out: Path
    process: subprocess.Popen
    log: object
    started: float
    start_step: int
    step: int = 0


def train_all(runs_dir: Path, experiment: Experiment, names: list[str], seeds: list[int], poll: float = 5.0,
              jobs: int = 1) -> list[str]:
    """Train every (run, seed) that is not finished, one process each and up to `jobs` processes at a time
    (`run_environment`); returns the ones that failed.

    Why several at a time: the recall and reasoning experiments train models of a few hundred thousand
    parameters, whose operations are too small to keep two threads busy; on 2 CPU cores a zoo_recall step at one
    thread took 1.1-1.7x as long as at two (BENCHMARKS.md, "zoo_recall in fp32"), so two runs side by side get
    through more steps than one run with both cores. Each run's wall_clock_s is then that of a run sharing the
    machine."""
    pairs = [(n, s) for n in names for s in seeds]
    todo = [(n, s) for n, s in pairs if state(runs_dir, experiment, n, s)[0] != "finished"]
    for n, s in pairs:
        if (n, s) not in todo:
            print(f"[{experiment.name}] {n} seed{s}: finished, skipped", flush=True)
    print(f"[{experiment.name}] estimate: {estimate(runs_dir, experiment, pairs, jobs)}", flush=True)
    env = run_environment(jobs)
    if env is not None:
        print(f"[{experiment.name}] {jobs} runs at a time, {env['OMP_NUM_THREADS']} thread(s) each", flush=True)
    queue, running, failed = list(enumerate(todo)), [], []
    began, trained = time.perf_counter(), 0  # steps trained by this invocation, in finished runs
    while queue or running:
        while queue and len(running) < max(1, jobs):
            i, (name, seed) = queue.pop(0)
            running.append(start_job(runs_dir, experiment, name, seed, i, len(todo), env))
        time.sleep(poll)
        for job in list(running):
            job.step = (read_json(job.out / "progress.json") or {}).get("step", job.step)
            if job.process.poll() is None:
                continue
            running.remove(job)
            job.log.close()
            trained += experiment.run_steps(job.name) - job.start_step
            if job.process.returncode != 0 or state(runs_dir, experiment, job.name, job.seed)[0] != "finished":
                tail = (job.out / "train.log").read_text(errors="replace").splitlines()[-5:]
                print(f"[{experiment.name}] {job.name} seed{job.seed} FAILED (exit {job.process.returncode}); "
                      f"log {job.out / 'train.log'}:\n  " + "\n  ".join(tail), flush=True)
                failed.append(f"{job.name} seed{job.seed}")
            elif jobs <= 1:  # probe it now, so that an experiment stopped later still has this run's figures
                # (runs side by side are probed after them all: a probe here would hold the next run back)
                lens_all(runs_dir, experiment, [job.name], [job.seed])
        steps_now = trained + sum(job.step - job.start_step for job in running)
        rate = (time.perf_counter() - began) / steps_now if steps_now > 0 else None
        remaining = sum(experiment.run_steps(j.name) - j.step for j in running) + \
            sum(experiment.run_steps(n) for _, (n, _) in queue)
        eta = clock(rate * remaining) if rate else "--"
        for job in running:
            print(f"[{experiment.name} {job.index + 1}/{len(todo)}] {job.name} seed{job.seed}: step {job.step}/"
                  f"{experiment.run_steps(job.name)}, {clock(time.perf_counter() - job.started)} in this run, "
                  f"experiment ETA {eta}", flush=True)
    return failed


def start_job(runs_dir: Path, experiment: Experiment, name: str, seed: int, index: int, count: int,
              env: dict[str, str] | None) -> Job:
    """Start (or resume) one run's train.py process, its output appended to the run's train.log."""
    status, last = state(runs_dir, experiment, name, seed)
    out = run_dir(runs_dir, experiment, name, seed)
    out.mkdir(parents=True, exist_ok=True)
    if status == "new":  # an attempt that died before its first checkpoint starts over, without its old events
        for stale in glob.glob(str(out / "events.out.tfevents.*")):
            os.remove(stale)
    start_step = steps_done(last)
    print(f"[{experiment.name} {index + 1}/{count}] {name} seed{seed}: "
          f"{'resuming from ' + str(last) + f' (step {start_step})' if last else 'training'}", flush=True)
    (out / "progress.json").unlink(missing_ok=True)
    log = open(out / "train.log", "a")
    process = subprocess.Popen(train_command(runs_dir, experiment, name, seed, last), cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    return Job(name, seed, index, out, process, log, time.perf_counter(), start_step, start_step)


def test_all(runs_dir: Path, experiment: Experiment, names: list[str], seeds: list[int]) -> None:
    """Every finished run's last checkpoint scored once on the test split (`train.py test`, the same command with
    the run's checkpoint): test/accuracy and its companions land as scalars in the run's own folder, where the
    report reads them, and `test.json` marks the run tested."""
    for name in names:
        for seed in seeds:
            out = run_dir(runs_dir, experiment, name, seed)
            info = read_json(out / "run.json") or {}
            if not info.get("finished") or (out / "test.json").is_file():
                continue
            print(f"[{experiment.name}] {name} seed{seed}: test split", flush=True)
            command = train_command(runs_dir, experiment, name, seed, out / "checkpoints" / "last.ckpt")
            command[command.index("fit")] = "test"
            started = time.perf_counter()
            with open(out / "test.log", "w") as log:
                code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
            if code != 0:
                print(f"[{experiment.name}] {name} seed{seed}: test failed (exit {code}); log {out / 'test.log'}",
                      flush=True)
                continue
            (out / "test.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))


def lens_all(runs_dir: Path, experiment: Experiment, names: list[str], seeds: list[int]) -> None:
    """Future-lens probes for every finished causal run that has none yet, written as future_lens.json and as
    scalars in the run's folder."""
    settings = experiment.future_lens
    if not settings:
        return
    from torch.utils.tensorboard import SummaryWriter

    from lab.future_lens import future_lens
    for name in names:
        for seed in seeds:
            out = run_dir(runs_dir, experiment, name, seed)
            info = read_json(out / "run.json") or {}
            if not info.get("finished") or not info.get("causal") or (out / "future_lens.json").is_file():
                continue
            print(f"[{experiment.name}] {name} seed{seed}: future lens", flush=True)
            started = time.perf_counter()
            try:
                results = future_lens(str(out / "checkpoints" / "last.ckpt"), settings["max_k"],
                                      settings["train_windows"], settings["val_windows"], settings["epochs"], seed)
            except Exception as error:  # the report still comes out, without this run's probe
                print(f"[{experiment.name}] {name} seed{seed}: future lens failed: {error}", flush=True)
                continue
            writer = SummaryWriter(str(out), filename_suffix=".future_lens")
            for k, r in results.items():
                writer.add_scalar(FUTURE_LENS.format(k), r["accuracy"], info["steps"])
            writer.close()
            (out / "future_lens.json").write_text(json.dumps(
                {"settings": settings, "seconds": time.perf_counter() - started,
                 "results": {str(k): r for k, r in results.items()}}, indent=1))
