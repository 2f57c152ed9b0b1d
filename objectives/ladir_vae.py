"""LaDiR's first stage: the VAE of reasoning steps (Kang et al. 2025, "LaDiR: Latent Diffusion Enhances LLMs for
Text Reasoning", arXiv:2510.04573, Sec. 3.1; the recipe as a whole is in `objectives/ladir.py`).

Each reasoning step is encoded into K latent thought tokens (an encoder with full attention over the step and K
learned block queries, a Gaussian posterior per query) and decoded back left to right by a causal decoder that
reads the K latents as a prefix. Loss: the ELBO with a KL weight warmed up from 0 against posterior collapse::

    L_VAE = E_q[-log p(step | z)] + beta(t) * KL(q(z | step) || N(0, I)),   beta(t) = beta * min(1, t / T_warm)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import Transformer
from objectives.decoding.greedy import continue_decoding
from objectives.training.checkpoints import load_checkpoint


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the VAE of reasoning steps
# ----------------------------------------------------------------------------------------------------------


def beta_schedule(step: int, beta: float, warmup_steps: int) -> float:
    """The KL weight at optimizer step `step`: linear warm-up from 0 to `beta` over `warmup_steps` (Sec. 3.1)."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


class StepVAE(nn.Module):
    """The VAE of LaDiR's stage 1: a reasoning step (<= `max_step_len` tokens) <-> `num_latents` thought tokens.
    The decoder's output layer is tied to its input embedding, so that a CoT checkpoint's embedding and trunk can
    start it (`load_decoder`).

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
        nn.init.normal_(self.embed.weight, std=0.02)
        self.queries = nn.Parameter(torch.randn(num_latents, d_model) * 0.02)  # learned block queries
        self.encoder = Transformer(d_model, n_layers, n_heads, max_step_len + num_latents)
        self.to_posterior = nn.Linear(d_model, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, d_model)
        self.decoder = Transformer(d_model, n_layers, n_heads, max_step_len + num_latents)

    def encode(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """steps [B, L] (right-padded with pad_id) -> posterior mean and log-variance, each [B, K, latent_dim]."""
        B, L = steps.shape
        if L > self.max_step_len:
            raise ValueError(f"a step of {L} tokens is longer than the VAE's max_step_len={self.max_step_len}: "
                             f"raise model.init_args.max_step_len")
        x = torch.cat([self.embed(steps), self.queries.expand(B, -1, -1)], 1)
        real = torch.cat([steps != self.pad_id, steps.new_ones(B, self.num_latents, dtype=torch.bool)], 1)
        h = self.encoder(x, mask="full", padding_mask=real)[:, L:]
        mu, logvar = self.to_posterior(h).chunk(2, -1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decoder_logits(self, z: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] of the step tokens given the latents z [B, K, latent_dim]."""
        x = torch.cat([self.from_latent(z), self.embed(steps[:, :-1])], 1)
        return F.linear(self.decoder(x, mask="causal")[:, self.num_latents - 1 :], self.embed.weight)

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
    def decode(self, z: torch.Tensor, length: int, stop_id: int | None = None) -> torch.Tensor:
        """Greedy reconstruction [B, <= length] of steps from latents z [B, K, latent_dim], with the decoder's
        cache; a row that emits `stop_id` (the <step> that ends a step) emits padding after it, and decoding ends
        when every row has stopped."""
        cache = self.decoder.make_cache(z.shape[0], device=z.device, dtype=self.embed.weight.dtype)
        hidden = self.decoder(self.from_latent(z).to(self.embed.weight.dtype), cache=cache)[:, -1]

        def feed(token: torch.Tensor) -> torch.Tensor:
            return F.linear(self.decoder(self.embed(token)[:, None], cache=cache)[:, -1], self.embed.weight)
        return continue_decoding(F.linear(hidden, self.embed.weight), feed, length, stop_id, self.pad_id)

    @torch.no_grad()
    def reconstruct(self, steps: torch.Tensor) -> torch.Tensor:
        """Greedy reconstruction from the posterior means (the paper's evaluation of the VAE)."""
        return self.decode(self.encode(steps)[0], steps.shape[1])

    def load_decoder(self, path: str) -> None:
        """Start the decoder and the embedding from a causal checkpoint of the same width and depth (a CoT run of
        next-token prediction on the same data): its `trunk.*` and the data's rows of its `embed.weight`."""
        state = load_checkpoint(path).get("state_dict", {})
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        embed = state.get("embed.weight")
        mine = self.decoder.state_dict()
        if embed is None or set(trunk) != set(mine) or any(trunk[k].shape != mine[k].shape for k in mine):
            raise ValueError(f"decoder_from={path} is not a causal checkpoint with a {self.decoder.n_layers}-layer, "
                             f"d_model {self.decoder.d_model} transformer trunk and an embedding: train the CoT "
                             f"model with the VAE's shape (the trunk's, or vae_layers) or leave decoder_from unset")
        if embed.shape[0] < self.embed.num_embeddings:
            raise ValueError(f"decoder_from={path} has {embed.shape[0]} embedding rows, fewer than the data's "
                             f"{self.embed.num_embeddings}: use a CoT checkpoint trained on the same data")
        self.decoder.load_state_dict(trunk)
        self.embed.weight.data.copy_(embed[: self.embed.num_embeddings])
