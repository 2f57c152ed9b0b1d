"""Masked diffusion (MDLM): the schedule's weight, SUBS, the bound against a known entropy, the samplers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import train_on_batch
from models import Mamba, Transformer
from objectives import MaskedDiffusion
from objectives.mdlm import LogLinearSchedule

V = 12


def tiny(**kwargs) -> MaskedDiffusion:
    torch.manual_seed(0)
    return MaskedDiffusion(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=V,
                           eos_id=1, **kwargs)


def test_the_elbo_weight_is_minus_alpha_derivative_over_one_minus_alpha_which_is_one_over_t():
    schedule = LogLinearSchedule()
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64, requires_grad=True)
    alpha = 1 - schedule.mask_prob(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    expected = -d_alpha / (1 - alpha)
    assert torch.allclose(schedule.weight(t), expected, rtol=1e-9)
    assert torch.allclose(schedule.weight(t), 1 / t, rtol=1e-9)


def test_subs_carries_unmasked_tokens_over_exactly_and_never_predicts_the_mask():
    model = tiny().eval()
    xt = torch.randint(0, V, (3, 20))
    xt[:, ::3] = model.mask_id
    probs = model.x0_probs(xt)
    assert probs.shape == (3, 20, V + 1)
    assert torch.all(probs[..., model.mask_id] == 0)
    unmasked = xt != model.mask_id
    assert torch.equal(probs[unmasked].argmax(-1), xt[unmasked]) and torch.all(probs[unmasked].max(-1).values == 1)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 20))


class IndependentTokensOracle(nn.Module):
    """A 'trunk' whose output, read through an identity unembedding, is log pi at every position: the true
    conditional p(x0_l | x_t) when tokens are independent draws from pi."""

    supported_masks = ("full",)

    def __init__(self, log_pi: torch.Tensor):
        super().__init__()
        self.d_model, self.max_seq_len, self.blocks = V + 1, 512, nn.ModuleList()
        self.register_buffer("log_pi", torch.cat([log_pi, torch.zeros(1)]))

    def forward(self, x, *, mask, cache=None):
        return self.log_pi.expand(*x.shape[:2], -1)


def test_the_bound_of_an_oracle_denoiser_matches_the_entropy_of_independent_tokens():
    torch.manual_seed(1)
    pi = torch.distributions.Dirichlet(torch.ones(V)).sample()
    model = MaskedDiffusion(IndependentTokensOracle(pi.log()), vocab_size=V, eval_time_samples=8)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(V + 1))
    model.eval()
    tokens = torch.multinomial(pi, 64 * 256, replacement=True).view(64, 256)
    out = model.loss({"tokens": tokens, "loss_mask": torch.ones(64, 256)})
    bound = (out["nll_bound"] / out["bound_tokens"]).item()
    entropy = -(pi * pi.log()).sum().item()
    # the estimate's spread: 1/t-weighted masked NLLs over 8 x 64 antithetic times, measured by repetition
    estimates = []
    for seed in range(6):
        model.train()
        torch.manual_seed(seed)
        out = model.loss({"tokens": tokens, "loss_mask": torch.ones(64, 256)})
        estimates.append((out["nll_bound"] / out["bound_tokens"]).item())
    spread = torch.tensor(estimates).std().item()
    assert abs(bound - entropy) < 4 * spread + 0.01, (bound, entropy, spread)
    assert abs(sum(estimates) / len(estimates) - entropy) < 4 * spread / math.sqrt(6) + 0.01


@pytest.mark.parametrize("sampler", ["ancestral", "semi_ar"])
def test_samplers_fill_every_mask_and_keep_the_prompt(sampler):
    model = tiny(sampler=sampler, block_length=8).eval()
    prompt = torch.randint(2, V, (3, 7))
    for temperature in (0.0, 1.0):
        out = model.generate(prompt, 24, temperature=temperature, steps=12)
        assert out.shape == (3, 31)
        assert torch.equal(out[:, :7], prompt)
        assert not (out == model.mask_id).any()
    tokens = torch.randint(2, V, (2, 30))
    holes = torch.rand(2, 30) < 0.5
    filled = model.infill(tokens, holes, steps=6, sampler=sampler)
    assert torch.equal(filled[~holes], tokens[~holes]) and not (filled == model.mask_id).any()


def test_the_caching_sampler_matches_the_uncached_one_with_fewer_network_calls():
    model = tiny().eval()
    prompt = torch.randint(2, V, (2, 5))
    outputs, calls = [], []
    for skip in (False, True):
        model.hparams.skip_unchanged = skip
        model.network_calls = 0
        generator = torch.Generator().manual_seed(3)
        outputs.append(model.generate(prompt, 16, temperature=1.0, steps=64, generator=generator))
        calls.append(model.network_calls)
    assert torch.equal(outputs[0], outputs[1])
    assert calls[0] == 64 and calls[1] < calls[0]


def test_training_lowers_the_bound_and_reasoning_data_keeps_the_prompt_visible():
    model = tiny()
    # a sequence that repeats with period 4: a masked token is implied by its unmasked neighbours
    tokens = torch.tensor([[2, 3, 4, 5] * 8] * 8)
    batch = {"tokens": tokens, "loss_mask": torch.ones(8, 32)}
    model.eval()
    before = model.loss(batch)["nll_bound"].item()
    train_on_batch(model, batch, steps=60, lr=3e-3)
    model.eval()
    assert model.loss(batch)["nll_bound"].item() < 0.75 * before
    # on reasoning batches only loss_mask positions are masked; padding (segment -1) is diffused as eos
    x0, maskable, counted = model.denoising_targets({"tokens": tokens[:1],
                                                "loss_mask": torch.tensor([[0.0] * 8 + [1.0] * 20 + [0.0] * 4]),
                                                "segments": torch.tensor([[0] * 8 + [1] * 20 + [-1] * 4])})
    assert maskable[0, :8].sum() == 0 and maskable[0, 8:].all() and counted[0, 28:].sum() == 0
    assert torch.all(x0[0, 28:] == 1)


def test_a_mamba_trunk_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"MaskedDiffusion needs the full attention mask.*Mamba"):
        MaskedDiffusion(Mamba(d_model=16, n_layers=1), vocab_size=V)


def test_speculative_and_teacherless_decoding_are_refused():
    model = tiny().eval()
    with pytest.raises(ValueError, match="MaskedDiffusion generates by denoising.*speculative"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, speculative=True)
