"""Masked diffusion language model: MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models"), with its ancestral sampler and LLaDA's semi-autoregressive low-confidence remasking (Nie et al. 2025).

Forward process: each token is replaced by a `<mask>` token with probability 1 - alpha_t. Under the log-linear
schedule alpha_t = 1 - (1 - eps) t. The network (the trunk with full attention) predicts x0 with the SUBS
parameterization:
- the mask token's logit is never produced;
- an unmasked position carries its token over exactly, so only masked positions cost anything.

The loss is the continuous-time NELBO (MDLM eq. 10):

    E_t E_q [ sum over masked l of  alpha_t' / (1 - alpha_t) * log p_theta(x0_l | x_t) ]

With the log-linear schedule the weight -alpha_t' / (1 - alpha_t) is exactly 1/t. The times are sampled
antithetically across the batch. Divided by the tokens of the sequence, it is an upper bound on the NLL in nats
per token: `val/nll_bound`, evaluated with `eval_time_samples` fixed draws of t per sequence.

On reasoning data only the trained positions (`loss_mask`) are masked, so the prompt stays visible and the
answer is what is generated; padding is diffused as `<eos>` (`DenoisingObjective.denoising_targets`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from objectives.decoding.greedy import token_probs
from objectives.training import metrics as M
from objectives.training.denoising import DenoisingObjective
from objectives.training.losses import chunked_cross_entropy


class LogLinearSchedule:
    """The total noise sigma(t) = -log(1 - (1 - eps) t) of MDLM's log-linear schedule: alpha_t = exp(-sigma(t))."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt."""
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t: the probability that a token is masked at time t."""
        return -torch.expm1(-self.sigma(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha_t' / (1 - alpha_t) = sigma'(t) / (exp(sigma(t)) - 1): the NELBO weight of a masked token."""
        return self.rate(t) / torch.expm1(self.sigma(t))


