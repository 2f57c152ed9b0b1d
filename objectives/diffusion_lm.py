"""Diffusion-LM (Li et al. 2022, "Diffusion-LM Improves Controllable Text Generation"): Gaussian diffusion on
continuous word embeddings that are learned end to end, with a rounding step back to tokens.

Each token w has a learned embedding EMB(w) of width `embed_dim` (the tied unembedding). Training follows the
paper's end-to-end objective (eq. 2, x0-parameterization):
- x0 ~ q(x0 | w) = N(EMB(w), 1 - abar_0);
- x_t ~ N(sqrt(abar_t) x0, 1 - abar_t) for a uniform step t;
- the network f(x_t, t) (the trunk with full attention and a time embedding) predicts x0.

    L = ||f(x_t, t) - x0||^2           (at t = 0 the target is EMB(w) itself)
      + ||sqrt(abar_T) x0||^2          (the prior term: x_T should carry nothing of x0)
      - log p(w | x0)                  (rounding: a softmax over x0 . EMB)

The noise follows the sqrt schedule abar(s) = 1 - sqrt(s + 1e-4). Sampling runs the reverse process over
`sampling_steps` evenly spaced steps. At each step it applies the clamping trick (sec. 4.2): the predicted x0 is
snapped to the nearest word embedding in L2 distance, argmin_w ||f(x_t, t) - EMB(w)||, before the posterior
q(x_{t-1} | x_t, x0) is sampled. The rounding loss keeps its softmax over dot products x0 . EMB; only the clamp
measures distance, so that embeddings of large norm do not capture every prediction.

On reasoning data only the trained positions are noised; the prompt stays at its clean embedding, both in
training and when generating (`DenoisingObjective.denoising_targets`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from objectives.training import metrics as M
from objectives.training.denoising import DenoisingObjective
from objectives.training.losses import chunked_cross_entropy


def sqrt_schedule(steps: int, offset: float = 1e-4) -> torch.Tensor:
    """abar_t for t = 0..steps-1, the cumulative product of betas_t = 1 - abar((t+1)/T) / abar(t/T) (clipped at
    0.999) with abar(s) = 1 - sqrt(s + offset), as in Li et al.'s code."""
    s = torch.arange(steps + 1, dtype=torch.float64) / steps
    abar = 1 - torch.sqrt(s + offset)
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the step, then a two-layer MLP (as in DDPM)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * frequencies[None]
        features = torch.cat([angles.cos(), angles.sin(), angles.new_zeros(len(t), self.width - 2 * half)], -1)
        return self.mlp(features)


