"""Warm start (`--model.init_args.init_from CKPT`): a new run from a project checkpoint's weights, with embedding
rows for an objective's own special tokens, a printed report, and optimizer, schedule and step fresh."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, quickstart, run_cli
from ntp_checkpoint import ntp_checkpoint as shared_ntp_checkpoint
from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.checkpoints import load_checkpoint, warm_start


class ThreeTokenNTP(NextTokenPrediction):
    """A next-token objective with 3 special tokens of its own (as Coconut's <bot>, <eot>, <latent>)."""

    extra_tokens = 3

    def extra_token_sources(self):
        return [0, None, 5]  # the first from token 0's row, the second the usual init, the third from token 5's


@pytest.fixture(scope="module")
def ntp_checkpoint(corpus_files) -> Path:
    return shared_ntp_checkpoint(tuple(corpus_files))


def test_init_from_loads_weights_adds_token_rows_and_starts_at_step_0(tmp_path, corpus_files, ntp_checkpoint,
                                                                       capsys):
    saved = load_checkpoint(ntp_checkpoint)
    assert saved["global_step"] == 3
    # lr 0: the one training step leaves the weights as the warm start set them
    cli = run_cli(tmp_path, *quickstart(corpus_files, "--model", "test_warm_start.ThreeTokenNTP", *TINY_MODEL,
                                        "--model.init_args.init_from", str(ntp_checkpoint),
                                        "--model.init_args.optimizer.init_args.lr", "0"), steps=1)
    out = capsys.readouterr().out
    assert f"warm start from {ntp_checkpoint}" in out and "objectives.NextTokenPrediction" in out
    assert "row 512 copied from token 0, row 513 usual init, row 514 copied from token 5" in out
    assert "optimizer, schedule and step start fresh" in out
    model = cli.model
    assert cli.trainer.global_step == 1  # started at 0, not at the checkpoint's 3
    assert int(next(iter(cli.trainer.optimizers[0].state.values()))["step"]) == 1
    state, weights = model.state_dict(), saved["state_dict"]
    for name, value in weights.items():
        if name != "embed.weight":
            assert torch.equal(state[name], value), name
    embed, V = state["embed.weight"], 512
    assert embed.shape[0] == V + 3 and torch.equal(embed[:V], weights["embed.weight"])
    assert torch.equal(embed[V], weights["embed.weight"][0]) and torch.equal(embed[V + 2], weights["embed.weight"][5])
    fresh = embed[V + 1]
    assert 0.005 < fresh.std() < 0.05 and not (weights["embed.weight"] == fresh).all(1).any()
    assert model.warm_start_report["added"] == [] and model.warm_start_report["left_out"] == []

    # resuming is not a warm start: the vocabulary check still refuses the checkpoint's smaller embedding
    with pytest.raises(ValueError, match=r"vocabulary has 509 tokens.*512.*init_from"):
        model.on_load_checkpoint(saved)


def test_init_from_refuses_another_vocabulary_or_trunk_shape(ntp_checkpoint):
    def model(vocab_size=512, d_model=32):
        return NextTokenPrediction(Transformer(d_model=d_model, n_layers=1, n_heads=2, max_seq_len=128),
                                   vocab_size=vocab_size)

    with pytest.raises(ValueError, match=r"vocabulary has 512 tokens but this model's has 300"):
        warm_start(model(vocab_size=300), ntp_checkpoint)
    with pytest.raises(ValueError, match=r"another shape.*trunk.blocks.0"):
        warm_start(model(d_model=64), ntp_checkpoint)
