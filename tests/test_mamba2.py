"""The Mamba-2 trunk: the chunked SSD against its sequential recurrence (values and gradients), cached decoding
against a full forward, crop / snapshot / restore, padding, the mask error and the reference's parameters."""
from __future__ import annotations

import pytest
import torch

from models import Mamba2
from models.mamba2 import ChunkedSSD, Mamba2Block, ssd_reference, ssd_scan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ssd_args(L, batch=2, heads=4, headdim=3, groups=2, n=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(batch, L, heads, headdim), dt=torch.rand(batch, L, heads, generator=g, dtype=dtype) * 0.5,
                A=-torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.1, B=r(batch, L, groups, n),
                C=r(batch, L, groups, n))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk", [1, 8, 13, 64])  # 13 does not divide 100; 64 is more than half of it
@pytest.mark.parametrize("D,z", [(False, False), (True, False), (False, True), (True, True)])
def test_chunked_ssd_equals_the_sequential_recurrence(chunk, D, z):
    args = ssd_args(100, seed=chunk)
    g = torch.Generator().manual_seed(1)
    extra = dict(D=torch.randn(4, generator=g) if D else None, z=torch.randn(2, 100, 4, 3, generator=g) if z else None)
    h0 = torch.randn(2, 4, 3, 5, generator=g)
    y, last = ssd_scan(**args, chunk_size=chunk, **extra, initial_states=h0, return_final_states=True)
    ref, ref_last = ssd_reference(**args, **extra, initial_states=h0)
    assert y.shape == (2, 100, 4, 3) and last.shape == (2, 4, 3, 5) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5


def test_softplus_and_bias_of_dt_and_one_group_for_all_heads():
    args = ssd_args(40, groups=1, seed=3)
    bias = torch.randn(4)
    raw = torch.randn(2, 40, 4)
    y = ssd_scan(**{**args, "dt": raw}, chunk_size=16, dt_bias=bias, dt_softplus=True)
    ref, _ = ssd_reference(**{**args, "dt": torch.nn.functional.softplus(raw + bias)})
    assert rel_err(y, ref) < 1e-5


def test_chunked_ssd_gradients_match_the_reference_autograd():
    args = ssd_args(45, seed=7)
    g = torch.Generator().manual_seed(2)
    args.update(D=torch.randn(4, generator=g), z=torch.randn(2, 45, 4, 3, generator=g),
                initial_states=torch.randn(2, 4, 3, 5, generator=g))
    ours = {k: v.clone().requires_grad_() for k, v in args.items()}
    theirs = {k: v.clone().double().requires_grad_() for k, v in args.items()}
    y, last = ssd_scan(**ours, chunk_size=10, return_final_states=True)
    ref, ref_last = ssd_reference(**theirs)
    w, w_last = torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g)
    ((y * w).sum() + (last * w_last).sum()).backward()
    ((ref * w.double()).sum() + (ref_last * w_last.double()).sum()).backward()
    for k in args:
        assert rel_err(ours[k].grad, theirs[k].grad) < 1e-5, k


def test_chunked_ssd_is_finite_for_strong_decays():
    """Log-decays of -100 per step (far below fp32's exp range over a chunk) match the reference, finite."""
    args = ssd_args(70, seed=4)
    args["dt"][:, :, :2] = 25.0
    y = ssd_scan(**args, chunk_size=32)
    ref, _ = ssd_reference(**args)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


# --- the trunk ------------------------------------------------------------------------------------------------


def tiny_trunk(**kw) -> Mamba2:
    torch.manual_seed(0)
    return Mamba2(**{"d_model": 32, "n_layers": 2, "d_state": 8, "headdim": 16, "chunk_size": 8, **kw}).eval()


def steps(trunk, x, cache, cuts):
    outs, start = [], cache.length
    for end in cuts:
        outs.append(trunk(x[:, start:end], cache=cache))
        start = end
    return torch.cat(outs, 1)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_incremental_decoding_equals_a_full_forward(ngroups):
    trunk = tiny_trunk(ngroups=ngroups)
    x = torch.randn(2, 90, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2, history=8)
        # a prompt longer than the history, single tokens, a few at a time, and a long piece again
        pieces = steps(trunk, x, cache, [30, 31, 32, 36, 37, 45, 90])
    assert cache.length == 90
    assert rel_err(pieces, full) < 1e-5


def test_left_padding_leaves_the_rows_as_they_are_alone():
    trunk = tiny_trunk()
    x = torch.randn(1, 20, 32)
    padded = torch.cat([torch.randn(1, 7, 32), x], 1)
    mask = torch.ones(1, 27, dtype=torch.bool)
    mask[:, :7] = False
    with torch.no_grad():
        alone = trunk(x)
        out = trunk(padded, padding_mask=mask)
    assert rel_err(out[:, 7:], alone) < 1e-5


