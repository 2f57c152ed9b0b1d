"""Staged training: the learning-rate re-warm after an optimizer reset, and shipped Coconut recipes whose curriculum
stays within the stages their data can be scored at."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from datamodules import ReasoningDataModule
from datamodules.prosqa import STEP_SHARES
from models import Transformer
from objectives import Coconut
from objectives.training.optim import WarmupCosine
from objectives.training.stages import OptimizerReset


LR = 1e-3


class RecordLr(L.Callback):
    """The learning rate each optimizer step applies, beside the schedule's for that step. Its step pre-hook is
    registered at train start, after OptimizerReset's (fit start), so it sees the rate the update uses."""

    def __init__(self):
        self.applied, self.scheduled = [], []

    def on_train_start(self, trainer, pl_module):
        scheduler = trainer.lr_scheduler_configs[0].scheduler

        def record(optimizer, args, kwargs):
            self.applied.append(optimizer.param_groups[0]["lr"])
            self.scheduled.append(scheduler.get_last_lr()[0])
        self.hook = trainer.optimizers[0].register_step_pre_hook(record)


def fit_coconut(rewarm_steps: int, schedule, max_steps: int = 9) -> tuple[RecordLr, L.Trainer]:
    torch.manual_seed(0)
    data = ReasoningDataModule(task="multiplication", digits=2, train_size=64, val_size=4, test_size=4, batch_size=4)
    model = Coconut(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), vocab_size=data.vocab_size,
                    eos_id=data.eos_id, max_latent_stage=2, stage_every=4, rewarm_steps=rewarm_steps,
                    optimizer=lambda groups: torch.optim.AdamW(groups, lr=LR), lr_scheduler=schedule)
    record = RecordLr()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[record], limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", precision="32-true")
    trainer.fit(model, datamodule=data)
    record.hook.remove()
    return record, trainer


def test_the_learning_rate_ramps_back_to_the_schedule_after_each_reset():
    # an exponential decay computes each rate from the last one, so a scaled rate left in place would compound
    record, trainer = fit_coconut(3, lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9))
    reset = next(c for c in trainer.callbacks if isinstance(c, OptimizerReset))
    assert reset.resets == 2  # stages change at steps 4 and 8
    # 1/3, 2/3, 3/3 of the schedule's rate from each stage's first step on; the schedule runs on meanwhile
    ramp = [1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1, 1 / 3]
    assert record.applied == pytest.approx([LR * 0.9**step * f for step, f in enumerate(ramp)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.9**9)


def test_no_rewarm_applies_the_schedule_s_rate_at_every_step():
    record, _ = fit_coconut(0, lambda optimizer: WarmupCosine(optimizer, warmup_steps=2), max_steps=6)
    assert len(record.applied) == 6 and record.applied == pytest.approx(record.scheduled)  # a stage change at 4
    with pytest.raises(ValueError, match="rewarm_steps"):
        OptimizerReset(rewarm_steps=-1)


def most_steps(data: dict) -> int:
    """The most reasoning steps a question of a shipped reasoning data config has."""
    args = data["init_args"]
    per_task = {"countdown": lambda: args.get("num_numbers", 3) - 1, "prosqa_alg1": lambda: max(STEP_SHARES)}
    assert args["task"] in per_task, f"add the most steps of task {args['task']!r} here"
    return per_task[args["task"]]()


def test_no_coconut_recipe_trains_into_a_stage_that_drops_written_steps():
    """Beyond max_latent_stage every step is latent: on data with more steps than max_latent_stage the steps it
    meant to keep in words are dropped (Countdown's scorer then has only the copied target to check). A recipe may
    pass max_latent_stage only where its data has no more steps than that (ProsQA: all 6 latent is the goal)."""
    from conftest import ROOT
    checked = 0
    for path in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model = config.get("model")
        if not isinstance(model, dict) or model.get("class_path") != "objectives.Coconut":
            continue
        args = {"stage_every": 0, "start_stage": 0, "stage_unit": "step", "max_latent_stage": 6, "first_stage": 0,
                **model["init_args"]}
        last = Coconut.stage_at(SimpleNamespace(**args), config["trainer"]["max_steps"] - 1, 0)
        steps = most_steps(config["data"])
        assert last <= args["max_latent_stage"] or steps <= args["max_latent_stage"], (
            f"{path.name}: stage {last} at its last step hides all {steps} steps; max_latent_stage is "
            f"{args['max_latent_stage']}")
        checked += 1
    assert checked >= 5
