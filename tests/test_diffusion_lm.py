"""Diffusion-LM: the sqrt schedule, the rounding step, the bound, sampling with the clamping trick."""
from __future__ import annotations

import pytest
import torch

from conftest import train_on_batch
from models import Mamba, Transformer
from objectives import DiffusionLM
from objectives.diffusion_lm import sqrt_schedule

V = 12


def tiny(**kwargs) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=V, eos_id=1,
                       diffusion_steps=200, sampling_steps=20, **kwargs)


def train(model: DiffusionLM, batch: dict, steps: int) -> None:
    train_on_batch(model, batch, steps, lr=3e-3)
    model.eval()


def test_the_sqrt_schedule_starts_near_one_falls_monotonically_and_ends_near_zero():
    abar = sqrt_schedule(2000)
    expected = (1 - torch.sqrt(torch.tensor([1 / 2000, 0.5]) + 1e-4)) / (1 - 0.01)  # abar(s) / abar(0)
    assert torch.allclose(abar[[0, 999]], expected, rtol=1e-4)
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1] < 1e-3


def test_rounding_maps_clean_and_slightly_noisy_embeddings_back_to_their_tokens():
    model = tiny()
    tokens = torch.randint(0, V, (8, 32))
    train(model, {"tokens": tokens, "loss_mask": torch.ones(8, 32)}, 40)
    words = torch.arange(V)
    clean = model.embed(words)
    assert torch.equal(model.round(clean), words)
    noisy = clean + (1 - model.abar[0]).sqrt() * torch.randn(20, V, clean.shape[-1])  # draws from q(x0 | w)
    assert (model.round(noisy) == words).float().mean() > 0.95


def test_training_lowers_the_loss_and_the_bound():
    model = tiny()
    batch = {"tokens": torch.tensor([[2, 3, 4, 5] * 8] * 8), "loss_mask": torch.ones(8, 32)}
    model.eval()
    before = model.loss(batch)
    train(model, batch, 60)
    after = model.loss(batch)
    assert after["loss"] < 0.5 * before["loss"]
    assert 0 < after["nll_bound"] < 0.5 * before["nll_bound"]


def test_sampling_keeps_the_prompt_and_returns_tokens_of_the_vocabulary():
    model = tiny().eval()
    prompt = torch.randint(2, V, (3, 5))
    for clamp in (True, False):
        model.hparams.clamp = clamp
        out = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 17) and torch.equal(out[:, :5], prompt)
        assert out.min() >= 0 and out.max() < V
    # the same seed, the same sample; temperature 0 takes posterior means after the first draw
    a = model.generate(prompt, 12, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 12, temperature=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_a_mamba_trunk_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"DiffusionLM needs the full attention mask.*Mamba"):
        DiffusionLM(Mamba(d_model=16, n_layers=1), vocab_size=V)
    with pytest.raises(ValueError, match="sampling_steps"):
        DiffusionLM(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=16), vocab_size=V,
                    diffusion_steps=10, sampling_steps=20)