class MaskedDiffusion(DenoisingObjective):
    """MDLM on a bidirectional trunk.

    Args:
        sampler: "ancestral" (MDLM's reverse process, which skips the network when no token changed) or
            "semi_ar" (LLaDA: blocks left to right; each step keeps the most confident predictions).
        sampling_steps: denoising steps of `generate` (over the whole canvas; semi_ar divides them across blocks).
        block_length: tokens per block of the semi_ar sampler.
        skip_unchanged: the ancestral sampler reuses the last prediction when no token changed since (MDLM's
            `ddpm_cache`). Without time conditioning the network's input is then the same, so the output is too.
        eval_time_samples: draws of t per validation sequence for `val/nll_bound` (fixed seed: the same each time).
        time_eps: the smallest t sampled, which keeps the 1/t weight finite.
        **kwargs: the base objective's arguments.
    """

    headline_metric = ("hparams.sampling_steps", "sampling steps")

    extra_tokens = 1  # <mask>, the last embedding row

    def __init__(self, *args, sampler: str = "ancestral", sampling_steps: int = 128, block_length: int = 32,
                 skip_unchanged: bool = True, eval_time_samples: int = 4, time_eps: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        if sampler not in ("ancestral", "semi_ar"):
            raise ValueError(f"sampler must be 'ancestral' or 'semi_ar', got {sampler!r}")
        if sampling_steps < 1 or block_length < 1 or eval_time_samples < 1:
            raise ValueError("sampling_steps, block_length and eval_time_samples must be at least 1, got "
                             f"{sampling_steps}, {block_length}, {eval_time_samples}")
        self.mask_id = self.vocab_size
        self.schedule = LogLinearSchedule()
        self.network_calls = 0

    # --- training ------------------------------------------------------------------------------------------------
    def sample_times(self, n: int, device, generator=None) -> torch.Tensor:
        """Antithetic (stratified) times in [time_eps, 1]: one uniform offset shifted by i/n for each of n rows."""
        u = torch.rand((), device=device, generator=generator)
        t = (u / n + torch.arange(n, device=device) / n) % 1
        eps = self.hparams.time_eps
        return (1 - eps) * t + eps

    def predictor_weight(self) -> torch.Tensor:
        """SUBS: the unembedding without the mask row, so the mask token is never predicted."""
        return self.unembedding[: self.vocab_size]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, maskable, counted, generator = self.bound_draws(*self.denoising_targets(batch))
        t = self.sample_times(x0.shape[0], x0.device, generator)
        masked = maskable & (torch.rand(x0.shape, device=x0.device, generator=generator)
                             < self.schedule.mask_prob(t)[:, None])
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        hidden = self.hidden(xt, mask="full")
        weight = self.schedule.weight(t)[:, None].expand_as(x0)
        chunk = self.hparams.ce_chunk_size

        def weighted_nll(where: torch.Tensor) -> torch.Tensor:
            return chunked_cross_entropy(hidden[where], self.predictor_weight(), x0[where], weight[where], chunk)[0]

        bound = weighted_nll(masked & counted)
        padding = weighted_nll(masked & ~counted) if (maskable & ~counted).any() else bound.new_zeros(())
        loss = (bound + padding) / maskable.sum().clamp(min=1)
        tokens = counted.sum()
        return {"loss": loss, "nll_bound": bound.detach(), "bound_tokens": tokens,
                "metrics": {M.VAL_MASKED_FRACTION: (masked.sum() / maskable.sum().clamp(min=1), tokens)}}

    # --- sampling ------------------------------------------------------------------------------------------------
    def x0_probs(self, xt: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
        """p_theta(x0 | x_t) [B, L, V + 1] under SUBS: zero on the mask token, one-hot on unmasked positions.
        Temperature 0 gives the temperature-1 distribution (greedy samplers take its argmax)."""
        self.network_calls += 1
        logits = self.logits(self.hidden(xt, mask="full"))[..., : self.vocab_size]
        probs = F.pad(token_probs(logits, temperature if temperature > 0 else 1.0, top_k), (0, 1))
        unmasked = (xt != self.mask_id)[..., None]
        # in place, without a second [B, L, V + 1] tensor: a masked row writes 0 into the (already 0) mask column
        return probs.masked_fill_(unmasked, 0).scatter_(-1, xt[..., None], unmasked.to(probs.dtype))

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, steps: int | None = None, sampler: str | None = None,
                 generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Continue prompts [B, P] by denoising `max_new_tokens` masked positions: [B, P + max_new_tokens].

        Everything after a row's first generated eos becomes eos, as in left-to-right decoding. Any other option
        (speculative, drafter, teacherless, ...) fails naming itself.
        """
        self.refuse_left_to_right_options(options)
        B, P = prompt_ids.shape
        self.check_generation_length(P + max_new_tokens)
        canvas = F.pad(prompt_ids, (0, max_new_tokens), value=self.mask_id)
        return self.fill_after_eos(self.denoise(canvas, steps, sampler, temperature, top_k, generator, first=P), P)

    @torch.no_grad()
    def infill(self, tokens: torch.Tensor, positions: torch.Tensor, temperature: float = 0.0,
               top_k: int | None = None, steps: int | None = None, sampler: str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Fill in any positions (a boolean tensor like `tokens`) given the rest of the sequence."""
        canvas = torch.where(positions, torch.full_like(tokens, self.mask_id), tokens)
        return self.denoise(canvas, steps, sampler, temperature, top_k, generator)

    def denoise(self, canvas: torch.Tensor, steps: int | None = None, sampler: str | None = None,
                temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                first: int = 0) -> torch.Tensor:
        """Replace every mask token of `canvas` [B, L]; positions that are not masks never change."""
        steps = steps or self.hparams.sampling_steps
        sampler = sampler or self.hparams.sampler
        if sampler == "ancestral":
            return self.ancestral(canvas, steps, temperature, top_k, generator)
        if sampler == "semi_ar":
            return self.semi_autoregressive(canvas, steps, temperature, top_k, generator, first)
        raise ValueError(f"sampler must be 'ancestral' or 'semi_ar', got {sampler!r}")

    def ancestral(self, x: torch.Tensor, steps: int, temperature: float, top_k: int | None,
                  generator: torch.Generator | None) -> torch.Tensor:
        """MDLM's reverse process from t = 1 to 0 in `steps` equal steps. From t to s < t a masked token is
        revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), as a draw from p_theta(x0 | x_t); the last
        step (s = 0) reveals every token that is left."""
        times = torch.linspace(1, 0, steps + 1, device=x.device)
        probs = None
        for t, s in zip(times[:-1], times[1:]):
            if probs is None or not self.hparams.skip_unchanged:
                probs = self.x0_probs(x, temperature, top_k)
                if temperature <= 0:
                    probs = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
            mask_t, mask_s = self.schedule.mask_prob(t), self.schedule.mask_prob(s) if s > 0 else s
            reveal = probs * (mask_t - mask_s) / mask_t
            reveal[..., self.mask_id] = mask_s / mask_t
            noise = torch.empty_like(reveal).exponential_(generator=generator)
            drawn = (reveal / noise).argmax(-1)  # a draw from `reveal` (exponential race)
            new = torch.where(x == self.mask_id, drawn, x)
            if not torch.equal(new, x):
                probs = None
            x = new
        return x

    def semi_autoregressive(self, x: torch.Tensor, steps: int, temperature: float, top_k: int | None,
                            generator: torch.Generator | None, first: int) -> torch.Tensor:
        """LLaDA's sampler: the canvas after `first` is cut into blocks of `block_length`, filled left to right.
        Within a block, each of its steps predicts every masked position and keeps the most confident
        predictions, an equal share of the block's masks per step."""
        block = self.hparams.block_length
        starts = range(first, x.shape[1], block)
        per_block = max(1, steps // len(starts))
        rows = torch.arange(x.shape[0], device=x.device)
        for start in starts:
            in_block = torch.zeros_like(x, dtype=torch.bool)
            in_block[:, start : start + block] = True
            for step in range(per_block):
                masked = (x == self.mask_id) & in_block
                if not masked.any():
                    break
                probs = self.x0_probs(x, temperature, top_k)
                if temperature > 0:
                    predicted = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)
                else:
                    predicted = probs.argmax(-1)
                confidence = probs.gather(-1, predicted[..., None]).squeeze(-1).masked_fill(~masked, float("-inf"))
                # spread the block's masks evenly over its remaining steps (LLaDA's get_num_transfer_tokens)
                count = masked.sum(1)
                keep = torch.div(count + per_block - step - 1, per_block - step, rounding_mode="floor")
                order = confidence.argsort(dim=1, descending=True)
                chosen = torch.zeros_like(masked)
                ranks = torch.arange(x.shape[1], device=x.device)[None, :] < keep[:, None]
                chosen[rows[:, None].expand_as(order), order] = ranks
                x = torch.where(chosen & masked, predicted, x)
        return x
