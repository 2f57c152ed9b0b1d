"""The denoising tier: families that generate a whole canvas at once by denoising it (MDLM, Diffusion-LM).

What they share beyond `Objective`: full attention, no future summaries (a position has seen the future), the
likelihood bound's draws, the targets of a reasoning batch (the prompt kept, the padding noised as eos), and the
form of their output (everything after a row's first eos is eos). Answer scoring gives them one canvas per
prompt length, exactly as long as the sequences they were trained on.
"""
from __future__ import annotations

import torch

from objectives.training.base import Objective


class DenoisingObjective(Objective):
    """A family that denoises whole sequences; its loss returns "nll_bound" and "bound_tokens"."""

    required_masks = ("full",)
    generates_ragged = takes_row_budgets = False  # a canvas per prompt length
    generation_slack = 0

    def bound_draws(self, *tensors: torch.Tensor):
        """Training: the tensors and no generator (fresh noise). Evaluation: each tensor repeated
        `eval_time_samples` times along the batch and a generator with a fixed seed, so that a likelihood bound
        is estimated from more draws, and from the same draws at every validation."""
        if self.training:
            return (*tensors, None)
        repeats = self.hparams.eval_time_samples
        generator = torch.Generator(device=tensors[0].device).manual_seed(0)
        return (*(x.repeat(repeats, *[1] * (x.dim() - 1)) for x in tensors), generator)

    def denoising_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the families that denoise a whole sequence at once: x0 [B, L] (cut to the trunk's length), the
        positions that are noised, and the positions a likelihood bound counts (`loss_mask`).

        On reasoning batches the prompt is never noised, and the padding after a sequence's end (segment -1) is
        noised as `<eos>` (LLaDA's fine-tuning recipe), so that a fixed-length canvas learns where to stop.
        """
        tokens, counted = batch["tokens"], batch["loss_mask"] > 0
        length = min(tokens.shape[1], self.trunk.max_seq_len)
        tokens, counted = tokens[:, :length], counted[:, :length]
        noised = counted
        if "segments" in batch and self.eos_id is not None:
            padding = batch["segments"][:, :length] < 0
            tokens = torch.where(padding, torch.full_like(tokens, self.eos_id), tokens)
            noised = counted | padding
        return tokens, noised, counted

    def likelihood_positions(self) -> slice:
        return slice(0, self.trunk.max_seq_len)  # the whole sequence, as far as the trunk reads it

    def refuse_left_to_right_options(self, options: dict) -> None:
        """speculative, drafter, num_drafts, teacherless, ...: left-to-right modes a denoising family has not."""
        self.refuse_options(options, "generates by denoising, not left to right")

    def fill_after_eos(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """A whole canvas generated at once: everything after a row's first eos (from `start`) becomes eos, the
        form left-to-right decoding gives."""
        if self.eos_id is not None:
            after_eos = (ids[:, start:] == self.eos_id).int().cumsum(1) > 0
            ids[:, start:] = ids[:, start:].masked_fill(after_eos, self.eos_id)
        return ids
