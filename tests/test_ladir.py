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


def test_block_mask_on_a_hand_made_layout():
    from models.layers import block_mask
    from objectives.ladir import latent_segments

    ids = latent_segments(prompt_len=2, num_blocks=2, block_size=2)  # q q | z z | z z
    assert ids.tolist() == [0, 1, 2, 2, 3, 3]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_mask(ids[None])[0, 0], expected)


def test_flow_matching_loss_is_zero_at_the_exact_velocity_and_hand_computed_elsewhere():
    from objectives.ladir import TimeEmbedding, flow_matching_loss, interpolate

    x0 = torch.tensor([[[0.0, 2.0]]])
    x1 = torch.tensor([[[1.0, -2.0]]])
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.25])), torch.tensor([[[0.25, 1.0]]]))
    assert float(flow_matching_loss(x1 - x0, x0, x1)) == 0.0
    assert float(flow_matching_loss(torch.zeros_like(x0), x0, x1)) == (1.0 + 16.0) / 2  # ((1)^2 + (-4)^2) / 2
    emb = TimeEmbedding(8)(torch.tensor([0.0, 0.5, 1.0]))
    assert emb.shape == (3, 8) and not torch.allclose(emb[0], emb[2])


def test_repulsion_zero_leaves_sampling_unchanged_and_positive_spreads_trajectories():
    from objectives.ladir import denoise

    def toward_one(x, t):  # a velocity field that pulls every trajectory to the point 1
        return 1.0 - x

    x0 = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    plain = x0.clone()
    for _ in range(4):  # Euler by hand
        plain = plain + 0.25 * (1.0 - plain)
    assert torch.equal(denoise(toward_one, x0, 4, repulsion=0.0), plain)
    spread = lambda x: torch.pdist(x.flatten(1)).mean()  # noqa: E731
    assert spread(denoise(toward_one, x0, 4, repulsion=5.0)) > spread(plain)
