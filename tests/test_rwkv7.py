"""The RWKV-7 trunk: the chunked generalised delta rule against its recurrence (values, gradients, the strongest
decay), the recurrence against the paper's matrix form, cached decoding against a full forward, crop / snapshot /
restore / fork, padding and ragged rows, multi-pass training (Coconut), bf16 autocast, and a peer check against
the RWKV-LM pip package (`rwkv`, its plain-torch RWKV-7 "x070" model) on shared random weights."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from models import RWKV7
from models.rwkv7 import DECAY_SCALE, wkv_chunked, wkv_recurrent
from test_mamba2 import one_thread, rel_err, steps  # noqa: F401 (one_thread: the autouse fixture, 1 thread)


def rule_args(T, batch=2, heads=3, K=5, V=4, seed=0, dtype=torch.float64, decay=None):
    """Inputs of the rule as RWKV-7 makes them: log-decays in (-e^{-0.5}, 0), a = -kappa and b = kappa * lr with
    kappa of unit length and the in-context learning rate lr in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    kappa = F.normalize(r(batch, T, heads, K), dim=-1)
    lr = torch.rand(batch, T, heads, K, generator=g, dtype=dtype)
    log_w = -DECAY_SCALE * torch.rand(batch, T, heads, K, generator=g, dtype=dtype) if decay is None \
        else torch.full((batch, T, heads, K), decay, dtype=dtype)
    return dict(r=r(batch, T, heads, K), log_w=log_w, k=r(batch, T, heads, K), v=r(batch, T, heads, V), a=-kappa,
                b=kappa * lr), r(batch, heads, K, V)


