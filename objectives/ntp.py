"""Next-token prediction: the baseline every other family is measured against."""
from __future__ import annotations

import torch

from objectives.base import Objective
from objectives.losses import chunked_cross_entropy


class NextTokenPrediction(Objective):
    """Cross-entropy of x[t+1] given x[<=t], computed in chunks over the sequence.

    Args:
        reverse: train a right-to-left model (the sequence is read backwards), as future summaries need.
        **kwargs: the base objective's arguments.
    """

    def __init__(self, *args, reverse: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reverse = reverse

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        if self.reverse:
            tokens, inputs, mask = tokens.flip(1), inputs.flip(1), mask.flip(1)
        hidden = self.hidden(inputs[:, :-1])
        nll, count, _ = chunked_cross_entropy(hidden, self.unembedding, tokens[:, 1:], mask[:, 1:],
                                              self.hparams.ce_chunk_size)
        loss = nll / count.clamp(min=1)
        if len(self.summaries):
            loss = loss + self.summary_loss(hidden, batch)
        return {"loss": loss, "ntp_nll": nll.detach(), "ntp_tokens": count}
