"""What proposes drafts for speculative decoding (`objectives/decoding/speculative.py`): the `Drafter` a family
offers (its `drafters()`), prompt lookup (every family's drafter), and `CacheGroup`, the decoding state of a
family whose drafter keeps caches of its own (Meta's causal heads)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from objectives.decoding.greedy import greedy_token


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


class ChainDrafter(Protocol):
    """The batch-1 greedy form of a drafter, for the lean loop (`speculative.greedy_chain`), made once per decode
    over the host list of tokens (prompt and output so far, ending with the next certain token; the loop appends).

    `forward(ids [1, m], state, last)` runs the verify forward and returns a LongTensor [m, c] (or [1, c] with
    `last`, the prefill's last position): at each fed position the model's argmax, then whatever the drafter needs
    from that position to draft the step after (the heads' guesses, computed in the same pass over the
    unembedding). `drafts(rows, at, max_drafts)` takes those rows on the host and the last accepted position and
    returns the next step's drafts. The loop reads all rows with one `.tolist()`, the step's one host sync."""

    def forward(self, ids: torch.Tensor, state, last: bool = False) -> torch.Tensor: ...

    def drafts(self, rows: list[list[int]], at: int, max_drafts: int) -> list[int]: ...


@dataclass(frozen=True)
class Drafter:
    """A drafting strategy and what the loop may ask of it: `reads_tokens` (False: it drafts from the features
    alone, and the loop need not hand it the token history), `ranks_candidates` (it takes `width` and ranks
    candidates, so it can fill a tree) and `chain` (a factory of its batch-1 greedy form, `ChainDrafter`, which must
    draft what `propose` drafts for one row; None: the general loop serves every case)."""

    propose: Proposer
    reads_tokens: bool = True
    ranks_candidates: bool = False
    chain: Callable[[list[int]], ChainDrafter] | None = None

    def __call__(self, *args, **kwargs):
        return self.propose(*args, **kwargs)


class PromptLookup:
    """Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; training-free): find an earlier occurrence of
    the text's last n-gram (n from max_ngram down to 1) and draft the tokens that followed it.

    Which occurrence: the latest (the nearest context). Its continuation runs up to the end of the text, so a
    match p tokens back offers only p tokens; where the text has repeated with that period p for at least a whole
    period, it is a loop, and the continuation is extended cyclically (copied on from the drafts themselves), so a
    loop of period p is drafted as deep as asked, not capped at p tokens. Saxena's code takes the earliest
    occurrence instead, which has the longest continuation but the oldest context.

    It reads a host list of token ids that only grows (the caller appends to it) and keeps an index from every
    n-gram to its latest start, brought up to date on each call, so a lookup costs a few dict reads however long
    the text. Tokens < 0 (left padding) must be stripped by the caller.
    """

    def __init__(self, tokens: list[int], max_ngram: int = 3):
        self.tokens, self.max_ngram = tokens, max_ngram
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # the n-grams ending before this index are in `latest`

    def __call__(self, max_drafts: int) -> list[int]:
        """Up to max_drafts drafts (none where the last token has no earlier occurrence)."""
        t, S = self.tokens, len(self.tokens)
        # an occurrence needs a continuation: index the n-grams ending before the last token
        for end in range(self.indexed, S - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self.latest[tuple(t[end + 1 - n : end + 1])] = end + 1 - n
        self.indexed = max(self.indexed, S - 1)
        if max_drafts <= 0:
            return []
        for n in range(min(self.max_ngram, S - 1), 0, -1):
            start = self.latest.get(tuple(t[S - n :]))
            if start is not None:
                return continuation(t, start + n, max_drafts)
        return []


def continuation(tokens: list[int], source: int, max_drafts: int) -> list[int]:
    """Up to max_drafts tokens from `source` on, extended cyclically where the text ends in a loop: the last
    period (len - source tokens) repeats the one before it (`PromptLookup`)."""
    S = len(tokens)
    drafts = tokens[source : source + max_drafts]
    period = S - source
    if len(drafts) < max_drafts and S >= 2 * period and tokens[S - 2 * period : S - period] == tokens[source:]:
        drafts = (drafts * (max_drafts // period + 1))[:max_drafts]
    return drafts


def latest_match(tokens: list[int], max_ngram: int = 3) -> int | None:
    """Where the continuation of the latest earlier occurrence of the text's last n-gram starts (n from max_ngram
    down to 1), found by a backward scan that stops at the first hit: `PromptLookup`'s answer without its index,
    for a text seen once (a batch row in the general loop, whose layout changes between steps)."""
    S = len(tokens)
    for n in range(min(max_ngram, S - 1), 0, -1):
        tail = tokens[S - n :]
        for start in range(S - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return start + n
    return None


def lookup_drafts(tokens: torch.Tensor, max_drafts: int, max_ngram: int = 3, counts: bool = False):
    """Prompt lookup (`PromptLookup`'s drafts, by a backward scan) for a batch: tokens [B, S], each row ending with its next certain token;
    tokens < 0 (the left padding of ragged rows) match nothing. Rows that find fewer drafts are padded with their
    last one (verification rejects what is wrong, so padding changes no output). With `counts`, also each row's
    number of drafts found [B]."""
    B, S = tokens.shape
    if max_drafts <= 0:
        return (tokens.new_zeros(B, 0), tokens.new_zeros(B)) if counts else tokens.new_zeros(B, 0)
    rows = tokens.tolist()
    found_rows = []
    for row in rows:
        real = row[next((i for i, x in enumerate(row) if x >= 0), len(row)) :]
        source = latest_match(real, max_ngram)
        found_rows.append([] if source is None else continuation(real, source, max_drafts))
    k = max(len(r) for r in found_rows)
    padded = [r + [r[-1] if r else max(row[-1], 0)] * (k - len(r)) for r, row in zip(found_rows, rows)]
    drafts = torch.tensor(padded, dtype=tokens.dtype, device=tokens.device).view(B, k)
    return (drafts, torch.tensor([len(r) for r in found_rows], device=tokens.device)) if counts else drafts


class LookupChain:
    """Prompt lookup's batch-1 greedy form (`ChainDrafter`): the same drafts as `lookup_drafts`, from an index kept
    over the whole decode; the forward is the family's own (`decode_forward`)."""

    def __init__(self, model, tokens: list[int], num_drafts: int):
        self.model, self.lookup, self.num_drafts = model, PromptLookup(tokens), num_drafts

    def forward(self, ids: torch.Tensor, state, last: bool = False) -> torch.Tensor:
        logits, _ = self.model.decode_forward(ids, state)
        return greedy_token(logits[0, -1:] if last else logits[0], keepdim=True)

    def drafts(self, rows: list[list[int]], at: int, max_drafts: int) -> list[int]:
        return self.lookup(min(self.num_drafts, max_drafts))
