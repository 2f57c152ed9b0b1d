"""Decoding shared by every objective: sampling, and draft-then-verify (speculative) decoding in which a drafter proposes k tokens, one cached forward of the
model scores them, the longest agreeing prefix plus one token is kept, and the cache is cropped back.

Greedy (temperature 0): a draft is kept when it equals the model's own argmax, so the output is token for token
plain greedy decoding. Sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft d
with probability min(1, p(d) / q(d)), on rejection resample from normalize(max(0, p - q)), so the output has the
distribution of plain sampling. Rows of a batch may accept different lengths; the batch keeps the shortest
accepted prefix (a longer accepted prefix of another row is redrafted later, which changes neither output).
"""
from __future__ import annotations

from typing import Callable

import torch



def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None) -> torch.Tensor:
    """Greedy (temperature 0) or temperature / top-k sampling from logits [..., V] -> token ids [...]."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(token_probs(logits, temperature, top_k).flatten(0, -2), 1).view(logits.shape[:-1])


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """The sampling distribution that `sample_token` draws from (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


class CacheGroup:
    """Several decoding caches advanced and cropped together (the trunk's and, say, each head's)."""

    def __init__(self, *caches):
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[0].length

    def crop(self, length: int) -> None:
        for cache in self.caches:
            cache.crop(length)

# propose(tokens [B, S] ending with the next certain token, state, features at the last verified position,
# temperature, top_k, max_drafts) -> (drafts [B, k], draft distributions [B, k, V] or None for deterministic drafts)
Proposer = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def speculative_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, propose: Proposer,
                         temperature: float = 0.0, top_k: int | None = None) -> tuple[torch.Tensor, dict]:
    """Decode with drafts; returns ([B, P + max_new_tokens] ids, {"steps", "tokens"}: model forwards, new tokens)."""
    B, P = prompt_ids.shape
    total = P + max_new_tokens
    model.check_generation_length(total)
    state = model.start_decoding(B, prompt_ids.device)
    logits, features = model.decode_forward(prompt_ids, state)
    next_token = sample_token(logits[:, -1], temperature, top_k)
    features = features[:, -1]
    tokens, done = prompt_ids, torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    steps = 0
    while tokens.shape[1] < total and not done.all():
        drafts, q = propose(torch.cat([tokens, next_token[:, None]], 1), state, features, temperature, top_k,
                            total - tokens.shape[1] - 1)
        candidate = torch.cat([next_token[:, None], drafts], 1)
        start = state.length
        logits, step_features = model.decode_forward(candidate, state)  # logits[:, j] follows candidate[:, j]
        steps += 1
        k = drafts.shape[1]
        accepted, reject_at = _accept(drafts, q, logits[:, :k], temperature, top_k)
        a = int(accepted[~done].min()) if k else 0
        for j in range(a + 1):
            tokens = torch.cat([tokens, model.after_eos(candidate[:, j], done)[:, None]], 1)
        next_token = _next_certain_token(logits[:, a], q[:, a] if q is not None and a < k else None,
                                         drafts[:, a] if a < k else None, reject_at == a, temperature, top_k)
        state.crop(start + a + 1)
        features = step_features[:, a]
    return model.pad_to(tokens, total), {"steps": steps, "tokens": tokens.shape[1] - P}


def _accept(drafts, q, logits, temperature, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many leading drafts are accepted, and the index of the first rejected one (k if none)."""
    k = drafts.shape[1]
    if k == 0:
        zero = torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
        return zero, zero
    if temperature <= 0:
        ok = drafts == logits.argmax(-1)
    else:
        p = token_probs(logits, temperature, top_k).gather(-1, drafts[..., None])[..., 0]
        q_d = q.gather(-1, drafts[..., None])[..., 0] if q is not None else torch.ones_like(p)
        ok = torch.rand_like(p) * q_d < p  # accept with probability min(1, p / q)
    accepted = ok.long().cumprod(1).sum(1)
    return accepted, accepted  # the first rejection sits right after the accepted prefix


def _next_certain_token(logits, q, draft, rejected, temperature, top_k) -> torch.Tensor:
    """The token after the kept prefix: greedy argmax; or a sample from p, or from the residual where the draft
    at this position was rejected."""
    if temperature <= 0:
        return logits.argmax(-1)
    p = token_probs(logits, temperature, top_k)
    if draft is not None:
        q = q if q is not None else torch.nn.functional.one_hot(draft, p.shape[-1]).to(p.dtype)
        residual = (p - q).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        use_residual = rejected[:, None] & (mass > 1e-12)
        p = torch.where(use_residual, residual / mass.clamp(min=1e-12), p)
    return torch.multinomial(p, 1)[:, 0]


def lookup_drafts(tokens: torch.Tensor, max_drafts: int, max_ngram: int = 3) -> torch.Tensor:
    """Prompt-lookup drafting (training-free): find the latest earlier occurrence of the context's last n-gram
    (n from max_ngram down to 1) and propose the tokens that followed it. Rows that find fewer drafts cut the
    batch's drafts to their length."""
    B, S = tokens.shape
    if max_drafts <= 0:
        return tokens.new_zeros(B, 0)
    rows = []
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
        rows.append(found)
    k = min(len(r) for r in rows)
    return torch.tensor([r[:k] for r in rows], dtype=tokens.dtype, device=tokens.device).view(B, k)


def expected_accept_length(predictions: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Tokens per decoding step under greedy verification, from teacher-forced argmax predictions.

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
