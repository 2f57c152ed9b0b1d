"""The transformer trunk and the next-token objective: cached decoding, masks, chunked loss, generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import train_on_batch
from models import Transformer
from objectives import NextTokenPrediction
from objectives.training.losses import chunked_cross_entropy


def tiny_ntp(qkv_bias: bool = False, **kwargs) -> NextTokenPrediction:
    torch.manual_seed(0)
    trunk = Transformer(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, qkv_bias=qkv_bias)
    return NextTokenPrediction(trunk, vocab_size=97, **kwargs).eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_decoding_equals_a_full_forward(qkv_bias):
    model = tiny_ntp(qkv_bias)
    if qkv_bias:  # initialised to zero: give the biases values, so that a rotary bias error would show
        for block in model.trunk.blocks:
            torch.nn.init.normal_(block.attn.qkv.bias, std=0.5)
    tokens = torch.randint(0, 97, (3, 40))
    full = model.logits(model.hidden(tokens))
    cache = model.trunk.make_cache(3)
    pieces = [model.logits(model.hidden(tokens[:, a:b], cache=cache)) for a, b in ((0, 17), (17, 18), (18, 23), (23, 40))]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # cropping rolls the cache back: re-advancing from position 20 reproduces the same logits
    cache.crop(20)
    torch.testing.assert_close(model.logits(model.hidden(tokens[:, 20:], cache=cache)), full[:, 20:], atol=1e-5, rtol=1e-5)


def test_masks_causal_full_and_tensor():
    trunk = Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=16).eval()
    x = torch.randn(2, 10, 32)
    causal = trunk(x)
    # a causal trunk's output at t ignores the future; a full-attention one does not
    changed = x.clone()
    changed[:, 7:] += 1
    assert torch.allclose(trunk(changed)[:, :7], causal[:, :7], atol=1e-6)
    assert not torch.allclose(trunk(changed, mask="full")[:, :7], trunk(x, mask="full")[:, :7], atol=1e-3)
    lower = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(trunk(x, mask=lower), causal)
    # block-causal: bidirectional inside blocks of 5 positions
    block = torch.arange(10) // 5
    block_mask = block[:, None] >= block[None, :]
    out = trunk(x, mask=block_mask)
    assert not torch.allclose(out[:, :5], causal[:, :5], atol=1e-4)
    torch.testing.assert_close(out[:, :5], trunk(x[:, :5], mask="full"))
    with pytest.raises(ValueError, match="unknown mask"):
        trunk(x, mask="bidirectional")


def test_make_block_has_the_trunks_kind_and_shape():
    trunk = Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    block = trunk.make_block()
    assert type(block) is type(trunk.blocks[0])
    assert block(torch.randn(1, 5, 32)).shape == (1, 5, 32)
    assert block.attn.qkv.bias is None
    biased = Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, qkv_bias=True).make_block()
    assert torch.equal(biased.attn.qkv.bias, torch.zeros(96))


def test_too_long_sequences_name_both_lengths():
    trunk = Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match="17 positions.*maximum of 16"):
        trunk(torch.randn(1, 17, 32))
    model = tiny_ntp()
    with pytest.raises(ValueError, match="max_seq_len 64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_chunked_cross_entropy_equals_the_plain_one_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(4, 30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (4, 30))
    mask = (torch.rand(4, 30) > 0.3).float()
    nll, count, _ = chunked_cross_entropy(hidden, weight, targets, mask, chunk_mib=7 * 50 * 4 / 2**20)  # 7 positions
    (nll / count).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = (F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none") * mask.flatten()).sum()
    (plain / mask.sum()).backward()
    torch.testing.assert_close(nll, plain)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_ntp_loss_falls_on_a_repeating_sequence():
    model = tiny_ntp().train()
    batch = {"tokens": torch.arange(33).repeat(4, 1) % 11, "loss_mask": torch.ones(4, 33)}
    first = model.loss(batch)["loss"].item()
    assert train_on_batch(model, batch, steps=40, lr=3e-3) < 0.2 * first


def test_reverse_reads_the_sequence_backwards():
    model = tiny_ntp(reverse=True)
    tokens = torch.randint(0, 97, (2, 20))
    forward_model = tiny_ntp()
    batch = {"tokens": tokens, "loss_mask": torch.ones(2, 20)}
    flipped = {"tokens": tokens.flip(1), "loss_mask": torch.ones(2, 20)}
    torch.testing.assert_close(model.loss(batch)["loss"], forward_model.loss(flipped)["loss"])


def test_greedy_generation_matches_argmax_of_full_forwards_and_stops_at_eos():
    model = tiny_ntp()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=8)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model.logits(model.hidden(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    # with an eos: everything after a row's first eos is eos
    model.eos_id = int(seq[0, 7])
    out = model.generate(prompt, max_new_tokens=8)
    first = (out[0, 5:] == model.eos_id).nonzero()[0, 0] + 5
    assert (out[0, first:] == model.eos_id).all()


def test_sampling_with_top_k_stays_in_the_top_k():
    model = tiny_ntp()
    prompt = torch.randint(0, 97, (64, 3))
    torch.manual_seed(1)
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=3)
    top3 = model.logits(model.hidden(prompt))[:, -1].topk(3).indices
    assert (out[:, -1:] == top3).any(-1).all()
    assert len(out[:, -1].unique()) > 1


def test_a_few_fp32_rows_without_gradients_take_the_transposed_product():
    """models.layers.linear: 2-8 fp32 rows on a CPU under no_grad run as weight @ x^T (faster there); its values
    are F.linear's to fp32 round-off; with gradients, one row, 9 rows or bf16, F.linear's own bits."""
    from models.layers import Linear, linear
    torch.manual_seed(0)
    layer = Linear(64, 96)
    for rows in (1, 2, 4, 8, 9):
        x = torch.randn(1, rows, 64)
        reference = F.linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            fast = layer(x)
            transposed = (torch.mm(layer.weight, x[0].t()).t() + layer.bias)[None]
        assert fast.shape == reference.shape == (1, rows, 96) and fast.is_contiguous()
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(fast, transposed if 2 <= rows <= 8 else reference), rows
        assert torch.equal(layer(x), reference)  # gradients on: F.linear
    w = layer.weight.bfloat16()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(x, w), F.linear(x, w))