# --- the rule -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])  # 5 and 8 do not divide 37; 64 is longer than the sequence
def test_chunked_rule_equals_the_recurrence_in_fp64(chunk):
    args, h0 = rule_args(37, seed=chunk)
    o, last = wkv_chunked(**args, chunk_size=chunk, initial_state=h0)
    ref, ref_last = wkv_recurrent(**args, initial_state=h0)
    assert o.shape == (2, 37, 3, 4) and last.shape == (2, 3, 5, 4)
    torch.testing.assert_close(o, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(last, ref_last, atol=1e-9, rtol=0)


@pytest.mark.parametrize("chunk", [8, 13, 32])
def test_chunked_rule_in_fp32_equals_the_fp64_recurrence(chunk):
    args, h0 = rule_args(70, seed=3)
    o, last = wkv_chunked(**{k: v.float() for k, v in args.items()}, chunk_size=chunk, initial_state=h0.float())
    ref, ref_last = wkv_recurrent(**args, initial_state=h0)
    assert o.dtype == torch.float32
    assert rel_err(o, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5


@pytest.mark.parametrize("chunk", [16, 64, 256])
def test_chunked_rule_at_the_strongest_decay_stays_finite_and_exact(chunk):
    """Every channel at RWKV-7's strongest decay (w = 0.545): a chunk of 256 decays by e^-155, beyond fp32's range
    (e^88) for a division by the chunk's cumulative decay; the ratios factored at the chunk's middle stay within
    e^78 and the result exact."""
    args, h0 = rule_args(300, seed=4, decay=-DECAY_SCALE)
    o, last = wkv_chunked(**{k: v.float() for k, v in args.items()}, chunk_size=chunk, initial_state=h0.float())
    ref, ref_last = wkv_recurrent(**args, initial_state=h0)
    assert torch.isfinite(o).all() and rel_err(o, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5


def test_chunked_rule_gradients_equal_the_recurrence_gradients():
    args, h0 = rule_args(21, seed=7)
    args["initial_state"] = h0
    ours = {k: v.clone().requires_grad_() for k, v in args.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in args.items()}
    o, last = wkv_chunked(**ours, chunk_size=8)
    ref, ref_last = wkv_recurrent(**theirs)
    g = torch.Generator().manual_seed(1)
    w, w_last = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(last.shape, generator=g, dtype=o.dtype)
    ((o * w).sum() + (last * w_last).sum()).backward()
    ((ref * w).sum() + (ref_last * w_last).sum()).backward()
    for k in args:
        assert ours[k].grad.abs().sum() > 0 and rel_err(ours[k].grad, theirs[k].grad) < 1e-9, k


def test_the_recurrence_is_the_papers_matrix_rule():
    """S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k~_t and o_t = S_t r_t, written with explicit
    N x N matrices in the paper's orientation (values by keys) for one row and head."""
    args, _ = rule_args(6, batch=1, heads=1, K=4, V=4, seed=5)
    o, last = wkv_recurrent(**args)
    get = lambda name, t: args[name][0, t, 0]  # noqa: E731
    S = torch.zeros(4, 4, dtype=torch.float64)
    for t in range(6):
        kappa, lr = -get("a", t), get("b", t) / -get("a", t)
        transition = torch.diag(torch.exp(get("log_w", t))) - torch.outer(kappa, lr * kappa)
        S = S @ transition + torch.outer(get("v", t), get("k", t))
        torch.testing.assert_close(o[0, t, 0], S @ get("r", t))
    torch.testing.assert_close(last[0, 0], S.T)  # the code keeps S^T: keys by values


# --- the trunk ----------------------------------------------------------------------------------------------------


def tiny_trunk(**kw) -> RWKV7:
    """Three layers (the value residual reaches two), random weights around the reference's init (whose zero
    output projections would make every block the identity)."""
    torch.manual_seed(0)
    trunk = RWKV7(**{"d_model": 32, "n_layers": 3, "head_size": 8, "d_ffn": 64, "decay_lora": 4, "a_lora": 4,
                     "value_lora": 4, "gate_lora": 4, "chunk_size": 8, **kw})
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return trunk.eval()


def test_decoding_token_by_token_and_in_pieces_equals_the_full_forward():
    trunk = tiny_trunk()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(2, history=8)
        one_by_one = steps(trunk, x, cache, range(1, 13))
        # a piece longer than the history (chunked, then single steps), single tokens, a few, a long piece again
        pieces = steps(trunk, x, cache, [30, 31, 32, 36, 37, 50])
    assert cache.length == 50
    assert rel_err(one_by_one, full[:, :12]) < 1e-5 and rel_err(pieces, full[:, 12:]) < 1e-5


def test_left_padding_leaves_a_row_as_it_is_alone():
    trunk = tiny_trunk()
    x = torch.randn(1, 20, 32)
    padded = torch.cat([torch.randn(1, 7, 32), x], 1)  # the padding holds values: they must not matter
    mask = torch.arange(27)[None] >= 7
    with torch.no_grad():
        assert rel_err(trunk(padded, padding_mask=mask)[:, 7:], trunk(x)) < 1e-5


def test_ragged_rows_in_one_cache_decode_as_each_row_alone_and_padding_leaves_the_state():
    """Right-padded prompts of 12 and 7 tokens prefill one cache: each row's outputs and states are those of the row
    alone (the padded positions, holding values, change nothing), and each row continues from its own end."""
    trunk = tiny_trunk()
    x = torch.randn(2, 20, 32)
    lengths = [12, 7]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        cache = trunk.make_cache(2)
        out = trunk(x[:, :12], cache=cache, padding_mask=mask)
        assert cache.lengths.tolist() == lengths
        for i, n in enumerate(lengths):
            alone = trunk.make_cache(1)
            ref = trunk(x[i:i + 1, :n], cache=alone)
            assert rel_err(out[i, :n], ref[0]) < 1e-5
            for ours, theirs in zip(cache, alone):
                assert rel_err(ours.ssm_state[i], theirs.ssm_state[0]) < 1e-5
                assert rel_err(ours.conv_state[i], theirs.conv_state[0]) < 1e-6
        for t in range(3):
            y = trunk(torch.stack([x[i, n + t] for i, n in enumerate(lengths)])[:, None], cache=cache)
            for i, n in enumerate(lengths):
                assert rel_err(y[i, 0], trunk(x[i:i + 1, :n + t + 1])[0, -1]) < 1e-5


@pytest.mark.parametrize("mask", ["full", torch.ones(5, 5, dtype=torch.bool)])
def test_a_non_causal_mask_is_a_clear_error(mask):
    with pytest.raises(ValueError, match="RWKV-7 trunk supports only causal masks.*transformer trunk"):
        tiny_trunk()(torch.randn(1, 5, 32), mask=mask)


def test_a_bidirectional_objective_refuses_the_trunk_by_name():
    from objectives import MaskedDiffusion
    with pytest.raises(ValueError, match="needs the full attention mask.*RWKV7 trunk"):
        MaskedDiffusion(tiny_trunk(), vocab_size=40)


def test_value_residual_blocks_and_heads():
    """Layer 0 hands its values on (it has no value residual itself, as the reference); a head block from
    make_block() has none either; no parameter is left without a gradient (DDP needs none unused)."""
    trunk = tiny_trunk().train()
    assert not hasattr(trunk.blocks[0].att, "v0") and all(hasattr(b.att, "v0") for b in trunk.blocks[1:])
    head = trunk.make_block()
    assert type(head) is type(trunk.blocks[0]) and not hasattr(head.att, "v0")
    with torch.no_grad():  # off the init's zeros (output projections, first low-rank factors)
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    head(trunk(torch.randn(2, 9, 32))).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*trunk.parameters(), *head.parameters()])


def test_three_pass_hidden_state_feedback_has_the_gradients_of_full_forwards():
    """Coconut's continuous thoughts: feeding the last hidden state back through one cache, trained, has the
    gradients of full forwards over the same embeddings."""
    trunk = tiny_trunk().train()
    x0, weights = torch.randn(2, 4, 32), torch.randn(2, 6, 32)

    def grads(cached: bool):
        trunk.zero_grad()
        x = x0.clone().requires_grad_()
        if cached:
            cache = trunk.make_cache(2)
            outs = [trunk(x, cache=cache)]
            for _ in range(2):
                outs.append(trunk(outs[-1][:, -1:], cache=cache))
            out = torch.cat(outs, 1)
        else:
            seq = x
            for _ in range(2):
                seq = torch.cat([seq, trunk(seq)[:, -1:]], 1)
            out = trunk(seq)
        (out * weights).sum().backward()
        return [p.grad.clone() for p in trunk.parameters()] + [x.grad.clone()]

    cached, full = grads(True), grads(False)
    assert all(g.abs().sum() > 0 for g in full)
    assert max(rel_err(a, b) for a, b in zip(cached, full)) < 1e-5


def test_coconut_cached_passes_equal_recomputed_passes(monkeypatch):
    """Coconut at stage 3 (three thoughts a row): its passes through one shared cache (a ragged prefill, single
    steps, a ragged rest) give the loss and gradients of its passes recomputed by full forwards."""
    from test_coconut import EOS, V, hand_batch

    from objectives import Coconut
    cached = []
    monkeypatch.setattr(Coconut, "_cached_passes", lambda self, *a, _f=Coconut._cached_passes: cached.append(1)
                        or _f(self, *a))
    losses, grads = [], []
    for passes in ("cache", "recompute"):
        model = Coconut(tiny_trunk(max_seq_len=400), vocab_size=V, eos_id=EOS, max_latent_stage=3, start_stage=3,
                        passes=passes)
        loss = model.loss(hand_batch())["loss"]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.trunk.parameters())))
    assert cached == [1]  # the first model took the cached path, the second did not
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert max(rel_err(a, b) for a, b in zip(*grads)) < 1e-4


