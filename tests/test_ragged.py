"""Ragged batches on both trunks: per-row cache lengths, right-padded prefills, per-row crops, forked caches,
and greedy generation of prompts of different lengths in one call, each row token for token what it gives alone."""
from __future__ import annotations

import pytest
import torch

from models import Mamba, Transformer
from objectives import NextTokenPrediction

TRUNKS = {"transformer": lambda: Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=96),
          "mamba": lambda: Mamba(d_model=32, n_layers=2, d_state=8, max_seq_len=96)}


def trunk_of(kind: str):
    torch.manual_seed(0)
    return TRUNKS[kind]().eval()


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", TRUNKS)
def test_a_right_padded_prefill_gives_each_row_what_it_gives_alone(kind):
    trunk = trunk_of(kind)
    lengths = torch.tensor([3, 9, 1, 6])
    x = torch.randn(4, 9, 32)  # the padding positions hold values too: they must not matter
    nxt = torch.randn(4, 3, 32)
    with torch.no_grad():
        cache = trunk.make_cache(4)
        prefill = trunk(x, cache=cache, padding_mask=torch.arange(9) < lengths[:, None])
        assert cache.lengths.tolist() == lengths.tolist() and cache.length == 9
        after = trunk(nxt[:, :2], cache=cache)  # every row continues from its own end
        last = trunk(nxt[:, 2:], cache=cache)
        assert cache.lengths.tolist() == (lengths + 3).tolist()
        for b, n in enumerate(lengths.tolist()):
            alone = trunk(torch.cat([x[b:b + 1, :n], nxt[b:b + 1]], 1))[0]
            close(prefill[b, :n], alone[:n])
            close(torch.cat([after[b], last[b]]), alone[n:])


@pytest.mark.parametrize("kind", TRUNKS)
def test_a_per_row_crop_equals_a_fresh_prefill_of_each_row(kind):
    trunk = trunk_of(kind)
    x = torch.randn(3, 20, 32)
    with torch.no_grad():
        cache = trunk.make_cache(3)
        trunk(x[:, :12], cache=cache)
        trunk(x[:, 12:16], cache=cache)  # four drafts, then each row keeps a different number of them
        cache.crop(torch.tensor([13, 16, 12]))
        assert cache.lengths.tolist() == [13, 16, 12]
        out = trunk(x[:, 16:18], cache=cache)  # the next tokens, at each row's own end
        for b, n in enumerate([13, 16, 12]):
            alone = trunk(torch.cat([x[b:b + 1, :n], x[b:b + 1, 16:18]], 1))[0]
            close(out[b], alone[n:])
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(torch.tensor([16, 18, 14]))  # past row 0's end (15)


@pytest.mark.parametrize("kind", TRUNKS)
def test_a_forked_cache_equals_separate_prefills(kind):
    trunk = trunk_of(kind)
    prefix = torch.randn(1, 11, 32)
    continuations = torch.randn(5, 4, 32)
    with torch.no_grad():
        cache = trunk.make_cache(1)
        trunk(prefix, cache=cache)
        forked = cache.fork([0] * 5)  # one prefix, five parallel continuations
        assert forked.lengths.tolist() == [11] * 5
        out = trunk(continuations, cache=forked)
        assert cache.lengths.tolist() == [11]  # the parent is untouched
        for n in range(5):
            separate = trunk.make_cache(1)
            trunk(prefix, cache=separate)
            close(out[n], trunk(continuations[n:n + 1], cache=separate)[0])
        # forking picks rows: the parent continues as before
        close(trunk(continuations[:1], cache=cache), out[:1])


def test_left_padding_without_a_cache_gives_each_row_what_it_gives_alone():
    for kind in TRUNKS:
        trunk = trunk_of(kind)
        lengths = [5, 2, 8]
        x = torch.randn(3, 8, 32)
        real = torch.arange(8)[None] >= 8 - torch.tensor(lengths)[:, None]
        with torch.no_grad():
            out = trunk(x, padding_mask=real)
            for b, n in enumerate(lengths):
                close(out[b, 8 - n:], trunk(x[b:b + 1, 8 - n:])[0])


def test_padding_the_trunks_cannot_serve_is_refused_with_the_fix():
    x = torch.randn(2, 6, 32)
    hole = torch.tensor([[True, False, True, True, True, True], [True] * 6])
    left = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    with pytest.raises(ValueError, match="Mamba trunk takes padding at either end.*right-pad"):
        trunk_of("mamba")(x, padding_mask=hole)
    for kind in TRUNKS:
        trunk = trunk_of(kind)
        with pytest.raises(ValueError, match="decoding cache takes padding after the real tokens"):
            trunk(x, cache=trunk.make_cache(2), padding_mask=left)
@pytest.mark.parametrize("kind", TRUNKS)
def test_ragged_greedy_generation_equals_each_row_alone(kind):
    torch.manual_seed(0)
    model = NextTokenPrediction(TRUNKS[kind](), vocab_size=50).eval()
    torch.nn.init.normal_(model.embed.weight)  # varied outputs from an untrained model
    lengths = torch.tensor([3, 40, 17, 9, 26])
    prompts = torch.randint(0, 50, (5, 40))  # right-padded: whatever follows a row's length is ignored
    free = model.generate(prompts, 12, prompt_lengths=lengths)
    new = [set(free[b, n : n + 12].tolist()) for b, n in enumerate(lengths.tolist())]
    # an eos that some rows emit and others do not, so that rows finish at different steps
    model.eos_id = next(t for t in sorted(set.union(*new)) if 0 < sum(t in r for r in new) < 5)
    out = model.generate(prompts, 12, prompt_lengths=lengths)
    assert out.shape == (5, 52)
    for b, n in enumerate(lengths.tolist()):
        alone = model.generate(prompts[b:b + 1, :n], 12)[0]
        assert out[b, : n + 12].tolist() == alone.tolist()
        assert (out[b, n + 12:] == model.eos_id).all()  # after a row's own end: eos
