"""The Mamba trunk: the chunked selective scan against a sequential reference (values and gradients), cached
decoding against a full forward, crop / snapshot / restore, the mask error and the trunk contract."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.selective_scan as mm
from models import Mamba
from models.mamba import MambaBlock, MambaResidualBlock
from models.selective_scan import selective_scan, selective_scan_reference, selective_scan_time_major

OPTIONS = {  # which of D, z, delta_bias and softplus a case uses
    "plain": dict(),
    "D": dict(D=True),
    "z": dict(z=True),
    "bias+softplus": dict(delta_bias=True, delta_softplus=True),
    "all": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
}
BC_KINDS = [("varying", "varying"), ("varying", "constant"), ("constant", "varying"), ("constant", "constant")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def scan_args(L, B_kind="varying", C_kind="varying", D=False, z=False, delta_bias=False, delta_softplus=False,
              batch=2, dim=6, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    args = dict(
        u=r(batch, dim, L),
        # positive step sizes of the size a Mamba block makes, or raw values when softplus makes them positive
        delta=r(batch, dim, L) if delta_softplus else torch.rand(batch, dim, L, generator=g, dtype=dtype) * 0.5,
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 4 - 0.1,
        B=r(batch, n, L) if B_kind == "varying" else r(dim, n),
        C=r(batch, n, L) if C_kind == "varying" else r(dim, n),
        D=r(dim) if D else None,
        z=r(batch, dim, L) if z else None,
        delta_bias=r(dim) * 0.5 if delta_bias else None,
        delta_softplus=delta_softplus,
    )
    return args


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: one thread is faster, and it keeps the thousands of small ops of the reference
    loop from stalling on thread hand-offs when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["one segment", "many segments"])
def segments(request, monkeypatch):
    """Run a test with the default segment size (one segment for these small shapes) and with segments of
    three chunks (so the state is carried across chunks and across segments)."""
    if request.param == "many segments":
        monkeypatch.setattr(mm, "SEGMENT_ELEMENTS", 2 * 4 * 6 * mm.CHUNK * 3)
        monkeypatch.setattr(mm, "MIN_CHUNKS", 1)
    return request.param


# --- the scan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 128, 1000])
@pytest.mark.parametrize("B_kind,C_kind", BC_KINDS)
@pytest.mark.parametrize("options", list(OPTIONS))
def test_scan_matches_the_sequential_reference(L, B_kind, C_kind, options, segments):
    args = scan_args(L, B_kind, C_kind, **OPTIONS[options], seed=L)
    out, last = selective_scan(**args, return_last_state=True)
    ref, ref_last = selective_scan_reference(**args, return_last_state=True)
    assert out.shape == (2, 6, L) and last.shape == (2, 6, 4) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    assert rel_err(last, ref_last) < 1e-5
    # without return_last_state: the output alone, as mamba_ssm returns it
    assert torch.equal(selective_scan(**args), out)


@pytest.mark.parametrize("L", [7, 128, 1000])
@pytest.mark.parametrize("B_kind,C_kind", BC_KINDS)
def test_scan_gradients_match_the_reference_autograd(L, B_kind, C_kind, segments):
    args = scan_args(L, B_kind, C_kind, **OPTIONS["all"], seed=L + 1)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    ours = {k: args[k].clone().requires_grad_() for k in names}
    theirs = {k: args[k].clone().requires_grad_() for k in names}
    out, last = selective_scan(**{**args, **ours}, return_last_state=True)
    ref, ref_last = selective_scan_reference(**{**args, **theirs}, return_last_state=True)
    g = torch.Generator().manual_seed(1)
    w, w_last = torch.randn(out.shape, generator=g), torch.randn(last.shape, generator=g)
    ((out * w).sum() + (last * w_last).sum()).backward()
    ((ref * w).sum() + (ref_last * w_last).sum()).backward()
    for k in names:
        assert rel_err(ours[k].grad, theirs[k].grad) < 1e-5, k


def test_scan_gradcheck_in_float64_with_an_initial_state(monkeypatch):
    monkeypatch.setattr(mm, "SEGMENT_ELEMENTS", 1 * 2 * 3 * 4 * 2)  # chunks of 4, two per segment
    monkeypatch.setattr(mm, "CHUNK", 4)
    monkeypatch.setattr(mm, "MIN_CHUNKS", 1)
    g = torch.Generator().manual_seed(0)
    b, L, d, n = 1, 11, 3, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    inputs = (r(b, L, d), r(b, L, d), (-torch.rand(d, n, generator=g, dtype=torch.float64)).requires_grad_(),
              r(b, L, n), r(d, n), r(d), r(b, L, d), r(d), r(b, d, n))

    def f(u, delta, A, B, C, D, z, bias, h0):
        y, last, _ = selective_scan_time_major(u, delta, A, B, C, D, z, bias, True, initial_state=h0)
        return y, last

    assert torch.autograd.gradcheck(f, inputs)


def test_scan_resumes_from_an_initial_state_and_keeps_the_last_states():
    args = scan_args(300, **OPTIONS["all"], seed=3)
    tm = lambda x: x.transpose(1, 2)  # noqa: E731
    common = dict(A=args["A"], D=args["D"], delta_bias=args["delta_bias"], delta_softplus=True)
    part = lambda a, b, **kw: selective_scan_time_major(  # noqa: E731
        tm(args["u"][..., a:b]), tm(args["delta"][..., a:b]), B=tm(args["B"][..., a:b]), C=tm(args["C"][..., a:b]),
        z=tm(args["z"][..., a:b]), **common, **kw)
    full, full_last, kept = part(0, 300, keep_states=5)
    first, first_last, _ = part(0, 170)
    second, second_last, _ = part(170, 300, initial_state=first_last)
    assert rel_err(torch.cat([first, second], 1), full) < 1e-5
    assert rel_err(second_last, full_last) < 1e-5
    # the kept states are the states after positions 295..299
    for i, end in enumerate(range(296, 301)):
        prefix = {k: args[k][..., :end] for k in ("u", "delta", "B", "C", "z")}
        _, state = selective_scan_reference(**{**args, **prefix}, return_last_state=True)
        assert rel_err(kept[i], state) < 1e-5


def test_the_batch_in_row_slices_equals_the_whole_batch(monkeypatch):
    """On a CPU a large batch is scanned a few rows at a time (`_rows_per_slice`): outputs, last and kept states
    and every gradient equal the one-slice scan, with 5 rows in slices of 2, 2 and 1, an initial state, time-varying
    B and constant C (whose gradients are joined by rows and by sum)."""
    g = torch.Generator().manual_seed(7)
    b, L, d, n = 5, 100, 6, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = dict(u=r(b, L, d), delta=r(b, L, d), A=-torch.rand(d, n, generator=g) * 4 - 0.1, B=r(b, L, n),
                  C=r(d, n), D=r(d), z=r(b, L, d), delta_bias=r(d) * 0.5, initial_state=r(b, d, n))
    weights = r(b, L, d), r(b, d, n)

    def scan():
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, last, kept = selective_scan_time_major(**leaves, delta_softplus=True, keep_states=3)
        ((y * weights[0]).sum() + (last * weights[1]).sum()).backward()
        return y.detach(), last.detach(), kept, {k: v.grad for k, v in leaves.items()}

    assert mm._rows_per_slice(b, L, n, d) == b
    whole = scan()
    monkeypatch.setattr(mm, "SEGMENT_ELEMENTS", 2 * n * d * mm.CHUNK * mm.MIN_CHUNKS)
    assert mm._rows_per_slice(b, L, n, d) == 2
    sliced = scan()
    for a, c in zip(whole[:3], sliced[:3]):
        assert rel_err(c, a) < 1e-6
    for k in inputs:
        assert rel_err(sliced[3][k], whole[3][k]) < 1e-6, k


def test_scan_is_stable_for_large_and_tiny_steps():
    """Decays far below fp32's range (delta*A ~ -1000) and steps of 1e-6 both match the reference, finite."""
    args = scan_args(700, seed=5)
    g = torch.Generator().manual_seed(5)
    delta = torch.rand(2, 6, 700, generator=g)
    delta[:, :3] = delta[:, :3] * 60 + 40  # every step wipes the state of these channels
    delta[:, 3:, ::7] = 1e-6
    args.update(delta=delta, A=args["A"] * 4)
    out, last = selective_scan(**args, return_last_state=True)
    ref, ref_last = selective_scan_reference(**args, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert rel_err(out, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5


def test_scan_returns_the_input_dtype_and_accepts_time_major_views():
    args = scan_args(50, **OPTIONS["all"])
    ref = selective_scan(**args)
    half = {k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in args.items()}
    assert selective_scan(**half).dtype == torch.bfloat16
    views = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if isinstance(v, torch.Tensor) and v.dim() == 3 else v)
             for k, v in args.items()}
    assert rel_err(selective_scan(**views), ref) < 1e-6  # (vectorised and strided kernels may round apart)


