"""The chunked cross-entropy's budget: a chunk holds a fixed number of bytes of fp32 logits at any vocabulary."""
from __future__ import annotations

import pytest

from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.losses import chunk_positions


def test_a_chunk_is_sized_by_its_logit_bytes():
    assert chunk_positions(256, 131072) == 512  # 512 x 131072 x 4 bytes = 256 MiB
    assert chunk_positions(256, 4096) == 16384  # the same MiB, 32x the positions at a 32x smaller vocabulary
    assert chunk_positions(256, 131071) == 512 and chunk_positions(256, 131073) == 511  # never over the budget
    assert chunk_positions(1e-9, 131072) == 1  # a budget under one position's logits still makes progress


@pytest.mark.parametrize("bad", [0, -64, float("nan"), "64", True])
def test_a_bad_chunk_budget_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="ce_chunk_size .* positive number of MiB"):
        NextTokenPrediction(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=8), vocab_size=10,
                            ce_chunk_size=bad)