class DiffusionLM(DenoisingObjective):
    """Diffusion-LM on a bidirectional trunk.

    Args:
        embed_dim: width of the continuous word embeddings (16 in the paper's small models, 128 for ROCStories).
        diffusion_steps: T, the steps of the forward process the model is trained on (2000 in the paper).
        sampling_steps: evenly spaced steps of the reverse process when generating (200 in the paper).
        clamp: the clamping trick: snap each predicted x0 to its nearest word embedding (L2) while sampling.
        eval_time_samples: draws of t per validation sequence for `val/nll_bound` (fixed seed: the same each time).
        **kwargs: the base objective's arguments.
    """

    headline_metric = ("hparams.sampling_steps", "sampling steps")


    def __init__(self, *args, embed_dim: int = 16, diffusion_steps: int = 2000, sampling_steps: int = 200,
                 clamp: bool = True, eval_time_samples: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if embed_dim < 1 or diffusion_steps < 2 or not 1 <= sampling_steps <= diffusion_steps:
            raise ValueError(f"need embed_dim >= 1, diffusion_steps >= 2 and 1 <= sampling_steps <= diffusion_steps; "
                             f"got {embed_dim}, {diffusion_steps}, {sampling_steps}")
        width = self.trunk.d_model
        self.register_buffer("abar", sqrt_schedule(diffusion_steps), persistent=False)
        self.time_embedding = TimeEmbedding(width)
        self.input_projection = nn.Linear(embed_dim, width)
        self.output_projection = nn.Linear(width, embed_dim)
        with torch.no_grad():  # unit-variance embeddings, on the scale of the noise (the paper's init is N(0, 1))
            self.embed.weight.normal_()

    def embedding_width(self) -> int:
        return self.hparams.embed_dim

    # --- the denoiser ----------------------------------------------------------------------------------------------
    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x_t, t): the network's estimate of x0 [B, L, embed_dim] from noisy embeddings at steps t [B]."""
        hidden = self.input_projection(xt) + self.time_embedding(t)[:, None]
        return self.output_projection(self.trunk(hidden, mask="full"))

    def round(self, x0: torch.Tensor) -> torch.Tensor:
        """The rounding step: the most likely token under p(w | x0) = softmax(x0 . EMB)."""
        return self.logits(x0).argmax(-1)

    def nearest(self, x0: torch.Tensor) -> torch.Tensor:
        """The clamping trick's token: the word whose embedding is nearest to x0 in L2 distance,
        argmin_w ||x0 - EMB(w)||^2 = argmax_w (2 x0 . EMB(w) - ||EMB(w)||^2)."""
        weight = self.unembedding
        return (2 * self.logits(x0) - (weight.float() ** 2).sum(-1).to(x0.dtype)).argmax(-1)

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t][:, None, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    # --- training --------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, noised, counted, generator = self.bound_draws(*self.denoising_targets(batch))
        weights = noised.float()
        n = weights.sum().clamp(min=1)
        mean = self.embed(tokens)

        def gaussian(shape):
            return torch.randn(shape, device=mean.device, dtype=mean.dtype, generator=generator)

        x0 = mean + (1 - self.abar[0]).sqrt() * gaussian(mean.shape)
        t = torch.randint(0, len(self.abar), (tokens.shape[0],), device=tokens.device, generator=generator)
        xt = torch.where(noised[..., None], self.noise(x0, t, gaussian(x0.shape)), mean)
        predicted = self.predict_x0(xt, t).float()
        target = torch.where((t == 0)[:, None, None], mean, x0)
        mse = (((predicted - target.float()) ** 2).mean(-1) * weights).sum() / n
        prior = ((self.abar[-1] * x0.float() ** 2).mean(-1) * weights).sum() / n
        rounding_nll, _, correct = chunked_cross_entropy(x0, self.unembedding, tokens, counted,
                                                         self.hparams.ce_chunk_size)
        bound = self.nll_bound(x0.float(), mean.float(), predicted, t, counted) + rounding_nll
        padding = noised & ~counted  # reasoning data: the eos padding is trained, not counted in the bound
        if padding.any():
            rounding_nll = rounding_nll + chunked_cross_entropy(x0, self.unembedding, tokens, padding,
                                                                self.hparams.ce_chunk_size)[0]
        weight = counted.sum()
        return {"loss": mse + prior + rounding_nll / n, "nll_bound": bound.detach(), "bound_tokens": weight,
                "metrics": {M.VAL_MSE: (mse.detach(), weight), M.VAL_ROUNDING_NLL: (rounding_nll.detach() / n, weight),
                            M.VAL_ROUNDING_ACC: (correct / weight.clamp(min=1), weight)}}

    def nll_bound(self, x0, mean, predicted, t, counted) -> torch.Tensor:
        """A one-step Monte Carlo estimate of -log p(w) <= E_q(x0|w)[-log p(w|x0) - log p(x0) + log q(x0|w)], the
        DDPM bound on -log p(x0) (Ho et al. 2020, eq. 5) taken over the T-step chain x0 -> x_0 -> .. -> x_{T-1}
        that training samples from, summed over embedding dimensions; in nats, summed over `counted` tokens.

        A step t >= 1 costs T * KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)). With p's mean the posterior mean at
        the predicted x0 and p's variance the posterior variance, that is
        T * c_t^2 ||x0 - f||^2 / (2 var_t). At t = 0, p(x0 | x_0) = N(f, 1 - abar_0) and log q(x0 | w) share a
        variance, so their normalisers cancel:
        T * (||x0 - f||^2 - ||x0 - EMB(w)||^2) / (2 (1 - abar_0)). The prior KL(q(x_{T-1} | x0) || N(0, I)) is added
        exactly; the caller adds the rounding NLL.
        """
        T, abar = len(self.abar), self.abar
        a_t, a_prev = abar[t], abar[(t - 1).clamp(min=0)]
        beta = 1 - a_t / a_prev
        coefficient_sq = a_prev * beta ** 2 / (1 - a_t) ** 2
        variance = (1 - a_prev) / (1 - a_t) * beta
        error = ((x0 - predicted) ** 2).sum(-1)
        kl = coefficient_sq[:, None] / (2 * variance[:, None]).clamp(min=1e-20) * error
        decoder = (error - ((x0 - mean) ** 2).sum(-1)) / (2 * (1 - abar[0]))
        step = torch.where((t >= 1)[:, None], kl, decoder)
        a_last = abar[-1]
        prior = 0.5 * (a_last * x0 ** 2 - a_last - torch.log1p(-a_last)).sum(-1)
        per_token = T * step + prior
        return (per_token * counted).sum()

    # --- sampling --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 steps: int | None = None, generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Continue prompts [B, P] by denoising `max_new_tokens` positions from Gaussian noise: [B, P + new].

        `temperature` scales the noise of each reverse step (0: the posterior mean, a deterministic path from
        the initial noise). Everything after a row's first generated eos becomes eos. Any other option fails naming
        itself: top_k too, since rounding takes the nearest embedding, not a sample.
        """
        self.refuse_left_to_right_options(options)
        B, P = prompt_ids.shape
        self.check_generation_length(P + max_new_tokens)
        prompt = self.embed(prompt_ids)
        shape = (B, max_new_tokens, self.hparams.embed_dim)
        x = torch.randn(shape, device=prompt_ids.device, generator=generator, dtype=prompt.dtype)
        schedule = torch.linspace(len(self.abar) - 1, 0, steps or self.hparams.sampling_steps,
                                  device=prompt_ids.device).round().long()
        words = None
        for i, t in enumerate(schedule):
            x0 = self.predict_x0(torch.cat([prompt, x], 1), t.expand(B))[:, P:]
            if self.hparams.clamp:
                words = self.nearest(x0)
                x0 = self.embed(words)
            if i + 1 == len(schedule):
                x = x0
                break
            a_t, a_s = self.abar[t], self.abar[schedule[i + 1]]
            # q(x_s | x_t, x0) for s < t (DDPM eq. 7 between two arbitrary steps)
            beta = 1 - a_t / a_s
            mean = (a_s.sqrt() * beta * x0 + (a_t / a_s).sqrt() * (1 - a_s) * x) / (1 - a_t)
            std = ((1 - a_s) / (1 - a_t) * beta).sqrt()
            x = mean + temperature * std * torch.randn(shape, device=x.device, generator=generator, dtype=x.dtype)
        # clamped: the last step's words themselves; otherwise the rounding step on the final x0
        words = self.round(x) if words is None else words
        return self.fill_after_eos(torch.cat([prompt_ids, words], 1), P)
