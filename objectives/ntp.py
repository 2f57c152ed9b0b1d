"""Next-token prediction: the baseline every other family is measured against."""
from __future__ import annotations

import torch

from objectives.training.causal import CausalObjective
from objectives.training.losses import chunked_cross_entropy


class NextTokenPrediction(CausalObjective):
    """Cross-entropy of x[t+1] given x[<=t], computed in chunks over the sequence.

    Args:
        reverse: train a right-to-left model (the sequence is read backwards), as future summaries need.
        **kwargs: the base objective's arguments.
    """

    def __init__(self, *args, reverse: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reverse = reverse

    def likelihood_positions(self) -> slice:
        return slice(None, -1) if self.reverse else slice(1, None)  # a reversed model predicts tokens[:, :-1]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.reverse:
            batch = reversed_batch(batch)
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        hidden = self.hidden(inputs[:, :-1])
        nll, count, _ = chunked_cross_entropy(hidden, self.unembedding, tokens[:, 1:], mask[:, 1:],
                                              self.hparams.ce_chunk_size)
        loss = nll / count.clamp(min=1)
        if len(self.summaries):
            loss = loss + self.summary_loss(hidden, batch)
        return {"loss": loss, "ntp_nll": nll.detach(), "ntp_tokens": count}


SEQUENCE_KEYS = ("tokens", "inputs", "loss_mask", "segments")  # the batch's [B, L] tensors, one entry per position


def reversed_batch(batch: dict) -> dict:
    """The batch read right to left: every per-position tensor flipped along the sequence, the rest as it is, so
    that the loss and the summaries see the same order."""
    return {k: v.flip(1) if k in SEQUENCE_KEYS else v for k, v in batch.items()}