@pytest.mark.parametrize("seqlen", [128, 1024])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_B_and_C_as_mamba_ssm_tests_them(seqlen, groups):
    """mamba_ssm's tests/ops/test_selective_scan.py grid for grouped B and C, (batch, G, N, L) with G = 1 given as
    4-D too: batch 2, dim 4, dstate 8, with D, z, delta_bias, softplus and the last state, at its tolerances."""
    torch.manual_seed(0)
    batch, dim, dstate = 2, 4, 8
    rtol, atol = 6e-4, 2e-3
    A = -0.5 * torch.rand(dim, dstate)
    B, C = torch.randn(batch, groups, dstate, seqlen), torch.randn(batch, groups, dstate, seqlen)
    D, z = torch.randn(dim), torch.randn(batch, dim, seqlen)
    delta_bias = 0.5 * torch.rand(dim)
    u, delta = torch.randn(batch, dim, seqlen), 0.5 * torch.rand(batch, dim, seqlen)
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, state = selective_scan(**ours, delta_softplus=True, return_last_state=True)
    out_ref, state_ref = selective_scan_reference(**theirs, delta_softplus=True, return_last_state=True)
    assert torch.allclose(out, out_ref, rtol=rtol, atol=atol) and torch.allclose(state, state_ref, rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    tolerance = {"u": (2, 2), "delta": (5, 10), "A": (1, 5), "B": (1, 1), "C": (1, 1), "D": (1, 1), "z": (1, 1),
                 "delta_bias": (1, 1)}
    for k, (r, a) in tolerance.items():
        assert torch.allclose(ours[k].grad, theirs[k].grad, rtol=rtol * r, atol=atol * a), k
    # the grouped reference is channel by channel the ungrouped one with the channel's group as (batch, N, L)
    with torch.no_grad():
        for d in range(dim):
            k = d // (dim // groups)
            one = selective_scan_reference(u[:, d:d + 1], delta[:, d:d + 1], A[d:d + 1], B[:, k], C[:, k], D[d:d + 1],
                                           z[:, d:d + 1], delta_bias[d:d + 1], True)
            torch.testing.assert_close(one, out_ref[:, d:d + 1].detach(), rtol=1e-5, atol=1e-6)


def test_grouped_scan_refuses_groups_that_do_not_divide_dim_and_complex_A():
    args = scan_args(10, dim=6)
    with pytest.raises(ValueError, match="4 groups of B/C do not divide the 6 channels"):
        selective_scan(**{**args, "B": torch.randn(2, 4, 4, 10), "C": torch.randn(2, 4, 4, 10)})
    with pytest.raises(NotImplementedError, match="real A only"):
        selective_scan(**{**args, "A": args["A"].to(torch.complex64)})


# --- the trunk ------------------------------------------------------------------------------------------------


def tiny_trunk(**kw) -> Mamba:
    torch.manual_seed(0)
    return Mamba(**{"d_model": 32, "n_layers": 2, "d_state": 8, **kw}).eval()


def steps(trunk, x, cache, cuts):
    """Advance the cache over x in pieces ending at each cut; the pieces' outputs concatenated."""
    outs, start = [], cache.length
    for end in cuts:
        outs.append(trunk(x[:, start:end], cache=cache))
        start = end
    return torch.cat(outs, 1)


def test_incremental_decoding_equals_a_full_forward():
    trunk = tiny_trunk()
    x = torch.randn(2, 60, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2)
        # a prompt, single tokens, a few tokens at a time, single tokens again, and a long piece
        cuts = [20, 21, 22, 23, 27, 28, 35, 36, 60]
        pieces = steps(trunk, x, cache, cuts)
    assert cache.length == 60
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=1e-5)
    assert rel_err(pieces, full) < 1e-5