def test_ragged_rows_in_one_cache_and_fork():
    """Right-padded prompts of 12 and 7 tokens prefill one cache; each row then decodes as it does alone, and
    a fork of the cache continues the rows it copied."""
    trunk = tiny_trunk()
    x = torch.randn(2, 20, 32)
    lengths = [12, 7]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        alone = [trunk(x[i:i + 1, :lengths[i] + 5]) for i in range(2)]
        cache = trunk.make_cache(2)
        prompt = torch.where(mask[..., None], x[:, :12], torch.zeros(()))
        out = trunk(prompt, cache=cache, padding_mask=mask)
        assert cache.lengths.tolist() == lengths
        for i in range(2):
            assert rel_err(out[i, :lengths[i]], alone[i][0, :lengths[i]]) < 1e-5
        forked = cache.fork([1, 0, 1])
        for t in range(5):
            step = torch.stack([x[i, lengths[i] + t] for i in range(2)])[:, None]
            y = trunk(step, cache=cache)
            for i in range(2):
                assert rel_err(y[i, 0], alone[i][0, lengths[i] + t]) < 1e-5
        y = trunk(torch.stack([x[1, 7], x[0, 12], x[1, 7]])[:, None], cache=forked)
        assert rel_err(y[0, 0], alone[1][0, 7]) < 1e-5 and rel_err(y[1, 0], alone[0][0, 12]) < 1e-5


@pytest.mark.parametrize("mask", ["full", torch.ones(5, 5, dtype=torch.bool)])
def test_a_non_causal_mask_is_a_clear_error(mask):
    trunk = tiny_trunk()
    with pytest.raises(ValueError, match="Mamba-2 trunk supports only causal masks.*transformer trunk"):
        trunk(torch.randn(1, 5, 32), mask=mask)


def test_a_bidirectional_objective_refuses_the_trunk_by_name():
    from objectives import MaskedDiffusion
    with pytest.raises(ValueError, match="needs the full attention mask.*Mamba2 trunk"):
        MaskedDiffusion(tiny_trunk(), vocab_size=40)


def test_reference_parameter_names_shapes_and_init():
    block = Mamba2Block(64, d_state=16, headdim=32, ngroups=2)  # d_inner 128, 4 heads, 2 groups
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {"dt_bias": (4,), "A_log": (4,), "D": (4,), "in_proj.weight": (2 * 128 + 2 * 2 * 16 + 4, 64),
                      "conv1d.weight": (128 + 64, 1, 4), "conv1d.bias": (128 + 64,), "norm.weight": (128,),
                      "out_proj.weight": (64, 128)}
    A = torch.exp(block.A_log)
    assert A.min() >= 1 and A.max() <= 16 and torch.equal(block.D, torch.ones(4))
    dt = torch.nn.functional.softplus(block.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    with pytest.raises(ValueError, match="headdim 48 does not divide"):
        Mamba2Block(64, headdim=48)


def test_the_block_computes_in_bfloat16_under_autocast():
    trunk = tiny_trunk()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trunk.blocks[0].mixer(torch.randn(2, 40, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("piece_tokens,ngroups", [(10_000, 1), (16, 2)])  # one piece, or runs passing the state on
def test_recompute_gives_the_same_gradients_and_runs_the_ssd_forward_once(piece_tokens, ngroups, monkeypatch):
    """Recompute reruns each piece in the backward but takes the SSD's output from the first run: the gradients
    equal those without recompute, and the SSD's forward runs as many times in both."""
    forwards = []
    real_forward = ChunkedSSD._forward
    monkeypatch.setattr(ChunkedSSD, "_forward", staticmethod(lambda *a: forwards.append(1) or real_forward(*a)))
    x = torch.randn(2, 30, 32)
    grads, counts = [], []
    for recompute in (False, True):
        forwards.clear()
        trunk = tiny_trunk(recompute=recompute, piece_tokens=piece_tokens, ngroups=ngroups).train()
        xi = x.clone().requires_grad_()
        trunk(xi).square().mean().backward()
        grads.append([xi.grad] + [p.grad for p in trunk.parameters()])
        counts.append(len(forwards))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("piece_tokens", [8, 16, 64])  # runs of one row (4 or 2 per row), or two rows at a time
def test_pieces_equal_one_pass_in_outputs_and_gradients(piece_tokens):
    """The whole-sequence path in pieces (several rows, or runs of a row passing the conv inputs and the SSD
    state on) gives the outputs and gradients of one pass over everything."""
    x = torch.randn(3, 30, 32)
    outs, grads = [], []
    for pieces in (10_000, piece_tokens):
        trunk = tiny_trunk(piece_tokens=pieces).train()
        xi = x.clone().requires_grad_()
        y = trunk(xi)
        (y * torch.linspace(-1, 1, 32)).square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in trunk.parameters()])
    assert rel_err(outs[1], outs[0]) < 1e-5
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5


def test_the_conv_inputs_passed_between_pieces_are_a_copy_of_the_last_ones():
    """A piece hands the next its last d_conv - 1 raw conv inputs, which the next piece's checkpoint keeps until the
    backward: they must own their memory (a view would keep the piece's whole projection alive, conv_dim + d_inner
    + nheads numbers a position), and a piece shorter than the window takes the rest from the inputs before it."""
    block = tiny_trunk(recompute=True).train().blocks[0].mixer
    w = block.d_conv - 1
    u = torch.randn(1, 24, 32, requires_grad=True)
    raw = torch.split(block.in_proj(u), [block.d_inner, block.conv_dim, block.nheads], dim=-1)[1]
    _, tail, _ = block._piece(u, None, None, None)
    assert tail.untyped_storage().nbytes() == tail.numel() * tail.element_size()
    assert torch.equal(tail, raw[:, -w:])
    short = torch.randn(1, w - 1, 32)
    _, tail2, _ = block._piece(short, tail, None, None)
    raw2 = torch.split(block.in_proj(short), [block.d_inner, block.conv_dim, block.nheads], dim=-1)[1]
    assert torch.equal(tail2, torch.cat([tail[:, -1:], raw2], 1))
