"""LaDiR (objectives/ladir.py): the step VAE reconstructs the steps of a toy set after a short training, and its
KL weight warms up."""
from __future__ import annotations

import torch

from objectives.ladir import StepVAE, beta_schedule


def test_beta_warms_up_linearly_from_zero():
    assert [beta_schedule(s, 0.1, 10) for s in (0, 5, 10, 50)] == [0.0, 0.05, 0.1, 0.1]
    assert beta_schedule(0, 0.1, 0) == 0.1


def test_vae_reconstructs_the_steps_of_a_toy_set():
    torch.manual_seed(0)
    steps = torch.randint(1, 12, (16, 5))  # 16 distinct-ish steps of 5 tokens over 11 symbols (0 = padding)
    steps[3, 4:] = 0  # one padded step
    vae = StepVAE(12, pad_id=0, num_latents=2, latent_dim=8, d_model=32, n_layers=1, n_heads=2, max_step_len=8,
                  beta=1e-3, beta_warmup_steps=100)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    before = (vae.reconstruct(steps) == steps)[steps != 0].float().mean()
    for step in range(60):
        loss, parts = vae.loss(steps, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    after = (vae.reconstruct(steps) == steps)[steps != 0].float().mean()
    assert before < 0.5 and after >= 0.95, (float(before), float(after))
    assert torch.isfinite(parts["kl"])
