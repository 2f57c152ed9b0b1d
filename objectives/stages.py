"""Training in stages chosen by the optimizer step (or epoch): Coconut's curriculum, LaDiR's VAE stage before its
latent stage. The stage follows training, is logged every step, is kept in checkpoints (generation uses it), and
`OptimizerReset` clears the optimizer's state at each change."""
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
    """Clears the optimizer's state (Adam's moments and step counts) when the stage changes, as the Coconut
    reference code rebuilds its optimizer at every stage; the learning-rate schedule runs on. `resets` counts the
    resets of this fit."""

    def __init__(self):
        self.last_stage: int | None = None
        self.resets = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stage = pl_module.stage_at(trainer.global_step, trainer.current_epoch)
        if self.last_stage is not None and stage != self.last_stage:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            self.resets += 1
        self.last_stage = stage
