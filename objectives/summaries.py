"""Future summary prediction (FSP; Mahajan et al. 2025, "Beyond Multi-Token Prediction: Pretraining LLMs with
Future Summaries", arXiv 2510.14751): an auxiliary head on the trunk's hidden state h_t predicts a summary of the
long-range future x[>= t+2] (x[t+1] is next-token prediction's), so that the state has to carry a plan.

    L = L_objective + lambda * L_summary

Two summaries, each a mixin attached to any causal objective (NTP, MTP, DeepSeekMTP) through the objective's
`summaries` list and dropped at inference (generation never calls it):

- `BagOfWordsSummary`, a handcrafted summary: the set of tokens in x[t+2 .. t+window], predicted with a binary
  cross-entropy over the vocabulary, optionally tf-idf weighted. Logged as `train/fsp_bow_loss`, `val/fsp_bow_loss`.
- `ReverseLMSummary`, a learned summary: the hidden state of a frozen right-to-left language model at the position
  that has read exactly x[>= t+2], regressed with an L2 (or cosine) loss. Logged as `train/fsp_rev_loss`,
  `val/fsp_rev_loss`.

A summary is an `nn.Module` with `name`, `weight`, `attach(objective)` (called once when the objective is built:
the head's parameters are made there, at the objective's width and vocabulary) and
`forward(hidden [B, T, D], batch, objective) -> unweighted loss`, where hidden[:, t] has read x[0..t] and
T = L - 1 for a batch of L tokens. The objective's `summary_loss` weights, sums and logs them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from objectives.training.losses import CHUNK_MIB, chunk_positions


def future_window(tokens: torch.Tensor, valid: torch.Tensor, T: int, start: int, stop: int):
    """The tokens at offsets start..stop (inclusive) after each of the positions 0..T-1: ids and validity, each
    [B, T, stop - start + 1]. Offsets past the end of the row are invalid."""
    width = stop - start + 1
    ids = F.pad(tokens, (0, stop)).unfold(1, width, 1)[:, start : start + T]
    ok = F.pad(valid, (0, stop), value=False).unfold(1, width, 1)[:, start : start + T]
    return ids, ok


def source_positions(batch: dict, T: int) -> torch.Tensor:
    """[B, T] bool: the positions whose next token the objective counts (loss_mask of x[t+1]); the summaries train
    there and only there, so a prompt the data does not train on gets no summary loss either."""
    return batch["loss_mask"][:, 1 : T + 1] > 0


def _bow_chunk(z, unembedding, bias, idf, ids, first, ok):
    """BCE summed over positions and vocabulary, without building the [n, V] multi-hot target.

    For logits l and a target set S with counts c_v (c_v = 1 unweighted), weights w_v (1 unweighted, idf_v tf-idf):
        sum_v w_v * (c_v softplus(-l_v) if v in S else softplus(l_v))
      = sum_v w_v softplus(l_v) + sum_{v in S} w_v (c_v - 1) softplus(l_v) - sum_{v in S} w_v c_v l_v
    using softplus(-l) = softplus(l) - l. Unweighted, only first occurrences in the window count (a set); with
    tf-idf every occurrence does (tf = the count).
    """
    logits = (F.linear(z, unembedding) + bias).float()                      # [n, V]
    at = logits.gather(1, ids)                                               # [n, K] logits of the future tokens
    if idf is None:
        return F.softplus(logits).sum() - (at * first.float()).sum()
    w = idf[ids]                                                              # [n, K]
    return ((F.softplus(logits) * idf).sum() + (F.softplus(at) * w * (ok & ~first)).sum() - (at * w * ok).sum())


class BagOfWordsSummary(nn.Module):
    """The handcrafted summary: which tokens occur in x[t+2 .. t+window] (Mahajan et al. 2025, section 3).

    Target at position t: a_t[v] = 1 if token v occurs at some offset k in 2..window after t (and that position is
    a real token: inside the row, `loss_mask` > 0), else 0. x[t+1] is not part of it (next-token prediction's) unless
    it recurs further on. Head: a linear map of h_t read through the objective's tied unembedding plus a per-token
    bias, b_t = E W h_t + c. Loss at t: sum_v BCE(b_t[v], a_t[v]) / (window - 1), the per-slot scale of a
    cross-entropy; averaged over the positions whose next token the objective counts.

    With `weighting: tfidf` each vocabulary term is weighted by the token's inverse document frequency (idf_v =
    log((1 + N) / (1 + df_v)) + 1 over the first `idf_documents` training sequences, normalised to mean 1 over the
    vocabulary), and a token's positive term by its count in the window (tf). The weights are computed once, from the
    train split, the first time the summary runs inside a Trainer, and are a buffer: they are saved with the run's
    checkpoints and never recomputed on resume.

    The [n, V] logits are computed `chunk_size` positions at a time (by default as many as the objective's
    `ce_chunk_size` MiB hold) and recomputed in the backward pass when there are several chunks, like the chunked
    cross-entropy. With `positions` set, each training step computes the loss at that fraction of the positions,
    drawn uniformly without replacement: an unbiased estimate of the same mean at that fraction of the [n, V] cost.
    Evaluation always computes it at every position.

    Args:
        window: the last offset summarised (x[t+2 .. t+window]); at least 2.
        weighting: "none" or "tfidf".
        weight: lambda, the loss weight.
        chunk_size: positions per chunk of logits (default: those the objective's ce_chunk_size MiB hold).
        positions: fraction of the positions a training step computes the loss at (None: all).
        idf_documents: training sequences the idf counts read.
    """

    name = "fsp_bow"

    def __init__(self, window: int = 16, weighting: str = "none", weight: float = 1.0, chunk_size: int | None = None,
                 positions: float | None = None, idf_documents: int = 4096):
        super().__init__()
        if window < 2:
            raise ValueError(f"window {window} must be at least 2: the bag covers x[t+2 .. t+window]")
        if weighting not in ("none", "tfidf"):
            raise ValueError(f"weighting {weighting!r} is unknown: use 'none' or 'tfidf'")
        self.window, self.weighting, self.weight = window, weighting, weight
        if positions is not None and not 0 < positions <= 1:
            raise ValueError(f"positions {positions} must be a fraction in (0, 1], or null for every position")
        self.chunk_size, self.positions, self.idf_documents = chunk_size, positions, idf_documents

    def attach(self, objective) -> None:
        d, vocab = objective.embedding_width(), objective.vocab_size
        self.proj = nn.Linear(d, d, bias=False)
        # start at the base rate: about window - 1 of V tokens are in a bag
        p = min((self.window - 1) / vocab, 0.5)
        self.bias = nn.Parameter(torch.full((vocab,), math.log(p / (1 - p))))
        self.register_buffer("idf", torch.zeros(vocab))  # persistent: stored with the run; zeros = not yet counted

    # --- tf-idf weights -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_idf(self, sequences) -> torch.Tensor:
        """Count document frequencies over an iterable of batches (dicts with `tokens`, `loss_mask`; one row = one
        document) and store the normalised idf. Deterministic: a function of the sequences only."""
        vocab = self.idf.numel()
        df, documents = torch.zeros(vocab, dtype=torch.float64), 0
        for batch in sequences:
            tokens, real = batch["tokens"], batch["loss_mask"] > 0
            present = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool)
            present[torch.arange(tokens.shape[0])[:, None].expand_as(tokens)[real], tokens[real]] = True
            df += present.sum(0).double()
            documents += tokens.shape[0]
        if documents == 0:
            raise ValueError("the idf counts read no training sequence: the train split is empty")
        idf = torch.log((1 + documents) / (1 + df)) + 1
        self.idf.copy_((idf / idf.mean()).float())
        return self.idf

    def ensure_idf(self, objective) -> None:
        if self.weighting != "tfidf" or bool(self.idf.any()):
            return
        trainer = getattr(objective, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            raise RuntimeError("BagOfWordsSummary(weighting='tfidf') counts its weights on the train split when it "
                               "first runs inside a Trainer with a datamodule; outside one, call fit_idf(batches) first")
        loader = datamodule.train_dataloader()
        dataset = loader.dataset
        first = torch.utils.data.Subset(dataset, range(min(self.idf_documents, len(dataset))))
        ordered = torch.utils.data.DataLoader(first, batch_size=256, shuffle=False, collate_fn=loader.collate_fn)
        self.fit_idf(ordered)

    # --- the loss ---------------------------------------------------------------------------------------------------
    def targets(self, batch: dict, T: int):
        """(ids [B, T, K], first occurrence [B, T, K], valid [B, T, K], source positions [B, T]) with K = window - 1:
        the future tokens x[t+2 .. t+window] of every position t < T."""
        ids, ok = future_window(batch["tokens"], batch["loss_mask"] > 0, T, 2, self.window)
        same = (ids[..., :, None] == ids[..., None, :]) & ok[..., None, :]   # [B, T, K, K]: j == j' and j' valid
        earlier = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool, device=ids.device).tril(-1)
        first = ok & ~(same & earlier).any(-1)
        return ids, first, ok, source_positions(batch, T)

    def forward(self, hidden: torch.Tensor, batch: dict, objective) -> torch.Tensor:
        self.ensure_idf(objective)
        T = hidden.shape[1]
        ids, first, ok, src = self.targets(batch, T)
        ids, first, ok, z = ids[src], first[src], ok[src], hidden[src]
        if self.training and self.positions is not None and self.positions < 1:
            keep = torch.randperm(z.shape[0], device=z.device)[: max(1, round(self.positions * z.shape[0]))]
            ids, first, ok, z = ids[keep], first[keep], ok[keep], z[keep]
        z = self.proj(z)                                                      # [n, D]
        unembedding = objective.unembedding[: objective.vocab_size]
        idf = self.idf if self.weighting == "tfidf" else None
        budget = objective.hparams.get("ce_chunk_size", CHUNK_MIB)
        size = self.chunk_size or chunk_positions(budget, unembedding.shape[0])
        total = hidden.new_zeros((), dtype=torch.float32)
        chunks = range(0, z.shape[0], size)
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
        for s in chunks:
            piece = (z[s : s + size], unembedding, self.bias, idf, ids[s : s + size], first[s : s + size],
                     ok[s : s + size])
            total = total + (checkpoint(_bow_chunk, *piece, use_reentrant=False) if recompute else _bow_chunk(*piece))
        return total / (max(z.shape[0], 1) * (self.window - 1))


def reverse_lm_targets(reverse_model, tokens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reverse model's hidden states aligned to the forward positions 0..T-1: (targets [B, T, D_r], has [T]).

    Index arithmetic. A row holds L tokens x[0..L-1] and the forward trunk's hidden[:, t] (t = 0..L-2) has read
    x[0..t]. The reverse model (NTP with `reverse: true`) reads y = flip(x), y[j] = x[L-1-j], and runs its trunk on
    y[0..L-2]; its g[:, j] (j = 0..L-2) has read y[0..j] = x[L-1-j .. L-1]. The state that has read exactly
    x[>= t+2] has L-1-j = t+2, i.e. j = L-3-t. So target(t) = g[:, L-3-t] for t = 0..L-3, which is
    g[:, :L-2].flip(1); position t = L-2 has nothing after x[t+1] and gets no target (has[t] False).
    """
    L = tokens.shape[1]
    with torch.no_grad():
        g = reverse_model.hidden(tokens.flip(1)[:, :-1])                     # [B, L-1, D_r]
    targets = g[:, : L - 2].flip(1)                                           # [B, L-2, D_r]: row t = g[:, L-3-t]
    has = torch.arange(T, device=tokens.device) < L - 2
    return F.pad(targets, (0, 0, 0, T - targets.shape[1])), has


class ReverseLMSummary(nn.Module):
    """The learned summary: the hidden state of a frozen right-to-left language model (Mahajan et al. 2025,
    section 3.2) that has read x[>= t+2], the future after the next token (alignment: `reverse_lm_targets`).

    The companion is the project's NTP objective trained with `reverse: true` on the same data (for the code corpus
    configs/experiments/reverse_lm_code.yaml), loaded from its checkpoint as a `FrozenCompanion`: eval mode, no
    gradient, outside the optimizer, and stored in this run's checkpoints by path and hash. A head (Linear, GELU,
    Linear) maps h_t to the companion's width, and the loss is the squared error per dimension (`loss: l2`) or
    1 - cosine similarity (`loss: cosine`), averaged over the positions whose next token the objective counts.

    Args:
        checkpoint: the reverse model's checkpoint.
        loss: "l2" or "cosine".
        weight: lambda, the loss weight.
    """

    name = "fsp_rev"

    def __init__(self, checkpoint: str, loss: str = "l2", weight: float = 1.0):
        super().__init__()
        if loss not in ("l2", "cosine"):
            raise ValueError(f"loss {loss!r} is unknown: use 'l2' or 'cosine'")
        self.checkpoint, self.loss, self.weight = checkpoint, loss, weight

    def attach(self, objective) -> None:
        from pathlib import Path

        from objectives.training.checkpoints import FrozenCompanion
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(
                f"ReverseLMSummary: no reverse-model checkpoint at {self.checkpoint}: train one first (NTP with "
                f"reverse: true on the same data, e.g. configs/experiments/reverse_lm_code.yaml) and give its path")
        self.companion = FrozenCompanion(self.checkpoint)
        model = self.companion.model
        if not getattr(model, "reverse", False):
            raise ValueError(f"ReverseLMSummary: {self.checkpoint} holds a {type(model).__name__} that reads left to "
                             f"right; the summary needs a right-to-left model (NextTokenPrediction with reverse: true)")
        if model.vocab_size != objective.vocab_size:
            raise ValueError(f"ReverseLMSummary: the reverse model's vocabulary has {model.vocab_size} tokens, this "
                             f"model's {objective.vocab_size}: train the reverse model on the same data")
        d = objective.embedding_width()
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, model.trunk.d_model))

    def forward(self, hidden: torch.Tensor, batch: dict, objective) -> torch.Tensor:
        T = hidden.shape[1]
        targets, has = reverse_lm_targets(self.companion.model, batch["tokens"], T)
        src = source_positions(batch, T) & has
        predicted, targets = self.head(hidden[src]).float(), targets[src].float()
        if self.loss == "l2":
            per_position = (predicted - targets).pow(2).mean(-1)
        else:
            per_position = 1 - F.cosine_similarity(predicted, targets, dim=-1)
        return per_position.sum() / max(per_position.numel(), 1)