def test_crop_back_then_readvance_equals_a_full_forward():
    trunk = tiny_trunk()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2)
        steps(trunk, x, cache, [10, 11, 12, 30])
        cache.crop(21)  # back into the last multi-token advance (speculative decoding's rejection)
        torch.testing.assert_close(steps(trunk, x, cache, [25, 26]), full[:, 21:26], atol=1e-5, rtol=1e-5)
        cache.crop(11)  # back past several advances
        torch.testing.assert_close(steps(trunk, x, cache, [12, 50]), full[:, 11:], atol=1e-5, rtol=1e-5)
        cache.crop(49)  # back by one single-token step
        torch.testing.assert_close(steps(trunk, x, cache, [50]), full[:, 49:], atol=1e-5, rtol=1e-5)


def test_crop_further_than_the_kept_history_is_a_clear_error():
    trunk = tiny_trunk()
    x = torch.randn(1, 30, 32)
    with torch.no_grad():
        cache = trunk.make_cache(1, history=4)
        steps(trunk, x, cache, [10, 11, 12, 13])
        cache.crop(9)  # 13 - 4: still kept
        steps(trunk, x, cache, [20])  # one advance of 11 positions keeps only its last 5 states
        with pytest.raises(ValueError, match="cannot crop the Mamba cache back to 14"):
            cache.crop(14)
        cache.crop(16)
        with pytest.raises(ValueError):
            cache.crop(17)  # forward is not a crop


