"""Checkpoints are read with `weights_only=True`: a planted pickle payload is refused by every loader of the
project (generate.py, warm start, companions, Lightning's resume), with a clear error, and never runs."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.checkpoints import FrozenCompanion, UnsafeCheckpointError, load_checkpoint, warm_start
from objectives.training.optim import WarmupCosine


class Payload:
    """Unpickling this object runs a shell command that writes `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tmp_path):
    marker = tmp_path / "payload_ran"
    weights = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=32),
                                  vocab_size=40).state_dict()
    path = tmp_path / "planted.ckpt"
    torch.save({"state_dict": weights, "global_step": 1, "TextDataModule": {"tokenizer": "{}"},
                "hyper_parameters": {"_class_path": "objectives.NextTokenPrediction", "vocab_size": 40,
                                     "note": Payload(str(marker))}}, path)
    return path, marker


def test_the_planted_payload_is_real(planted):
    path, marker = planted
    torch.load(path, weights_only=False)  # what generate.py used to do
    assert marker.exists()


def test_every_loader_refuses_the_payload_and_nothing_runs(planted):
    path, marker = planted
    with pytest.raises(UnsafeCheckpointError, match=r"refused.*(posix|os)\.system.*could run code"):
        load_checkpoint(path)
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=32), vocab_size=40)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        warm_start(model, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        FrozenCompanion(str(path))
    from lightning.fabric.utilities.cloud_io import _load  # what Trainer.fit(ckpt_path=...) reads with
    with pytest.raises(Exception, match="(posix|os).system"):
        _load(str(path))
    done = subprocess.run([sys.executable, "generate.py", "--ckpt_path", str(path), "--max_new_tokens", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "was refused" in done.stderr and "Traceback" not in done.stderr  # message alone
    assert not marker.exists()


def test_the_plain_types_of_hand_built_objectives_load(tmp_path):
    path = tmp_path / "plain.ckpt"
    hparams = {"optimizer": functools.partial(torch.optim.AdamW, lr=1e-3), "lr_scheduler": WarmupCosine,
               "other_scheduler": torch.optim.lr_scheduler.LambdaLR}
    torch.save({"hyper_parameters": hparams, "state_dict": {"w": torch.ones(2)}}, path)
    loaded = load_checkpoint(path)["hyper_parameters"]
    assert loaded["optimizer"].func is torch.optim.AdamW and loaded["optimizer"].keywords == {"lr": 1e-3}
    assert loaded["lr_scheduler"] is WarmupCosine


def test_last_checkpoint_is_the_final_step_when_it_falls_between_periodic_saves(tmp_path):
    """Saving every 2 steps, a 3-step run's last.ckpt holds step 3 (Lightning's own keeps step 2)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from objectives.training.callbacks import ModelCheckpoint
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    trainer = L.Trainer(max_steps=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3
