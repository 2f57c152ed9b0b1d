"""Shared fixtures: a small corpus written by the tests, a private tokenized-data cache, and a helper that runs
the real Lightning CLI (train.py) in-process with a tiny model."""
from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest-xdist runs the suite on one worker per core (pyproject's addopts): each worker, and the CLI processes it
# starts, computes on its share of the cores, so two workers do not fight over both
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch
    torch.set_num_threads(THREADS)

# a tiny trunk and data for fit steps: each CLI run then takes seconds
TINY_MODEL = ["--model.init_args.trunk.init_args.d_model", "32", "--model.init_args.trunk.init_args.n_layers", "1",
              "--model.init_args.trunk.init_args.n_heads", "2", "--model.init_args.trunk.init_args.max_seq_len", "128"]


def stop_on_sigterm(signum, frame):
    """SIGTERM ends the suite. Lightning's in-process fits replace SIGTERM's handler with one that only notes the
    signal (the fit then fails and the suite runs on); they call a handler that was there before, this one."""
    sys.stderr.write(f"\ntests stopped by signal {signum}\n")
    os._exit(128 + signum)


signal.signal(signal.SIGTERM, stop_on_sigterm)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    # one cache for the session's workers (a corpus is tokenized once, not once a worker); a cache is published by
    # an atomic rename, so two workers building the same one is safe
    if WORKERS > 1:
        path = tmp_path_factory.getbasetemp().parent / "cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("cache")
    os.environ["BEYOND_NTP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> list[str]:
    """40 real documents (standard-library modules) as a JSONL file of {"text": ...} records."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(stdlib.glob("*.py"))[:40]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with path.open("w") as f:
        for name in names:
            f.write(json.dumps({"text": name.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return [str(path)]


def tiny_data(corpus_files: list[str]) -> list[str]:
    return ["--data.init_args.source", "files", "--data.init_args.data_files", json.dumps(corpus_files),
            "--data.init_args.bpe_vocab_size", "512", "--data.init_args.seq_len", "64",
            "--data.init_args.batch_size", "4", "--data.init_args.val_windows", "8",
            "--data.init_args.val_fraction", "0.1"]


def run_cli(tmp_path: Path, *args: str, steps: int = 2, subcommand: str = "fit"):
    """train.py with its base config, writing logs and checkpoints under tmp_path; returns the CLI object.

    `--config` files go first, then the step budget and output folders, then every other flag in `args`."""
    import train
    configs = [a for i, a in enumerate(args) if a == "--config" or (i and args[i - 1] == "--config")]
    overrides = [a for i, a in enumerate(args) if not (a == "--config" or (i and args[i - 1] == "--config"))]
    argv = [subcommand, *configs, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "2",
            "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.default_root_dir", str(tmp_path), *overrides]
    return train.main(argv)


def quickstart(corpus_files, *extra: str) -> list[str]:
    return ["--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data(corpus_files), *extra]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under log_dir, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, list[float]] = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def train_on_batch(model, batch: dict, steps: int, lr: float) -> float:
    """`steps` AdamW steps on one batch in train mode; returns the loss computed at the last step."""
    import torch
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()