def test_snapshot_and_restore():
    trunk = tiny_trunk()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2)
        steps(trunk, x, cache, [20])
        snap = cache.snapshot()
        steps(trunk, torch.randn(2, 30, 32), cache, [21, 22, 25])  # a rejected continuation
        cache.restore(snap)
        assert cache.length == 20
        torch.testing.assert_close(steps(trunk, x, cache, [21, 40]), full[:, 20:], atol=1e-5, rtol=1e-5)
        # after a restore the history of the snapshot's own continuation is still there to crop into
        cache.crop(15)
        torch.testing.assert_close(steps(trunk, x, cache, [40]), full[:, 15:], atol=1e-5, rtol=1e-5)
        # a snapshot taken before the ring overwrote it: only the snapshot point itself comes back
        snap = cache.snapshot()
        cache.crop(30)
        steps(trunk, torch.randn(2, 40, 32), cache, [31, 32])
        cache.restore(snap)
        with pytest.raises(ValueError):
            cache.crop(30)
        torch.testing.assert_close(trunk(torch.zeros(2, 0, 32), cache=cache), full[:, :0])


@pytest.mark.parametrize("mask", ["full", torch.ones(5, 5, dtype=torch.bool)])
def test_a_non_causal_mask_is_a_clear_error(mask):
    trunk = tiny_trunk()
    x = torch.randn(1, 5, 32)
    assert trunk.supported_masks == ("causal",)
    with pytest.raises(ValueError, match="Mamba trunk supports only causal masks.*transformer trunk"):
        trunk(x, mask=mask)
    with pytest.raises(ValueError, match="Mamba block supports only causal masks"):
        trunk.make_block()(x, mask=mask)


def test_trunk_contract_and_reference_parameters():
    trunk = Mamba(d_model=48, n_layers=3)
    assert (trunk.d_model, trunk.max_seq_len, len(trunk.blocks)) == (48, 1_000_000, 3)
    x = torch.randn(2, 9, 48)
    y = trunk(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trunk.parameters())
    block = trunk.make_block()
    assert isinstance(block, MambaResidualBlock) and block is not trunk.blocks[0]
    assert block(x, mask="causal", cache=None).shape == x.shape
    cache = block.make_cache(2)
    assert cache.length == 0 and block(x, cache=cache).shape == x.shape and cache.length == 9
    # mamba_ssm's names and shapes (d_inner 96, dt_rank ceil(48/16) = 3, d_state 16, d_conv 4)
    shapes = {k: tuple(v.shape) for k, v in block.mixer.state_dict().items()}
    assert shapes == {"A_log": (96, 16), "D": (96,), "in_proj.weight": (192, 48), "conv1d.weight": (96, 1, 4),
                      "conv1d.bias": (96,), "x_proj.weight": (3 + 32, 96), "dt_proj.weight": (96, 3),
                      "dt_proj.bias": (96,), "out_proj.weight": (48, 96)}
    mixer = block.mixer
    torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1, 17.0).repeat(96, 1))
    assert torch.equal(mixer.D, torch.ones(96))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert mixer.dt_proj.weight.abs().max() <= 3 ** -0.5
    # out_proj: the default init scaled down by sqrt(n_layers), like GPT-2's residual projections
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(96) / math.sqrt(3) + 1e-6
    assert mixer.in_proj.weight.abs().max() > 1 / math.sqrt(48) / math.sqrt(3)


