"""Optimizer parameter groups and the default learning-rate schedule (both swappable from the CLI)."""
from __future__ import annotations

import math

import torch
from torch import nn


def decay_groups(module: nn.Module) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only; norms' gains, biases and every parameter a
    block marks with `_no_weight_decay = True` (Mamba's `A_log` and `D`, as in the reference implementation) are
    not decayed."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `total_steps`: a
    `LambdaLR` whose multiplier is `factor(step)`. `min_lr_ratio` 1.0 holds the peak after the warm-up: a
    constant learning rate (the Mamba paper's synthetic tasks).

    `total_steps` left unset is filled in from the trainer (`estimated_stepping_batches`) by the objective's
    `configure_optimizers`: the CLI builds the schedule from its config before the trainer knows the run's step
    budget, and neither torch nor Lightning has a schedule that reads it, so that one line stays.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, last_epoch: int = -1):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