def test_a_future_summary_attaches_to_the_trunk():
    from objectives import NextTokenPrediction
    from objectives.summaries import BagOfWordsSummary
    model = NextTokenPrediction(tiny_trunk().train(), vocab_size=30, summaries=[BagOfWordsSummary(window=4)])
    out = model.loss({"tokens": torch.randint(0, 30, (2, 12)), "loss_mask": torch.ones(2, 12)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.summaries[0].proj.weight.grad.abs().sum() > 0


def test_quickstart_config_matches_the_quickstart_transformer_in_parameters():
    import yaml

    from models import Transformer
    spec = yaml.safe_load(open("configs/models/rwkv7-quickstart.yaml"))["init_args"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    transformer = count(Transformer(d_model=256, n_layers=4, n_heads=4, max_seq_len=512))
    assert count(RWKV7(**spec)) == 3_215_104 and abs(3_215_104 / transformer - 1) < 0.01  # the config's comment


# --- a peer: the RWKV-LM pip package ------------------------------------------------------------------------------


def peer_model(trunk: RWKV7, emb: torch.Tensor, head: torch.Tensor, path):
    """The `rwkv` package's RWKV-7 model (plain torch on CPU, fp32) over the trunk's weights: our parameter names
    are the reference's, under `blocks.i.`; LN0 is block 0's `ln0` there, the final norm `ln_out`."""
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")  # read when rwkv.model is imported
    rwkv_model = pytest.importorskip("rwkv.model")
    if not hasattr(rwkv_model, "RWKV_x070"):
        pytest.skip("rwkv.model was imported before without RWKV_V7_ON=1")
    weights = {"emb.weight": emb, "head.weight": head, "blocks.0.ln0.weight": trunk.ln0.weight,
               "blocks.0.ln0.bias": trunk.ln0.bias, "ln_out.weight": trunk.norm.weight, "ln_out.bias": trunk.norm.bias}
    for i, block in enumerate(trunk.blocks):
        weights.update({f"blocks.{i}.{name}": t for name, t in block.state_dict().items()})
    torch.save({k: v.detach().clone() for k, v in weights.items()}, path / "model.pth")
    return rwkv_model.RWKV_x070(str(path / "model"), "cpu fp32")


def test_the_rwkv_package_gives_the_same_logits_and_states(tmp_path):
    trunk = tiny_trunk(d_model=64, head_size=16, d_ffn=96)
    vocab = 50
    g = torch.Generator().manual_seed(3)
    emb, head = torch.randn(vocab, 64, generator=g), 0.1 * torch.randn(vocab, 64, generator=g)
    peer = peer_model(trunk, emb, head, tmp_path)
    tokens = torch.randint(0, vocab, (2, 30), generator=g)
    with torch.no_grad():
        ours = trunk(emb[tokens]) @ head.T
        for b in range(2):  # the sequence form, all positions
            theirs, _ = peer.forward(tokens[b].tolist(), None, full_output=True)
            torch.testing.assert_close(theirs, ours[b], atol=1e-4, rtol=1e-4)
        # the RNN form: a prompt, then one token at a time, against our cached decoding; then the states
        cache = trunk.make_cache(1)
        ours = [trunk(emb[tokens[:1, :20]], cache=cache)[:, -1] @ head.T]
        theirs, state = peer.forward(tokens[0, :20].tolist(), None)
        torch.testing.assert_close(theirs, ours[0][0], atol=1e-4, rtol=1e-4)
        for t in range(20, 25):
            theirs, state = peer.forward([int(tokens[0, t])], state)
            torch.testing.assert_close(theirs, (trunk(emb[tokens[:1, t:t + 1]], cache=cache) @ head.T)[0, 0],
                                       atol=1e-4, rtol=1e-4)
    H, N = 4, 16
    for i, layer in enumerate(cache):  # the peer's state per layer: time-shift x, wkv S (H, values, keys), ffn x
        torch.testing.assert_close(layer.conv_state[0, :, 0], state[3 * i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.ssm_state[0].view(H, N, N).transpose(1, 2), state[3 * i + 1], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(layer.conv_state[0, :, 1], state[3 * i + 2], atol=1e-5, rtol=1e-5)
