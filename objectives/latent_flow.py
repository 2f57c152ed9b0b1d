"""Flow matching in a latent space, LaDiR's stage 2 sampler (Kang et al. 2025, "LaDiR: Latent Diffusion Enhances
LLMs for Text Reasoning"; flow matching: Lipman et al. 2023): the flow time's embedding, the linear path and its
loss, classifier-free guidance, the diversity term the release adds to the prediction, the Euler sampler, and the
majority vote over trajectories. `objectives/ladir.py` is the objective that uses them."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """The flow time t in [0, 1] -> a [.., d_model] vector: sinusoidal features, then a two-layer MLP."""

    def __init__(self, d_model: int, frequencies: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, 8.0, frequencies)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[..., None].float() * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], -1))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The linear path x_t = (1 - t) x0 + t x1, t [B] broadcast over the latents' other dimensions."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * x1


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """L_FM: the mean squared error of predicted velocities against the linear path's x1 - x0."""
    return (velocity.float() - (x1 - x0).float()).pow(2).mean()


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of the head's output: uncond + scale * (cond - uncond) (the release's
    `inference_step`: ``null_model_pred + infer_cfg * (model_pred - null_model_pred)``)."""
    return uncond + scale * (cond - uncond)


def diversity_weight(step: int, num_steps: int, scale: float) -> float:
    """The diversity term's weight at Euler step `step` of `num_steps`: scale * s^2, s = 1 - (step + 1) / num_steps
    the noise level the step lands on (the release's `get_diversity_scale`, power 2, its floor 0.1 taken to 0):
    largest at the first step, 0 at the last."""
    return scale * (1.0 - (step + 1) / num_steps) ** 2


def diversity_gradient(pred: torch.Tensor, group_size: int | None = None,
                       bandwidth: float | None = None) -> torch.Tensor:
    """The gradient of R = sum_{i<j} f(||p_i - p_j||^2), f(u) = u exp(-u / sigma^2), for predictions pred [G * N, ...]
    in groups of `group_size` = N consecutive rows (a question's trajectories; default: all rows one group), each
    row one particle: 2 sum_j exp(-u_ij / sigma^2) (1 - u_ij / sigma^2) (p_i - p_j) (the release's `distance_grad`).
    sigma = `bandwidth`, or the median distance ||p_i - p_j|| over the group's pairs (its `median_bandwidth_latent`),
    so that the term moves pairs towards the group's typical distance, whatever the prediction's units."""
    n = group_size or len(pred)
    flat = pred.float().reshape(-1, n, pred[0].numel())
    diff = flat[:, :, None] - flat[:, None]  # [G, N, N, D]
    u = diff.pow(2).sum(-1)
    if bandwidth is not None:
        sigma2 = torch.full((len(flat), 1, 1), float(bandwidth) ** 2, device=pred.device)
    elif n < 2:
        return torch.zeros_like(pred)
    else:
        i, j = torch.triu_indices(n, n, 1, device=pred.device)
        sigma2 = (u[:, i, j].sqrt().median(-1).values + 1e-6).pow(2)[:, None, None]
    w = torch.exp(-u / sigma2) * (1 - u / sigma2)  # the diagonal's diff is 0: no self-interaction
    return (2 * (w[..., None] * diff).sum(2)).view_as(pred).to(pred.dtype)


def denoise(predict, x0: torch.Tensor, num_steps: int, velocity=None, diversity: float = 0.0,
            group_size: int | None = None, bandwidth: float | None = None) -> torch.Tensor:
    """Euler integration of dx/dt = v from t = 0 (noise x0 [N, ...]) to t = 1 in `num_steps` steps. predict(x, t) is
    the head's prediction p; velocity(p, x, t) turns it into dx/dt (default: p is the velocity). With `diversity`
    > 0 the prediction gets `diversity_weight(i, num_steps, diversity)` times `diversity_gradient` within each group
    of `group_size` trajectories before the step (0: plain sampling, the gradient not computed)."""
    x, dt = x0, 1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((len(x),), i * dt, device=x.device)
        p = predict(x, t)
        weight = diversity_weight(i, num_steps, diversity) if diversity else 0.0
        if weight:
            p = p + weight * diversity_gradient(p, group_size, bandwidth)
        x = x + dt * (p if velocity is None else velocity(p, x, t))
    return x


def majority(answers: list[list[int]]) -> int:
    """The index of the first trajectory whose answer is the most common one (self-consistency voting)."""
    counts = Counter(tuple(a) for a in answers)
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if counts[tuple(a)] == best)
