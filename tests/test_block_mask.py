"""Masks that cost nothing extra: block_mask from segment ids, no mask tensor where SDPA needs none, and one
explicit mask per trunk forward shared by every layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import Mamba, Transformer
from models.layers import block_mask
from models.transformer import attention_inputs


def test_block_mask_from_segment_ids_equals_a_hand_written_one():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 3, 3, 3, 3, 3]])
    Y, N = True, False
    expected = torch.tensor([
        [[Y, Y, N, N, N, N],  # block 0 sees itself whole
         [Y, Y, N, N, N, N],
         [Y, Y, Y, Y, Y, N],  # block 1 sees block 0 and all of itself
         [Y, Y, Y, Y, Y, N],
         [Y, Y, Y, Y, Y, N],
         [Y, Y, Y, Y, Y, Y]],
        [[Y, N, N, N, N, N],  # ids need not be ordered: a block is a run of equal ids
         [Y, Y, Y, Y, Y, Y],
         [Y, Y, Y, Y, Y, Y],
         [Y, Y, Y, Y, Y, Y],
         [Y, Y, Y, Y, Y, Y],
         [Y, Y, Y, Y, Y, Y]]])
    mask = block_mask(segments)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], expected)
    assert torch.equal(block_mask(segments[0])[0, 0], expected[0])  # [T] ids: a batch of one


def test_the_transformer_reads_a_block_mask_and_mamba_refuses_it_by_name():
    torch.manual_seed(0)
    trunk = Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=16).eval()
    x = torch.randn(1, 8, 32)
    mask = block_mask(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    out = trunk(x, mask=mask)
    torch.testing.assert_close(out[:, :3], trunk(x[:, :3], mask="full"))  # the first block: bidirectional
    changed = x.clone()
    changed[:, 4] += 1  # a later position of block 1: block 0 does not see it, block 1 does
    moved = trunk(changed, mask=mask)
    torch.testing.assert_close(moved[:, :3], out[:, :3])
    assert not torch.allclose(moved[:, 3], out[:, 3], atol=1e-4)
    with pytest.raises(ValueError, match=r"Mamba trunk supports only causal masks \(got a \(1, 1, 8, 8\) tensor"):
        Mamba(d_model=32, n_layers=1)(x, mask=mask)


def test_no_mask_tensor_where_sdpa_needs_none():
    trunk = Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    cache = trunk.make_cache(2).layers[0]
    assert attention_inputs("causal", 5, None).mask is None and attention_inputs("causal", 5, None).is_causal
    assert attention_inputs("full", 5, None) == (0, None, False, None, False)
    with torch.no_grad():
        trunk(torch.randn(2, 4, 32), cache=trunk.make_cache(2))
        cache.crop(0)
        cache.append(torch.zeros(2, 2, 4, 16), torch.zeros(2, 2, 4, 16))
    one = attention_inputs("causal", 1, cache)  # one query after equal rows: every cached key, no mask
    assert one.mask is None and not one.is_causal and one.positions == 4
    several = attention_inputs("causal", 3, cache)  # lower-right aligned: one [1, 1, T, S] mask
    assert several.mask.shape == (1, 1, 3, 7)
    assert torch.equal(several.mask[0, 0], torch.ones(3, 7, dtype=torch.bool).tril(4))
    cache.crop(torch.tensor([4, 2]))  # ragged rows: one [B, 1, T, S] mask
    ragged = attention_inputs("causal", 1, cache)
    assert ragged.mask.shape == (2, 1, 1, 5) and ragged.mask[1, 0, 0].tolist() == [True] * 3 + [False] * 2


def test_one_explicit_mask_per_forward_shared_by_every_layer(monkeypatch):
    trunk = Transformer(d_model=32, n_layers=3, n_heads=2, max_seq_len=16).eval()
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: seen.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **kw))
    with torch.no_grad():
        cache = trunk.make_cache(2)
        trunk(torch.randn(2, 5, 32), cache=cache, padding_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
        assert seen == [None] * 3  # a causal prefill from position 0, padding at the end: is_causal, no tensor
        seen.clear()
        trunk(torch.randn(2, 1, 32), cache=cache)  # ragged rows now: one mask, the same object in every layer
        assert seen[0] is not None and all(m is seen[0] for m in seen) and len(seen) == 3
