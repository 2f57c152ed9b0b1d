"""What a training run needs around the objective: the precision the hardware supports, throughput and MFU from
FLOPs measured on a meta-device copy, generated samples on TensorBoard's text tab, and checkpoints whose `last.ckpt`
is the run's final state."""
from __future__ import annotations

import copy
import time
from collections import deque

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from objectives.training import metrics as M


def auto_precision() -> str:
    """bf16-mixed where the GPU or CPU computes bf16 natively, otherwise full fp32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16-mixed" if native else "32-true"


def compute_dtype(precision: str) -> torch.dtype:
    precision = str(precision)
    return torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32


def flops_per_step(module: L.LightningModule, batch: dict) -> int | None:
    """FLOPs of one forward+backward of the objective's loss, counted on a meta-device copy (no real compute)."""
    trainer = module._trainer
    module._trainer = None  # the copy must not drag the trainer along
    try:
        clone = copy.deepcopy(module).to("meta")
    except Exception:
        return None
    finally:
        module._trainer = trainer
    meta_batch = {k: torch.empty_like(v, device="meta") for k, v in batch.items() if k in ("tokens", "loss_mask")}
    meta_batch["tokens"] = meta_batch["tokens"].long()
    try:
        return int(measure_flops(clone, lambda: clone.loss(meta_batch)["loss"], lambda loss: loss))
    except Exception:
        return None


class Throughput(L.Callback):
    """Logs perf/tokens_per_sec (all devices, over the last `window` steps) and perf/mfu where the peak is known.

    Lightning's `ThroughputMonitor` measures the same rolling window (with the same `measure_flops` and
    `get_available_flops` used here), but it writes its figures straight to the loggers under its own fixed names
    (`train|device/items_per_sec`, `train|device/mfu`, ...): not the shared `perf/` names, and not through
    `self.log`, so they never reach `trainer.callback_metrics`, where the benchmarks and tests read them. Renaming
    them would mean overriding its private `_compute`; this callback is the few lines that do it directly.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.steps: deque = deque(maxlen=window)
        self.last: float | None = None
        self.flops: int | None = None
        self.peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.last, self.flops = None, None
        dtype = compute_dtype(trainer.precision)
        self.peak = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops is None and self.peak is not None:
            self.flops = flops_per_step(pl_module, batch) or 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append((now - self.last, batch["tokens"].numel() * trainer.world_size))
            seconds = sum(s for s, _ in self.steps)
            tokens_per_sec = sum(t for _, t in self.steps) / seconds
            pl_module.log(M.TOKENS_PER_SEC, tokens_per_sec, on_step=True, on_epoch=False, rank_zero_only=True)
            if self.flops and self.peak:
                mfu = self.flops * len(self.steps) / seconds / self.peak  # per device: every device runs the same step
                pl_module.log(M.MFU, mfu, on_step=True, on_epoch=False, rank_zero_only=True)
        self.last = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self.last = None  # validation time is not training time



class GenerationSamples(L.Callback):
    """Writes the objective's generated examples of each validation to TensorBoard's text tab, decoded by the
    datamodule's tokenizer."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        examples = getattr(pl_module, "generated_examples", [])
        decode = getattr(trainer.datamodule, "decode", None)
        if not examples or decode is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        lines = []
        for prompt, generated, gold in examples:
            line = f"**prompt** `{decode(prompt)}`  \n**generated** `{decode(generated)}`"
            if gold is not None:
                line += f"  \n**gold** `{decode(gold)}`"
            lines.append(line)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("val/samples", "\n\n".join(lines), trainer.global_step)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `last.ckpt` (with `save_last`) is always the run's final state.

    Why: Lightning writes `last.ckpt` only beside a periodic save, and at the end of training only where none was
    ever written, so a run of 400 steps saving every 250 ends with a `last.ckpt` of step 250 (the quickstart's 300
    steps too). Here the end of training writes it again where its step is not the final one."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_checkpoint_saved and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
