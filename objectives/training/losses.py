"""Cross-entropy over a tied unembedding, computed in chunks of positions so that no full [B, T, V] fp32 logits
tensor is ever alive: each chunk's logits are recomputed in the backward pass instead of being stored.

A chunk is sized by the bytes of its fp32 logits, not by a count of positions: the logits of a fixed count of
positions grow with the vocabulary, so a fixed budget keeps the loss's memory the same at every V."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_MIB = 256.0  # default: 16384 positions a chunk at V=4096, 512 at V=131072


def chunk_positions(chunk_mib: float, vocab_size: int) -> int:
    """Positions per chunk whose fp32 logits [n, vocab_size] fit in `chunk_mib` MiB (at least one)."""
    if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not chunk_mib > 0:
        raise ValueError(f"ce_chunk_size {chunk_mib!r} must be a positive number of MiB: the memory of one chunk's "
                         f"fp32 logits in the chunked cross-entropy (default {CHUNK_MIB:g})")
    return max(1, int(chunk_mib * 2**20 // (4 * vocab_size)))


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    logits = F.linear(hidden, weight).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    predictions = logits.argmax(-1)
    return (nll * mask).sum(), ((predictions == targets).float() * mask).sum(), predictions


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, chunk_mib: float = CHUNK_MIB,
                          return_predictions: bool = False) -> tuple[torch.Tensor, ...]:
    """Sum of masked token NLLs, count of masked tokens, count of correct argmax predictions, and with
    `return_predictions` the argmax predictions themselves (shaped like targets).

    hidden [..., D], weight [V, D] (the unembedding), targets [...], mask [...] (weights, 1 = count); each chunk's
    fp32 logits take at most `chunk_mib` MiB (`chunk_positions`).
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    mask = torch.ones_like(targets, dtype=torch.float32) if mask is None else mask.reshape(-1).float()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = hidden.new_zeros((), dtype=torch.float32)
    chunk_size = chunk_positions(chunk_mib, weight.shape[0])
    chunks = range(0, hidden.shape[0], chunk_size)
    recompute = len(chunks) > 1 and torch.is_grad_enabled()
    predictions = []
    for start in chunks:
        piece = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size],
                 mask[start : start + chunk_size])
        nll, right, argmax = checkpoint(_chunk_loss, *piece, use_reentrant=False) if recompute else _chunk_loss(*piece)
        total, correct = total + nll, correct + right
        predictions.append(argmax)
    if return_predictions:
        return total, mask.sum(), correct, torch.cat(predictions).view(shape)
    return total, mask.sum(), correct
