"""What proposes drafts for speculative decoding (`objectives/decoding/speculative.py`): the `Drafter` a family
offers (its `drafters()`), prompt lookup (every family's drafter), and `CacheGroup`, the decoding state of a
family whose drafter keeps caches of its own (Meta's causal heads)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch


class CacheGroup:
    """Several decoding caches advanced and cropped together (the trunk's and, say, each head's)."""

    def __init__(self, *caches):
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[0].length

    @property
    def lengths(self) -> torch.Tensor:
        return self.caches[0].lengths

    def crop(self, length) -> None:
        for cache in self.caches:
            cache.crop(length)

    def __iter__(self):
        return itertools.chain.from_iterable(self.caches)


# propose(tokens [B, S] ending with each row's next certain token (a view of the output; ragged rows: see
# `rows`), state, features at the last verified position [B, ...], temperature, top_k, max_drafts[, width])
# -> (drafts [B, k], draft distributions [B, k, V] or None for deterministic drafts); with `width`, ranked
# candidates [B, k, width] and None (tree drafts).
Proposer = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Drafter:
    """A drafting strategy and what the loop may ask of it: `reads_tokens` (False: it drafts from the features
    alone, and the loop need not hand it the token history) and `ranks_candidates` (it takes `width` and ranks
    candidates, so it can fill a tree)."""

    propose: Proposer
    reads_tokens: bool = True
    ranks_candidates: bool = False

    def __call__(self, *args, **kwargs):
        return self.propose(*args, **kwargs)


def lookup_drafts(tokens: torch.Tensor, max_drafts: int, max_ngram: int = 3, counts: bool = False):
    """Prompt-lookup drafting (training-free): find the latest earlier occurrence of the context's last n-gram
    (n from max_ngram down to 1) and propose the tokens that followed it. Tokens < 0 (the left padding of ragged
    rows) match nothing. Rows that find fewer drafts are padded with their last one (verification rejects what
    is wrong, so padding changes no output). With `counts`, also each row's number of drafts found [B]."""
    B, S = tokens.shape
    if max_drafts <= 0:
        return (tokens.new_zeros(B, 0), tokens.new_zeros(B)) if counts else tokens.new_zeros(B, 0)
    found_rows = []
    for row in tokens.tolist():
        found = []
        for n in range(min(max_ngram, S - 1), 0, -1):
            tail = row[-n:]
            for start in range(S - n - 1, -1, -1):
                if row[start : start + n] == tail:
                    found = row[start + n : start + n + max_drafts]
                    break
            if found:
                break
        found_rows.append(found)
    k = max(len(r) for r in found_rows)
    padded = [r + [r[-1] if r else max(row[-1], 0)] * (k - len(r)) for r, row in zip(found_rows, tokens.tolist())]
    drafts = torch.tensor(padded, dtype=tokens.dtype, device=tokens.device).view(B, k)
    return (drafts, torch.tensor([len(r) for r in found_rows], device=tokens.device)) if counts else drafts
