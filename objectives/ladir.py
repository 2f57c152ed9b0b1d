"""LaDiR: latent diffusion reasoning over blocks of VAE thought tokens (Kang et al. 2025, "LaDiR: Latent Diffusion
Enhances LLMs for Text Reasoning", arXiv:2510.04573; reference code mk322/LaDiR).

The paper's recipe, in its order:

1. **VAE of reasoning steps** (Sec. 3.1). Each reasoning step (a block of text tokens) is encoded into `K` latent
   "thought tokens": the encoder reads the step's tokens together with `K` learned block queries (full attention)
   and maps each query's hidden state to a Gaussian posterior ``q(z | step) = N(mu, diag(sigma^2))``; the
   decoder reads the `K` latents as a prefix and reconstructs the step's tokens left to right. Loss (the ELBO
   with a weighted KL, against posterior collapse the weight beta is warmed up from 0)::

       L_VAE = E_q[-log p(step | z)] + beta(t) * KL(q(z | step) || N(0, I)),   beta(t) = beta * min(1, t / T_warm)

2. **Latent reasoning model** (Sec. 3.2). The question's tokens are read causally, each block of `K` thought
   tokens with full attention inside the block and causally across blocks (`latent_segments` gives the segment
   ids of `models.layers.block_mask`). A block is denoised by flow matching on the linear path from noise
   ``x0 ~ N(0, I)`` to the clean latents ``x1``, with the time t embedded (`TimeEmbedding`)::

       x_t = (1 - t) x0 + t x1,    L_FM = E || v_theta(x_t, t | question, earlier blocks) - (x1 - x0) ||^2

   At inference a block is integrated from noise with Euler steps; N parallel trajectories of one question are
   pushed apart by a repulsion term (the gradient of an RBF kernel between trajectories, weight lambda; 0 = off)
   for diverse reasoning (Sec. 3.3, `denoise`).

Written so far: stage 1 (`StepVAE`) and the pieces of stage 2 above. Not yet written: the end-of-reasoning
signal, the answer decoder over question + latent blocks, generation with N trajectories from one forked
question prefix, majority vote and pass@N, and the Lightning objective with its stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import Transformer


def beta_schedule(step: int, beta: float, warmup_steps: int) -> float:
    """The KL weight at optimizer step `step`: linear warm-up from 0 to `beta` over `warmup_steps` (Sec. 3.1)."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


