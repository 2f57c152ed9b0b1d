"""Multi-token prediction: exact reduction to NTP, per-head backward gradients, lossless speculative decoding."""
from __future__ import annotations

import math

import pytest
import torch

from models import Transformer
from objectives import DeepSeekMTP, MultiTokenPrediction, NextTokenPrediction
from objectives.decoding.drafters import lookup_drafts
from objectives.training.multi_token import shifted


def trunk(layers: int = 2, max_len: int = 96) -> Transformer:
    return Transformer(d_model=32, n_layers=layers, n_heads=2, max_seq_len=max_len)


def batch(vocab: int = 50, rows: int = 3, length: int = 21, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, vocab, (rows, length), generator=g),
            "loss_mask": (torch.rand(rows, length, generator=g) > 0.2).float()}


def test_one_head_is_exactly_next_token_prediction():
    torch.manual_seed(0)
    ntp = NextTokenPrediction(trunk(), vocab_size=50)
    torch.manual_seed(0)
    mtp = MultiTokenPrediction(trunk(), vocab_size=50, n_future=1)
    b = batch()
    # the per-head path sums the same terms in another order: equal up to fp32 rounding (2e-7 over 60 draws)
    torch.testing.assert_close(mtp.loss(b)["loss"], ntp.loss(b)["loss"], rtol=2e-6, atol=0)


@pytest.mark.parametrize("topology,head_type", [("parallel", "block"), ("causal", "block"), ("parallel", "mlp"),
                                               ("causal", "mlp")])
