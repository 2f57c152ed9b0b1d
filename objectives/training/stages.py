"""Training in stages chosen by the optimizer step (or epoch): Coconut's curriculum, LaDiR's VAE stage before its
latent stage. The stage follows training, is logged every step, is kept in checkpoints (generation uses it), and
`OptimizerReset` clears the optimizer's state at each change (optionally re-warming the learning rate)."""
from __future__ import annotations

import lightning as L


class Staged:
    """A mixin before `Objective` in the bases of a family with stages. The family defines `stage_at(step, epoch)`
    and `stage_metric` (the logged name, e.g. "train/coconut_stage", whose last part is the checkpoint key), and
    sets `self.stage` in its `__init__` (the stage generation uses before any training)."""

    stage_metric: str

    def current_stage(self) -> int:
        """The stage of the current training step (in evaluation: the last one trained, or the checkpoint's)."""
        if self._trainer is not None and self.training:
            self.stage = self.stage_at(self.global_step, self.current_epoch)
        return self.stage

    def training_step(self, batch: dict, batch_idx: int):
        self.log(self.stage_metric, float(self.current_stage()))
        return super().training_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.stage_metric.rsplit("/", 1)[-1]] = self.stage

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.stage = int(checkpoint.get(self.stage_metric.rsplit("/", 1)[-1], self.stage))


class OptimizerReset(L.Callback):
    """Clears the optimizer's state (Adam's moments and step counts) when the stage changes; the learning-rate
    schedule runs on. `resets` counts the resets of this fit.

    This differs from the Coconut reference code (facebookresearch/coconut `run.py`, `reset_optimizer: True`),
    which builds a new AdamW at every epoch, stage change or not, at a constant learning rate (1e-4 in its ProsQA
    and GSM8k configs) with no schedule. Here the state is cleared at stage changes only, and the schedule (the
    recipes' warm-up and cosine, at a peak of 1e-3) is not restarted. Adam's first steps after a reset move every
    weight by about the full learning rate (its moment estimates are one gradient old), so `rewarm_steps` > 0
    scales the learning rate of the `rewarm_steps` optimizer steps from a stage's first one by 1/n, 2/n, ..., n/n
    of the schedule's (n = `rewarm_steps`): a linear re-warm from near 0 back to the schedule. 0: no re-warm.
    """

    def __init__(self, rewarm_steps: int = 0):
        if rewarm_steps < 0:
            raise ValueError(f"rewarm_steps must be >= 0 (0: no re-warm after a reset), got {rewarm_steps}")
        self.rewarm_steps = rewarm_steps
        self.last_stage: int | None = None
        self.resets = 0
        self.reset_step: int | None = None  # the global step of the last reset
        self.factor = 1.0  # of the schedule's learning rate, for this step's update
        self._hooks: list = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.rewarm_steps:  # scale the learning rate for the update only, so that no schedule reads it back
            for optimizer in trainer.optimizers:
                self._hooks += [optimizer.register_step_pre_hook(self._scale_lr),
                                optimizer.register_step_post_hook(self._restore_lr)]

    def on_fit_end(self, trainer, pl_module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stage = pl_module.stage_at(trainer.global_step, trainer.current_epoch)
        if self.last_stage is not None and stage != self.last_stage:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            self.resets += 1
            self.reset_step = trainer.global_step
        self.last_stage = stage
        since = None if self.reset_step is None else trainer.global_step - self.reset_step
        self.factor = (since + 1) / self.rewarm_steps if since is not None and since < self.rewarm_steps else 1.0

    def _scale_lr(self, optimizer, args, kwargs) -> None:
        self._scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor

    def _restore_lr(self, optimizer, args, kwargs) -> None:
        for group, lr in zip(optimizer.param_groups, self._scheduled):
            group["lr"] = lr