def test_state_dicts_move_to_mambapy_and_agree():
    """The same weights in mambapy's independent implementation (parallel scan) give the same outputs."""
    import mambapy.mamba as mambapy  # a dev dependency: the test runs wherever the suite does
    torch.manual_seed(0)
    ours = MambaBlock(32, d_state=8)
    theirs = mambapy.MambaBlock(mambapy.MambaConfig(d_model=32, n_layers=1, d_state=8))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 32)
    assert rel_err(ours(x), theirs(x)) < 1e-5


def test_autocast_bfloat16_forward_and_backward():
    trunk = tiny_trunk().train()
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trunk(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())


def test_next_token_prediction_trains_and_generates_on_the_mamba_trunk():
    from objectives import NextTokenPrediction
    torch.manual_seed(0)
    model = NextTokenPrediction(Mamba(d_model=32, n_layers=2, d_state=8, max_seq_len=64), vocab_size=50)
    tokens = torch.randint(0, 50, (2, 24))
    out = model.loss({"tokens": tokens, "loss_mask": torch.ones(2, 24)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                               if p.grad is not None)
    model.eval()
    generated = model.generate(tokens[:, :10], 6)
    greedy = tokens[:, :10]
    with torch.no_grad():
        for _ in range(6):  # the same greedy decoding without a cache
            greedy = torch.cat([greedy, model.logits(model.hidden(greedy))[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, greedy)


def test_multi_token_prediction_and_speculative_decoding_on_the_mamba_trunk():
    """MTP heads made by the trunk's make_block train, and draft-then-verify decoding (which crops the Mamba
    caches back to the accepted prefix) reproduces plain greedy decoding."""
    from objectives import MultiTokenPrediction
    from objectives.decoding.speculative import speculative_generate
    torch.manual_seed(0)
    model = MultiTokenPrediction(Mamba(d_model=32, n_layers=2, d_state=8, max_seq_len=64), vocab_size=20, n_future=3)
    tokens = torch.randint(0, 20, (2, 30))
    loss = model.loss({"tokens": tokens, "loss_mask": torch.ones(2, 30)})["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    greedy = model.generate(tokens[:, :8], 20)
    drafted, info = speculative_generate(model, tokens[:, :8], 20, model.drafters(3)["heads"])
    assert torch.equal(drafted, greedy) and info["steps"] <= 20


def test_an_objective_that_needs_full_attention_refuses_the_mamba_trunk():
    from objectives import NextTokenPrediction

    class NeedsFullAttention(NextTokenPrediction):
        required_masks = ("causal", "full")

    with pytest.raises(ValueError, match="full.*Mamba"):
        NeedsFullAttention(Mamba(d_model=16, n_layers=1), vocab_size=10)


def test_the_trunk_initialises_its_step_sizes_in_the_range_it_is_given():
    """dt_min / dt_max reach every block: softplus(dt_proj.bias) lies in [dt_min, dt_max] and spans it (the
    smallest step sizes set how far back a fresh model's channels remember); a bad range is a clear error."""
    torch.manual_seed(0)
    for lo, hi in ((1e-3, 1e-1), (1e-5, 1e-3)):
        trunk = Mamba(d_model=32, n_layers=2, dt_min=lo, dt_max=hi)
        for block in trunk.blocks:
            dt = F.softplus(block.mixer.dt_proj.bias.detach().double())
            assert dt.min() >= lo * (1 - 1e-5) and dt.max() <= hi * (1 + 1e-5)
            assert dt.min() < lo * 2 and dt.max() > hi / 2
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(d_model=32, n_layers=1, dt_min=0.1, dt_max=0.01)