def test_per_head_backward_gives_the_naive_gradients_with_accumulation(topology, head_type):
    torch.manual_seed(0)
    model = MultiTokenPrediction(trunk(), vocab_size=50, n_future=4, topology=topology, head_layers=2,
                                 head_type=head_type, loss_weights=[1, 0.5, 0.25, 0.25],
                                 ce_chunk_size=16 * 50 * 4 / 2**20)  # 16 positions' fp32 logits: 4 chunks a head
    if head_type == "mlp":  # away from the zero init, so that every head differs and its gradients flow
        with torch.no_grad():
            for p in model.heads.parameters():
                p.normal_(std=0.1)
    micro = [batch(seed=1), batch(seed=2)]

    def accumulated(per_head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.per_head_backward = per_head
        model.zero_grad()
        figures = []  # each micro-batch's loss, per-head loss and accuracy, teacher-forced accept length
        for b in micro:  # gradient accumulation over two micro-batches
            out = model.loss(b)
            (out["loss"] / 2).backward()
            figures += [out["loss"].detach(), *(torch.as_tensor(value) for value, _ in out["metrics"].values())]
        return torch.stack(figures).float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (efficient_figures, efficient), (naive_figures, naive) = accumulated(True), accumulated(False)
    torch.testing.assert_close(efficient_figures, naive_figures, rtol=1e-5, atol=0)
    assert efficient.keys() == naive.keys()
    for name in naive:
        error = (efficient[name] - naive[name]).norm() / naive[name].norm().clamp(min=1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
    head = "heads.0.0.attn.qkv.weight" if head_type == "block" else "heads.0.0.linear.weight"
    assert naive[head].abs().sum() > 0 and naive["trunk.blocks.0.mlp.out.weight"].abs().sum() > 0


def test_mlp_heads_start_as_the_identity_and_need_no_cache():
    model = MultiTokenPrediction(trunk(), vocab_size=50, n_future=3, head_type="mlp")
    hidden = torch.randn(2, 5, 32)
    assert all(torch.equal(z, hidden) for z in model.head_states(hidden))  # zero-initialised residual
    assert len(model.start_decoding(2, "cpu").caches) == 1  # the trunk's cache only
    with pytest.raises(ValueError, match="head_type"):
        MultiTokenPrediction(trunk(), vocab_size=50, head_type="medusa")


def test_match_params_moves_trunk_layers_into_the_heads():
    ntp = NextTokenPrediction(trunk(layers=6), vocab_size=50)
    mtp = MultiTokenPrediction(trunk(layers=6), vocab_size=50, n_future=4, match_params=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert len(mtp.trunk.blocks) == 3
    assert count(mtp) - count(ntp) == 32  # only the heads' shared final norm is extra
    with pytest.raises(ValueError, match="match_params"):
        MultiTokenPrediction(trunk(layers=3), vocab_size=50, n_future=4, match_params=True)


def models():
    torch.manual_seed(0)
    return {"mtp-parallel": MultiTokenPrediction(trunk(), vocab_size=50, n_future=4).eval(),
            "mtp-causal": MultiTokenPrediction(trunk(), vocab_size=50, n_future=3, topology="causal").eval(),
            "deepseek": DeepSeekMTP(trunk(), vocab_size=50, depth=2).eval(),
            "ntp-lookup": NextTokenPrediction(trunk(), vocab_size=50).eval()}


@pytest.mark.parametrize("name", ["mtp-parallel", "mtp-causal", "deepseek", "ntp-lookup"])
@pytest.mark.parametrize("rows", [1, 3])
def test_speculative_greedy_equals_plain_greedy(name, rows):
    model = models()[name]
    prompt = torch.randint(0, 50, (rows, 7), generator=torch.Generator().manual_seed(rows))
    plain = model.generate(prompt, max_new_tokens=40)
    fast = model.generate(prompt, max_new_tokens=40, speculative=True)
    assert torch.equal(plain, fast)
    assert model.decode_stats["tokens"] == 40
    model.eos_id = int(plain[0, 12])
    assert torch.equal(model.generate(prompt, 40), model.generate(prompt, 40, speculative=True))


def test_cache_rollback_equals_a_fresh_prefill():
    model = models()["mtp-parallel"]
    tokens = torch.randint(0, 50, (2, 30))
    state = model.start_decoding(2, "cpu")
    model.decode_forward(tokens[:, :20], state)
    model.decode_forward(torch.randint(0, 50, (2, 6)), state)  # drafts that get rejected
    state.crop(20)
    rolled_logits, rolled_heads = model.decode_forward(tokens[:, 20:], state)
    fresh = model.start_decoding(2, "cpu")
    fresh_logits, fresh_heads = model.decode_forward(tokens, fresh)
    torch.testing.assert_close(rolled_logits, fresh_logits[:, 20:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rolled_heads, fresh_heads[:, 20:], atol=1e-5, rtol=1e-5)
    for rolled, new in zip(state.caches, fresh.caches):
        for a, b in zip(rolled.layers, new.layers):
            torch.testing.assert_close(a.k[:, :, :30], b.k[:, :, :30], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(a.v[:, :, :30], b.v[:, :, :30], atol=1e-6, rtol=1e-6)


def test_deepseek_labels_shift_per_depth():
    tokens = torch.arange(10).view(1, 10)
    mask = torch.ones(1, 10)
    targets, valid = shifted(tokens, mask, 3, 9)
    assert targets[0, :7].tolist() == list(range(3, 10)) and valid[0].tolist() == [1] * 7 + [0] * 2
    model = DeepSeekMTP(trunk(), vocab_size=50, depth=2)
    metrics = model.loss(batch(rows=2, length=21))["metrics"]
    full = batch(rows=2, length=21)["loss_mask"]
    # depth k predicts token t+k+1: its targets are the mask from position k+1 on
    assert metrics["val/head2_loss"][1] == int(full[:, 2:].sum())
    assert metrics["val/head3_loss"][1] == int(full[:, 3:].sum())


def test_lookup_drafts_continue_the_latest_match():
    tokens = torch.tensor([[5, 6, 7, 8, 1, 5, 6, 7, 9, 5, 6, 7]])
    assert lookup_drafts(tokens, 3).tolist() == [[9, 5, 6]]
    assert lookup_drafts(torch.tensor([[1, 2, 3]]), 3).shape == (1, 0)


def agreeing(name: str):
    """A model whose drafts are right: embeddings scaled until it copies its last token (so greedy decoding of a
    constant prompt repeats it), and, for DeepSeek, modules made to read only the trunk's state (merge = [I, 0],
    block outputs zeroed), so that they predict what the model does."""
    model = models()[name]
    with torch.no_grad():
        model.embed.weight.mul_(30)
        for module in getattr(model, "mtp_modules", []):
            d = module.merge.weight.shape[0]
            module.merge.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], 1))
            module.block.attn.out.weight.zero_()
            module.block.mlp.out.weight.zero_()
    return model


@pytest.mark.parametrize("name,tokens_per_step", [("mtp-parallel", 4), ("mtp-causal", 3), ("deepseek", 3),
                                                  ("ntp-lookup", 5)])
def test_drafts_that_agree_with_the_model_are_all_accepted(name, tokens_per_step):
    """Every step keeps all of its drafts and adds its own token: the 39 tokens after the prefill's take
    ceil(39 / tokens per step) verify steps (n-1 head drafts + 1; DeepSeek: its 2 modules + 1; prompt lookup on a
    constant sequence, a loop of period 1, drafts as deep as asked: the default 4 + 1). A drafter that is wrong
    takes 39."""
    model = agreeing(name)
    prompt = torch.tensor([[5] * 7, [9] * 7])
    plain = model.generate(prompt, 40)
    assert (plain[:, 7:] == prompt[:, :1]).all()  # the model copies: greedy repeats the prompt's token
    assert torch.equal(model.generate(prompt, 40, speculative=True), plain)
    assert model.decode_stats["steps"] == math.ceil(39 / tokens_per_step), model.decode_stats


def test_one_head_decodes_speculatively_as_plain_greedy():
    model = MultiTokenPrediction(trunk(), vocab_size=50, n_future=1).eval()
    prompt = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, 12, speculative=True), model.generate(prompt, 12))
    assert model.decode_stats["steps"] == 11  # nothing to draft with: one token a step


def test_deepseek_module_k_reads_up_to_token_t_plus_k_and_no_further():
    """Module k at position t reads h_{k-1}(t) and the embedding of token t+k and predicts token t+k+1: changing
    token t+k changes its logits at t, changing token t+k+1 (its target) or later does not. The logits are the
    loss's: `module_states` (which the loss reads), its module's out_norm, the shared unembedding."""
    torch.manual_seed(0)
    model = DeepSeekMTP(trunk(), vocab_size=50, depth=3).eval()
    tokens = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 16)

    def logits(x):
        with torch.no_grad():
            states = model.module_states(model.hidden(x[:, :-1]), x, mask)
            return [model.logits(module.out_norm(h)) for module, h in zip(model.mtp_modules, states)]

    base, t = logits(tokens), 4
    for k in (1, 2, 3):
        for offset, changes in ((k, True), (k + 1, False), (k + 3, False)):
            changed = tokens.clone()
            changed[0, t + offset] = (changed[0, t + offset] + 1) % 50
            # causal: an unread token leaves the logits at t exactly as they were (0.0 measured), a read one moves
            # them by 0.19 or more: 1e-5 is far from both
            moved = not torch.allclose(logits(changed)[k - 1][0, t], base[k - 1][0, t], atol=1e-5, rtol=0)
            assert moved == changes, f"module {k}, token t+{offset}"
