"""What the benchmark scripts share: the same training step through the Lightning Trainer and through a bare
PyTorch loop, timed the same way; an experiment config fitted under a step and time budget, then scored on its
test questions with any generation options; and a table printer with optional JSON output."""
from __future__ import annotations

import argparse
import inspect
import json
import time
from contextlib import nullcontext
from itertools import cycle, islice
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from objectives.training.callbacks import compute_dtype

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"


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
    from objectives.training.optim import WarmupCosine
    model.scheduler_factory = lambda opt: WarmupCosine(opt, warmup_steps=10, total_steps=total_steps)


def max_time(minutes: float) -> str:
    """The trainer's DD:HH:MM:SS time limit for a budget in minutes."""
    seconds = int(round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fit_experiment(config: str | Path, steps: int, minutes: float, save_dir: str, extra=()) -> tuple[object, dict]:
    """Fit an experiment config through the CLI (lab.cli.main, what train.py runs) for `steps` optimizer steps or
    `minutes`, whichever ends first, logging under save_dir without a progress bar; `extra` flags come last.
    Returns the CLI object and what the fit took: {"steps", "train min", "cut by time"}."""
    from lab.cli import main  # the CLI (and every objective behind it) only where a benchmark fits something
    config = Path(config)
    if not config.exists():
        config = EXPERIMENTS / config
    start = time.perf_counter()
    cli = main(["fit", "-c", str(config), "--trainer.max_steps", str(steps), "--trainer.max_time",
                max_time(minutes), "--trainer.logger.init_args.save_dir", save_dir,
                "--trainer.enable_progress_bar", "false", *extra])
    taken = (time.perf_counter() - start) / 60
    return cli, {"steps": cli.trainer.global_step, "train min": taken, "cut by time": cli.trainer.global_step < steps}


def trainer_test(cli) -> dict:
    """The fitted model's own answer scoring on the test split (`train.py test`): accuracy and answer tokens."""
    from objectives.training import metrics as M
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"test acc %": 100 * tested[M.TEST_ACCURACY], "answer_tokens": tested[M.TEST_ANSWER_TOKENS]}


def test_questions(datamodule, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], int]:
    """The first `size` test questions, right-padded: (prompts [B, P], prompt lengths [B], each row's gold answer
    row (<ans> and the answer tokens), the longest row's generation length after its prompt)."""
    from datamodules.reasoning import collate
    items = [datamodule.test_set[i] for i in range(min(size or len(datamodule.test_set), len(datamodule.test_set)))]
    batch = collate(items, datamodule.pad_id)
    lengths = batch["prompt_len"]
    width = int(lengths.max())
    fill = datamodule.eos_id
    prompts = batch["tokens"][:, :width].masked_fill(torch.arange(width) >= lengths[:, None], fill)
    gold = [[t for t in row if t >= 0] for row in batch["answer"].tolist()]
    return prompts, lengths, gold, int((batch["tokens"].shape[1] - lengths).max())


def generated_rows(out: torch.Tensor, lengths: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Each row's generation after its own prompt, cut after its first eos: out [B, W] or [B, N, W] (then a list
    of N lists per question)."""
    if out.dim() == 3:
        per = [generated_rows(out[:, n], lengths, eos_id) for n in range(out.shape[1])]
        return [list(rows) for rows in zip(*per)]
    rows = []
    for row, p in zip(out.tolist(), lengths.tolist()):
        gen = row[p:]
        if eos_id is not None and eos_id in gen:
            gen = gen[: gen.index(eos_id) + 1]
        rows.append(gen)
    return rows


def judge(datamodule, prompt: list[int], gen: list[int], gold: list[int], eos_id: int | None) -> bool:
    """The datamodule's own verdict on a generation (Countdown checks the solution), else exact match of the
    answer row before the eos (objectives/decoding/scoring.py's rule)."""
    from objectives.decoding.scoring import exact_match
    verdict = datamodule.check_answer(prompt, gen) if hasattr(datamodule, "check_answer") else None
    return exact_match(gen, gold, eos_id)[1] if verdict is None else bool(verdict)


def takes_prompt_lengths(fn) -> bool:
    """Whether a generation function decodes right-padded prompts of different lengths (`prompt_lengths`). A
    family that declares it does not (`generates_ragged`: the denoising families, whose `generate` takes **options
    only to name and refuse them) is taken at its word."""
    if getattr(getattr(fn, "__self__", None), "generates_ragged", True) is False:
        return False
    params = inspect.signature(fn).parameters.values()
    return any(p.name == "prompt_lengths" or p.kind is p.VAR_KEYWORD for p in params)


def repeated(generate, k: int):
    """`generate` run on each prompt k times in one call: [B, P] -> [B, k, W] (k samples per question)."""
    ragged = takes_prompt_lengths(generate)

    def sample(prompts: torch.Tensor, budget, prompt_lengths: torch.Tensor | None = None, **options):
        if prompt_lengths is not None and ragged:
            options["prompt_lengths"] = prompt_lengths.repeat_interleave(k)
        out = generate(prompts.repeat_interleave(k, 0), budget, **options)
        return out.view(len(prompts), k, -1)
    return sample


def timed_generation(model, datamodule, size: int | None, generate=None, batch_size: int = 256,
                     **options) -> tuple[list, list, list, float]:
    """Generate for the first `size` test questions with `generate(prompts, budget, **options)` (default
    `model.generate`), `batch_size` questions per call: ragged prompts in one call with `prompt_lengths` where the
    function takes them, else one call per prompt length. The budget is the longest test row after its prompt plus
    the family's `generation_slack`, within the trunk. Returns (prompts as id lists, gold answer rows, generations
    cut after their eos (lists of N per question where the function returns [B, N, W]), seconds in the calls)."""
    model.eval()
    generate = generate or model.generate
    prompts, lengths, gold, longest = test_questions(datamodule, size)
    budget = min(longest + getattr(model, "generation_slack", 0), model.trunk.max_seq_len - int(lengths.max()))
    ragged = takes_prompt_lengths(generate)
    generations: list = [None] * len(prompts)
    seconds = 0.0
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(prompts)))
            groups = [rows] if ragged else [rows[lengths[rows] == n] for n in lengths[rows].unique().tolist()]
            for group in groups:
                part_len = lengths[group]
                part = prompts[group, : int(part_len.max())]
                kwargs = {"prompt_lengths": part_len, **options} if ragged else options
                begin = time.perf_counter()
                out = generate(part, budget, **kwargs)
                seconds += time.perf_counter() - begin
                for row, gen in zip(group.tolist(), generated_rows(out, part_len, model.eos_id)):
                    generations[row] = gen
    questions = [row[:p] for row, p in zip(prompts.tolist(), lengths.tolist())]
    return questions, gold, generations, seconds


def table(rows: list[dict], title: str) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else "" if r.get(c) is None else str(r[c])
              for c in columns] for r in rows]
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
