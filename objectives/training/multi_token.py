"""What both multi-token families share (`objectives/mtp.py`, Meta's heads; `objectives/deepseek_mtp.py`,
DeepSeek-V3's modules): the targets k tokens ahead, and the per-head figures with the accepted length a
self-speculative decoder would get from them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from objectives.training import metrics as M


def shifted(tokens: torch.Tensor, mask: torch.Tensor, k: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets k positions ahead for positions 0..length-1 ([B, length]); positions past the end are masked."""
    targets, valid = tokens[:, k : k + length], mask[:, k : k + length].float()
    pad = length - targets.shape[1]
    return F.pad(targets, (0, pad)), F.pad(valid, (0, pad))


def head_metrics(stats: dict) -> dict:
    """Next-token figures from head 1, per-head loss and accuracy, and the expected accepted length."""
    nll, count = stats[0][0], stats[0][1]
    metrics = {}
    for k, (head_nll, head_count, correct, _) in stats.items():
        metrics[M.head_loss(k + 1)] = (head_nll / head_count.clamp(min=1), int(head_count))
        metrics[M.head_acc(k + 1)] = (correct / head_count.clamp(min=1), int(head_count))
    if len(stats) > 1:
        total, positions = expected_accept_length([stats[k][3] for k in sorted(stats)])
        if positions:
            metrics[M.ACCEPT_LEN_TEACHER_FORCED] = (total / positions, positions)
    return {"ntp_nll": nll, "ntp_tokens": count, "metrics": metrics}


def expected_accept_length(predictions: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Tokens per decoding step under greedy verification, from teacher-forced argmax predictions
    (`val/accept_len_teacher_forced`; the decoded figure comes from `speculative_generate`).

    predictions[k-1] [B, T] is head k's argmax at position t (a guess of token t+k). Head k's draft is accepted
    when it equals head 1's greedy choice at position t+k-1 and every earlier draft was accepted, so a step emits
    1 + sum_j prod_{k<=j} agree_k tokens. Returns (sum over positions, number of positions).
    """
    n, T = len(predictions), predictions[0].shape[1]
    usable = T - n + 1
    if usable <= 0:
        return predictions[0].new_zeros((), dtype=torch.float32), 0
    length = torch.ones(predictions[0].shape[0], usable, device=predictions[0].device)
    run = torch.ones_like(length)
    for k in range(2, n + 1):
        agree = (predictions[k - 1][:, :usable] == predictions[0][:, k - 1 : k - 1 + usable]).float()
        run = run * agree
        length = length + run
    return length.sum(), length.numel()
