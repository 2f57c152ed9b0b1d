"""Decoding shared by every objective: greedy and temperature / top-k sampling, and left-to-right generation of a
ragged batch with the trunk's cache. Draft-then-verify decoding is in `objectives/decoding/speculative.py`."""
from __future__ import annotations

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
def decode_after(model, logits: torch.Tensor, cache, steps: int, temperature: float = 0.0,
                 top_k: int | None = None) -> torch.Tensor:
    """Tokens [B, <= steps] decoded from next-token logits [B, V] over the data's vocabulary, feeding each token
    through the cache, for the families that write words after a part they produce otherwise (Coconut's thoughts,
    LaDiR's latent blocks). Rows that reach eos keep emitting it; decoding stops early when every row has."""
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    written = []
    for _ in range(steps):
        token = model.after_eos(sample_token(logits[:, : model.vocab_size], temperature, top_k), done)
        written.append(token[:, None])
        if done.all():
            break
        logits = model.logits(model.hidden(token[:, None], cache=cache)[:, -1])
    return torch.cat(written, 1) if written else logits.new_zeros(B, 0, dtype=torch.long)