class StepVAE(nn.Module):
    """The VAE of LaDiR's stage 1: a reasoning step (<= `max_step_len` tokens) <-> `num_latents` thought tokens.

    Args:
        vocab_size: token vocabulary (the datamodule's).
        pad_id: padding id of the step tensors (not reconstructed).
        num_latents: thought tokens per step, K (learned block queries).
        latent_dim: width of one thought token.
        d_model, n_layers, n_heads: the encoder's and the decoder's transformer shape.
        max_step_len: the longest step.
        beta, beta_warmup_steps: KL weight and its warm-up.
    """

    def __init__(self, vocab_size: int, pad_id: int = 0, num_latents: int = 2, latent_dim: int = 16,
                 d_model: int = 64, n_layers: int = 2, n_heads: int = 4, max_step_len: int = 32,
                 beta: float = 1e-3, beta_warmup_steps: int = 1000):
        super().__init__()
        if num_latents < 1 or latent_dim < 1:
            raise ValueError(f"StepVAE needs num_latents >= 1 and latent_dim >= 1, got {num_latents}, {latent_dim}")
        self.pad_id, self.num_latents, self.latent_dim = pad_id, num_latents, latent_dim
        self.beta, self.beta_warmup_steps, self.max_step_len = beta, beta_warmup_steps, max_step_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.queries = nn.Parameter(torch.randn(num_latents, d_model) * 0.02)  # learned block queries
        self.encoder = Transformer(d_model, n_layers, n_heads, max_step_len + num_latents)
        self.to_posterior = nn.Linear(d_model, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, d_model)
        self.decoder = Transformer(d_model, n_layers, n_heads, max_step_len + num_latents)
        self.head = nn.Linear(d_model, vocab_size)

    def encode(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """steps [B, L] (right-padded with pad_id) -> posterior mean and log-variance, each [B, K, latent_dim]."""
        B, L = steps.shape
        if L > self.max_step_len:
            raise ValueError(f"a step of {L} tokens is longer than the VAE's max_step_len={self.max_step_len}")
        x = torch.cat([self.embed(steps), self.queries.expand(B, -1, -1)], 1)
        real = torch.cat([steps != self.pad_id, steps.new_ones(B, self.num_latents, dtype=torch.bool)], 1)
        h = self.encoder(x, mask="full", padding_mask=real)[:, L:]
        mu, logvar = self.to_posterior(h).chunk(2, -1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decoder_logits(self, z: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] of the step tokens given the latents z [B, K, latent_dim]."""
        x = torch.cat([self.from_latent(z), self.embed(steps[:, :-1])], 1)
        return self.head(self.decoder(x, mask="causal"))[:, self.num_latents - 1 :]

    def loss(self, steps: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_VAE of a batch of steps at optimizer step `step` (reparameterised sample of z), with its parts."""
        mu, logvar = self.encode(steps)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decoder_logits(z, steps)
        keep = steps != self.pad_id
        rec = F.cross_entropy(logits[keep].float(), steps[keep])
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum((-1, -2)).mean()
        total = rec + beta_schedule(step, self.beta, self.beta_warmup_steps) * kl
        return total, {"reconstruction": rec.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def decode(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """Greedy reconstruction [B, length] of steps from latents z [B, K, latent_dim]."""
        out = torch.empty(z.shape[0], 0, dtype=torch.long, device=z.device)
        for _ in range(length):
            x = torch.cat([self.from_latent(z), self.embed(out)], 1)
            nxt = self.head(self.decoder(x, mask="causal")[:, -1]).argmax(-1)
            out = torch.cat([out, nxt[:, None]], 1)
        return out

    @torch.no_grad()
    def reconstruct(self, steps: torch.Tensor) -> torch.Tensor:
        """Greedy reconstruction from the posterior means (the paper's evaluation of the VAE)."""
        return self.decode(self.encode(steps)[0], steps.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the latent reasoning model's layout, time embedding and flow-matching loss
# ----------------------------------------------------------------------------------------------------------


def latent_segments(prompt_len: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """Segment ids [prompt_len + num_blocks * block_size] for `models.layers.block_mask`: every question token
    its own block (causal), then one block per `block_size` thought tokens (full inside, causal across)."""
    blocks = torch.arange(num_blocks).repeat_interleave(block_size) + prompt_len
    return torch.cat([torch.arange(prompt_len), blocks])


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


def repulsion_force(x: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """Each of N trajectories' push away from the others, x [N, ...]: sum_j k_ij (x_i - x_j) / N with the RBF
    kernel k_ij = exp(-||x_i - x_j||^2 / bandwidth)."""
    flat = x.flatten(1).float()
    diff = flat[:, None] - flat[None]
    k = torch.exp(-diff.pow(2).sum(-1) / bandwidth)
    return ((k[..., None] * diff).sum(1) / len(x)).view_as(x).to(x.dtype)


def denoise(velocity_fn, x0: torch.Tensor, num_steps: int, repulsion: float = 0.0,
            bandwidth: float = 1.0) -> torch.Tensor:
    """Euler integration of dx/dt = v(x, t) from t = 0 (noise x0 [N, ...]) to t = 1 in `num_steps` steps, plus
    `repulsion` times the repulsion force between the N trajectories (0: plain sampling, the force not computed)."""
    x, dt = x0, 1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((len(x),), i * dt, device=x.device)
        v = velocity_fn(x, t)
        if repulsion:
            v = v + repulsion * repulsion_force(x, bandwidth)
        x = x + dt * v
    return x
