"""Every causal objective runs on every trunk through the trunk contract alone."""
from __future__ import annotations

import pytest
import torch

from conftest import train_on_batch
from test_mamba2 import rel_err, steps
from models import Mamba, Mamba2, RWKV7, Transformer
from objectives import DeepSeekMTP, MultiTokenPrediction, NextTokenPrediction

TRUNKS = {"transformer": lambda: Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=128),
          "mamba": lambda: Mamba(d_model=32, n_layers=2),
          "mamba2": lambda: Mamba2(d_model=32, n_layers=2, d_state=8, headdim=16, chunk_size=8),
          "rwkv7": lambda: RWKV7(d_model=32, n_layers=2, head_size=8, decay_lora=8, a_lora=8, value_lora=8,
                                 gate_lora=8, chunk_size=8)}


@pytest.mark.parametrize("trunk", TRUNKS)
@pytest.mark.parametrize("objective", [NextTokenPrediction, MultiTokenPrediction, DeepSeekMTP])
def test_causal_objective_trains_and_decodes_losslessly_on_every_trunk(trunk, objective):
    torch.manual_seed(0)
    model = objective(TRUNKS[trunk](), vocab_size=40)
    tokens = torch.randint(0, 40, (2, 33))
    batch = {"tokens": tokens, "loss_mask": torch.ones(2, 33)}
    first = model.loss(batch)["loss"].item()
    assert train_on_batch(model, batch, steps=15, lr=1e-2) < first
    if objective is MultiTokenPrediction:  # heads made by make_block() are of the trunk's kind
        assert type(model.heads[0][0]) is type(model.trunk.blocks[0])
    model.eval()
    prompt = tokens[:, :6]
    assert torch.equal(model.generate(prompt, 24), model.generate(prompt, 24, speculative=True))


def test_an_objective_needing_full_attention_refuses_the_mamba_trunk():
    class NeedsBidirectional(NextTokenPrediction):
        required_masks = ("full",)

    with pytest.raises(ValueError, match=r"NeedsBidirectional needs the full attention mask.*Mamba trunk"):
        NeedsBidirectional(Mamba(d_model=32, n_layers=1), vocab_size=40)
    NeedsBidirectional(Transformer(d_model=32, n_layers=1, n_heads=2), vocab_size=40)


@pytest.mark.parametrize("trunk", TRUNKS)
def test_every_trunk_and_its_decoding_state_satisfy_the_contracts(trunk):
    """The attributes `models.contracts.Trunk` and `DecodingState` name exist on every trunk and cache, and a
    cache behaves as the contract says: rows keep their own lengths, crop forgets, fork copies rows."""
    from models.contracts import DecodingState, Trunk
    net = TRUNKS[trunk]().eval()
    assert isinstance(net, Trunk) and set(net.supported_masks) <= {"causal", "full", "tensor"}
    cache = net.make_cache(2)
    assert isinstance(cache, DecodingState)
    x = torch.randn(2, 5, net.d_model)
    with torch.no_grad():
        net(x, cache=cache, padding_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    assert cache.lengths.tolist() == [5, 3] and cache.length == 5
    forked = cache.fork(torch.tensor([1, 1, 0]))
    assert forked.lengths.tolist() == [3, 3, 5]
    cache.crop(2)
    assert cache.lengths.tolist() == [2, 2] and forked.lengths.tolist() == [3, 3, 5]


@pytest.mark.parametrize("name", ["mamba", "mamba2", "rwkv7"])
def test_recurrent_caches_crop_per_row_snapshot_restore_and_fork(name):
    """The state-space and RWKV caches roll back (crop, also per row, as speculative decoding does), restore a
    snapshot after a continuation thrown away, and fork rows, each time agreeing with a full forward."""
    torch.manual_seed(0)
    trunk = TRUNKS[name]().eval()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2)
        steps(trunk, x, cache, [10, 11, 12, 30])
        cache.crop(21)  # back into the last multi-token advance (a rejected speculative draft)
        assert rel_err(steps(trunk, x, cache, [25, 26]), full[:, 21:26]) < 1e-5
        cache.crop(torch.tensor([11, 24]))  # per row
        y = trunk(torch.stack([x[0, 11], x[1, 24]])[:, None], cache=cache)
        assert rel_err(y[0, 0], full[0, 11]) < 1e-5 and rel_err(y[1, 0], full[1, 24]) < 1e-5
        cache.crop(12)
        snap = cache.snapshot()
        steps(trunk, torch.randn(2, 20, 32), cache, [13, 14, 18])  # a continuation thrown away
        cache.restore(snap)
        assert cache.length == 12 and rel_err(steps(trunk, x, cache, [13, 40]), full[:, 12:40]) < 1e-5
        forked = cache.fork(torch.tensor([1, 1, 0]))
        y = trunk(torch.stack([x[1, 40], x[1, 40], x[0, 40]])[:, None], cache=forked)
        assert forked.lengths.tolist() == [41, 41, 41] and cache.lengths.tolist() == [40, 40]
        assert rel_err(y[:, 0], full[[1, 1, 0], 40]) < 1e-5


@pytest.mark.parametrize("name", ["mamba2", "rwkv7"])
def test_bfloat16_autocast_forward_and_backward_stay_close_to_fp32(name):
    torch.manual_seed(0)
    trunk = TRUNKS[name]().train()
    with torch.no_grad():  # RWKV-7 starts its output projections at zero: give every block something to say
        for p in trunk.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1)
    x = 0.01 * torch.randn(2, 40, 32)  # small against the blocks' outputs (pre-norm), so they dominate the result
    ref = trunk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trunk(x)
    y.float().square().mean().backward()
    assert rel_err(y.float(), ref) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())
