"""Decoding shared by every objective: greedy and temperature / top-k sampling; `continue_decoding`, the loop that
feeds each chosen token back until every row has stopped; and `left_to_right`, generation of a ragged batch of
prompts with the trunk's cache. Draft-then-verify decoding is in `objectives/decoding/speculative.py`."""
from __future__ import annotations

from typing import Callable

import torch


def greedy_token(logits: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The argmax of logits [..., V], taken in fp32: the same index (bf16 values are exact in fp32, and ties keep
    the first), but on a CPU an argmax over bf16 costs about 3.7 times a cast and an fp32 argmax (4 x 4 x 4096
    logits: 241 against 65 us, 1 thread, AMD EPYC with AVX-512 bf16, alone)."""
    return logits.float().argmax(-1, keepdim=keepdim)


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None) -> torch.Tensor:
    """Greedy (temperature 0) or temperature / top-k sampling from logits [..., V] -> token ids [...]."""
    if temperature <= 0:
        return greedy_token(logits)
    return torch.multinomial(token_probs(logits, temperature, top_k).flatten(0, -2), 1).view(logits.shape[:-1])


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """The sampling distribution that `sample_token` draws from (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


@torch.no_grad()
def left_to_right(model, prompt_ids: torch.Tensor, max_new_tokens: int | torch.Tensor, temperature: float = 0.0,
                  top_k: int | None = None, teacherless: tuple[int, int] | None = None,
                  prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Left-to-right decoding of a batch with the trunk's cache, rows of different lengths at once.

    prompt_ids [B, P]; with `prompt_lengths` [B] the prompts are right-padded (row b's prompt is its first
    prompt_lengths[b] tokens; what follows is ignored). max_new_tokens: one budget, or a [B] tensor of per-row
    budgets. Row b of the result is its prompt, its generation right after it, then eos (0 without an eos):
    [B, max(P, max_b(length_b + budget_b))], i.e. [B, P + max_new_tokens] for equal prompts and one budget.

    One forward prefills every prompt (padding masked; each row's cache ends at its own prompt), then each step
    feeds every row's last token. A row is finished at eos (which it emits from then on) or at its budget;
    finished rows leave the batch (the cache keeps the other rows) once they are a quarter of it, or at once
    where a row would pass the trunk's max_seq_len, and decoding stops when no row is left. Greedy output is, token
    for token, each row's output alone. `teacherless` = (marker_id, dummy_id): once a row has emitted the marker,
    it reads the dummy token instead of its own output.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    lengths = (torch.full((B,), P, dtype=torch.long, device=device) if prompt_lengths is None
               else torch.as_tensor(prompt_lengths, dtype=torch.long, device=device).reshape(B))
    budgets = torch.as_tensor(max_new_tokens, dtype=torch.long, device=device).expand(B).clone()
    if bool((lengths < 1).any()) or bool((lengths > P).any()):
        raise ValueError(f"prompt_lengths must lie in 1..{P} (the prompts' width); got {lengths.tolist()}")
    total = int((lengths + budgets).max()) if B else P
    model.check_generation_length(total)
    fill = model.eos_id if model.eos_id is not None else 0
    real = torch.arange(P, device=device)[None] < lengths[:, None]
    out = prompt_ids.new_full((B, max(P, total)), fill)
    out[:, :P] = prompt_ids.masked_fill(~real, fill)
    cache = model.trunk.make_cache(B, device=device, dtype=model.embed.weight.dtype)
    ragged = bool((~real).any())
    hidden = model.hidden(prompt_ids, cache=cache, **({"padding_mask": real} if ragged else {}))
    logits = model.logits(hidden[torch.arange(B, device=device), lengths - 1])
    rows = torch.arange(B, device=device)  # the batch rows still decoding, in the cache's order
    pos, done = lengths.clone(), torch.zeros(B, dtype=torch.bool, device=device)
    answering = torch.zeros_like(done)
    limit = model.trunk.max_seq_len
    while rows.numel():
        token = model.after_eos(sample_token(logits, temperature, top_k), done)
        writes = budgets > 0
        out[rows[writes], pos[writes]] = token[writes]
        pos, budgets = pos + 1, budgets - 1
        finished = done | (budgets <= 0)
        n_finished = int(finished.sum())
        if n_finished == len(rows):
            break
        if n_finished and (4 * n_finished >= len(rows) or int(pos.max()) > limit):
            keep = (~finished).nonzero()[:, 0]
            rows, pos, budgets, done, answering, token = (t[keep] for t in (rows, pos, budgets, done, answering, token))
            cache = cache.fork(keep)
        fed = token
        if teacherless is not None:
            marker, dummy = teacherless
            fed = torch.where(answering, torch.full_like(token, dummy), token)
            answering = answering | (token == marker)
        logits = model.logits(model.hidden(fed[:, None], cache=cache)[:, -1])
    return out


@torch.no_grad()
def continue_decoding(logits: torch.Tensor, feed: Callable[[torch.Tensor], torch.Tensor], steps: int,
                      stop_id: int | None, fill_id: int | None = None, temperature: float = 0.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Tokens [B, <= steps] from next-token logits [B, V]: each step chooses a token per row (greedy, or sampled),
    and `feed(token [B])` advances the caller's cache and returns the next logits. A row that has emitted
    `stop_id` emits `fill_id` (default: stop_id again) from then on; decoding stops once every row has stopped.
    The loop of every family that writes after a part it produced otherwise (Coconut's thoughts, LaDiR's latent
    blocks and its VAE's steps, Skeleton-of-Thought's points)."""
    B = logits.shape[0]
    fill_id = stop_id if fill_id is None else fill_id
    stopped = torch.zeros(B, dtype=torch.bool, device=logits.device)
    written = []
    for step in range(steps):
        token = sample_token(logits, temperature, top_k)
        if stop_id is not None:
            token = token.masked_fill(stopped, fill_id)
            stopped |= token == stop_id
        written.append(token)
        if step == steps - 1 or bool(stopped.all()):
            break
        logits = feed(token)
    return torch.stack(written, 1) if written else logits.new_zeros(B, 0, dtype=torch.long)


def decode_after(model, logits: torch.Tensor, cache, steps: int, temperature: float = 0.0,
                 top_k: int | None = None) -> torch.Tensor:
    """Tokens [B, <= steps] decoded from next-token logits [B, V] over the data's vocabulary, feeding each token
    through the model's cache; rows that reach eos keep emitting it."""
    def feed(token: torch.Tensor) -> torch.Tensor:
        return model.logits(model.hidden(token[:, None], cache=cache)[:, -1])[:, : model.vocab_size]
    return continue_decoding(logits[:, : model.vocab_size], feed, steps, model.eos_id, temperature=temperature,
                             top_k=top_k)
