"""What the benchmark scripts share: the same training step through the Lightning Trainer and through a bare
PyTorch loop, timed the same way, and a table printer with optional JSON output."""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from itertools import cycle, islice

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from objectives.runtime import compute_dtype


class RandomTokens(Dataset):
    """Uniform random token windows: a data source that needs no download and no tokenizer (speed only)."""

    def __init__(self, vocab_size: int, length: int, count: int = 100_000):
        self.vocab_size, self.length, self.count = vocab_size, length, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"tokens": torch.randint(0, self.vocab_size, (self.length,), generator=g),
                "loss_mask": torch.ones(self.length)}


def random_batch(vocab_size: int, batch_size: int, seq_len: int, device) -> dict[str, torch.Tensor]:
    """One batch of uniform random windows of seq_len inputs (seq_len + 1 tokens), every position a target."""
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device)
    return {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Seconds from the start of the first timed step to the end of the last one (the first `warmup` skipped)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.warmup


def lightning_seconds_per_step(model: L.LightningModule, loader: DataLoader, steps: int, precision: str,
                               warmup: int = 2, accelerator: str = "auto", callbacks=(), logger=False) -> float:
    """Train `warmup + steps` steps with the Trainer; seconds per timed step."""
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=warmup + steps, precision=precision, accelerator=accelerator, devices=1,
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=[timer, *callbacks])
    trainer.fit(model, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def bare_seconds_per_step(model: torch.nn.Module, loader: DataLoader, steps: int, precision: str,
                          warmup: int = 2) -> float:
    """The same step written by hand: autocast, loss, backward, clipping, optimizer and schedule."""
    device = next(model.parameters()).device
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    dtype = compute_dtype(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    model.train()
    start = None
    for i, batch in enumerate(islice(cycle(loader), warmup + steps)):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model.loss(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def attach_trainer_for_optimizers(model: L.LightningModule, total_steps: int) -> None:
    """configure_optimizers reads the schedule length from a trainer; a bare loop has none, so give it one."""
    from objectives.optim import WarmupCosine
    model.scheduler_factory = lambda opt: WarmupCosine(opt, warmup_steps=10, total_steps=total_steps)


def table(rows: list[dict], title: str) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([f"## {title}", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, cells)])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="also write the rows as JSON to this path")
    return p


def report(rows: list[dict], title: str, json_path: str | None, **context) -> None:
    print(table(rows, title))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"title": title, **context, "rows": rows}, f, indent=1)
