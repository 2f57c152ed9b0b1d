"""Speculative (draft-then-verify) decoding shared by every left-to-right objective.

A drafter proposes tokens, one cached forward of the model scores them all, the longest prefix the model agrees
with is kept plus one token of the model's own, and the cache is cropped back to it.

Greedy (temperature 0): a draft is kept when it equals the model's own argmax, so the output is token for token
plain greedy decoding. Sampling, chain drafts: speculative sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023): accept draft d with probability
min(1, p(d) / q(d)); on rejection resample from normalize(max(0, p - q)), so the output has the distribution of
plain sampling.

Tree drafts (the drafter's ranked candidates, verified in one forward with a tree attention mask) are in
`objectives/decoding/draft_trees.py`; drafters (`Drafter`, prompt lookup) in `objectives/decoding/drafters.py`.

At batch 1, greedy, with chain drafts (the case of a single user on a CPU core), `greedy_chain` runs instead: a lean
loop that keeps the tokens on the host, accepts on host integers and makes one host sync per step, and whose
drafter computes its next drafts inside the verify forward, so that a verify step costs little more than its
forward. Trees stay for the GPU, where extra nodes are nearly free.

Rows of a batch keep their own accepted length (each row's cache is cropped to its own end; the trunk's per-row
lengths and positions place the next drafts). A drafter whose state advances for the whole batch at once (a
DeepSeek MTP module chain) sets `per_row = False` on its state; the batch then keeps the shortest accepted prefix,
which changes no output.
"""
from __future__ import annotations

import torch

from objectives.decoding.draft_trees import as_tree, at_positions, compact_to_path, verify_tree
from objectives.decoding.drafters import Drafter, Proposer
from objectives.decoding.greedy import greedy_token, sample_token, token_probs


@torch.no_grad()
def speculative_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, propose: Proposer,
                         temperature: float = 0.0, top_k: int | None = None, tree=None,
                         prompt_lengths: torch.Tensor | None = None, lean: bool = True
                         ) -> tuple[torch.Tensor, dict]:
    """Decode with drafts: prompt [B, P] (rows right-padded to `prompt_lengths`) -> (ids [B, max(P, longest
    prompt + max_new_tokens)], row b's prompt, then its max_new_tokens new tokens, then padding, the layout of
    `objectives.decoding.greedy.left_to_right`; {"steps", "tokens"}: verify forwards and new tokens per row).

    The loop is lean: tokens are written into a preallocated output (the drafter reads a view of it; a copy only
    for ragged rows and a drafter that reads tokens), the model runs one argmax per verified position, the causal
    chain case passes no mask, and a step makes one host sync (the accepted lengths, which the cache crop and
    the loop's end need). One row decoded greedily with chain drafts by a drafter that has a batch-1 form goes
    to `greedy_chain` (`lean=False` keeps it in this loop: the same output and, for the same drafts, the same
    steps).
    """
    tree = as_tree(tree)
    if tree is not None and tree.is_chain:
        tree = None  # a tree of width 1 is a chain: no mask needed
    drafter = propose if isinstance(propose, Drafter) else Drafter(propose)
    if tree is not None and not drafter.ranks_candidates:
        raise ValueError("tree drafts need a drafter that ranks its candidates (multi-token heads or DeepSeek "
                         "modules); prompt lookup proposes one continuation: decode it without a tree")
    if tree is not None and "tensor" not in getattr(model.trunk, "supported_masks", ()):
        raise ValueError(f"tree drafts need explicit attention masks, which the {type(model.trunk).__name__} trunk "
                         f"cannot serve: decode it with chain drafts (no tree)")
    B, P = prompt_ids.shape
    device = prompt_ids.device
    model.check_generation_length(P + max_new_tokens)
    state = None
    if (lean and B == 1 and temperature <= 0 and tree is None and drafter.chain is not None
            and (prompt_lengths is None or int(torch.as_tensor(prompt_lengths).reshape(-1)[0]) == P)):
        state = model.start_decoding(1, device)
        if not hasattr(state, "accept"):  # a drafter that must see every verified position takes the general loop
            return greedy_chain(model, prompt_ids, max_new_tokens, drafter.chain, state)
    limit = model.trunk.max_seq_len
    lengths = (torch.full((B,), P, dtype=torch.long, device=device) if prompt_lengths is None
               else torch.as_tensor(prompt_lengths, dtype=torch.long, device=device))
    host_n = lengths.tolist()
    ragged = len(set(host_n)) > 1
    end = [x + max_new_tokens for x in host_n]  # each row's final length
    pad = model.eos_id if model.eos_id is not None else 0
    slack = (tree.max_depth if tree is not None else max_new_tokens) + 2
    out = torch.full((B, P + max_new_tokens + slack), pad, dtype=prompt_ids.dtype, device=device)
    out[:, :P] = prompt_ids
    arange = torch.arange(out.shape[1], device=device)

    state = model.start_decoding(B, device) if state is None else state
    per_row = getattr(state, "per_row", True)
    if ragged and not per_row:
        raise ValueError(f"{type(model).__name__}'s drafter advances the whole batch at once: decode prompts of "
                         f"different lengths one length at a time")
    options = {"padding_mask": arange[:P] < lengths[:, None]} if ragged else {}
    logits, features = model.decode_forward(prompt_ids, state, **options)
    if hasattr(state, "accept"):
        state.accept(features)
    next_token = sample_token(at_positions(logits, lengths - 1), temperature, top_k)
    features = at_positions(features, lengths - 1)
    n = lengths + 1  # tokens in `out` per row, the next certain token included
    out.scatter_(1, lengths[:, None], next_token[:, None])
    host_n = [x + 1 for x in host_n]
    is_eos = torch.zeros(B, dtype=torch.bool, device=device) if model.eos_id is None else next_token == model.eos_id
    done = is_eos.tolist()
    active = [x < e and not d for x, e, d in zip(host_n, end, done)]
    reads_tokens = drafter.reads_tokens
    steps = 0
    while any(active):
        room = limit - (max(host_n) - 1)  # positions left in the cache of the longest row
        depth = min(max(e - x for e, x, a in zip(end, host_n, active) if a) - 1, room - 1)
        context = out[:, : max(host_n)]
        if reads_tokens and len(set(host_n)) > 1:  # rows of different lengths (ragged prompts, or rows that
            # accepted different lengths): right-aligned, so that every row ends with its next token; -1 matches nothing
            shift = context.shape[1] - n[:, None]
            column = arange[: context.shape[1]]
            context = context.gather(1, (column - shift).clamp(min=0)).masked_fill(column < shift, -1)
        cached = n - 1
        if tree is None:
            drafts, q = propose(context, state, features, temperature, top_k, depth)
            logits, step_features = model.decode_forward(torch.cat([next_token[:, None], drafts], 1), state)
            if temperature <= 0:
                prediction = greedy_token(logits)  # one argmax per position
                accepted = (drafts == prediction[:, :-1]).long().cumprod(1).sum(1)
                new_token = prediction.gather(1, accepted[:, None])[:, 0]
            else:
                accepted, reject_at = _accept(drafts, q, logits[:, :-1], temperature, top_k)
                new_token = _next_certain_token(logits, accepted[:, None], q, drafts, reject_at, temperature, top_k)
            path_tokens, path_nodes = drafts, arange[: drafts.shape[1] + 1].expand(B, -1)
        else:
            shape = tree.truncated(depth)
            while len(shape.paths) > room:  # every node needs a place in the cache
                shape = shape.truncated(shape.max_depth - 1)
            ranked, _ = propose(context, state, features, temperature, top_k, shape.max_depth, width=shape.width)
            shape = shape.truncated(ranked.shape[1])
            accepted, new_token, path_nodes, path_tokens, step_features = verify_tree(
                model, state, shape, next_token, ranked, temperature, top_k, cached, max(host_n) - 1)
        steps += 1
        # each row keeps its own accepted drafts, at most up to its final length (a whole-batch drafter: the
        # shortest); where that cuts an accepted path, the next token is the path's own
        cap = torch.tensor([max(e - x - 1, 0) for e, x in zip(end, host_n)], device=device)
        final = torch.minimum(accepted, cap)
        if not per_row:
            final = final[torch.tensor(active, device=device)].min().expand(B)
        if path_tokens.shape[1]:
            cut = at_positions(path_tokens[..., None], final.clamp(max=path_tokens.shape[1] - 1))[:, 0]
            new_token = torch.where(final < accepted, cut, new_token)
        # the kept drafts, then the model's own token; the positions after it are overwritten later
        written = torch.cat([path_tokens, path_tokens.new_zeros(B, 1)], 1).scatter_(1, final[:, None],
                                                                                     new_token[:, None])
        width = written.shape[1]
        if model.eos_id is not None:
            is_eos = (written == model.eos_id) & (arange[:width] <= final[:, None])
        out.scatter_(1, n[:, None] + arange[:width], written)
        keep = torch.tensor(active if per_row else [True] * B, device=device)
        grow = torch.where(keep, final + 1, 0)
        if tree is not None:
            compact_to_path(state, cached, path_nodes)
        host = torch.cat([grow, is_eos.any(1).long() if model.eos_id is not None else grow[:0]]).tolist()  # one sync
        grow_host = host[:B]
        if model.eos_id is not None:
            done = [d or bool(e) for d, e in zip(done, host[B:])]
        new_cached = [x - 1 + g for x, g in zip(host_n, grow_host)]
        state.crop(new_cached[0] if len(set(new_cached)) == 1 else cached + grow)
        if hasattr(state, "accept"):
            state.accept(step_features.gather(1, path_nodes[:, : max(grow_host)].view(
                B, -1, *[1] * (step_features.dim() - 2)).expand(-1, -1, *step_features.shape[2:])))
        features = at_positions(step_features, path_nodes.gather(1, final[:, None])[:, 0])
        next_token = torch.where(keep, new_token, next_token)
        n = n + grow
        host_n = [x + g for x, g in zip(host_n, grow_host)]
        active = [x < e and not d for x, e, d in zip(host_n, end, done)]
    ids = out[:, : max(P, max(end))]  # [B, P + max_new_tokens] for prompts of one length
    generated = (arange[: ids.shape[1]] >= lengths[:, None]) & (arange[: ids.shape[1]] < lengths[:, None] + max_new_tokens)
    if model.eos_id is not None:
        after_eos = ((ids == model.eos_id) & generated).long().cumsum(1) > 0
        ids = ids.masked_fill(after_eos & generated, model.eos_id)
    ids = ids.masked_fill(arange[: ids.shape[1]] >= lengths[:, None] + max_new_tokens, pad)
    return ids, {"steps": steps, "tokens": max_new_tokens}


@torch.no_grad()
def greedy_chain(model, prompt_ids: torch.Tensor, max_new_tokens: int, chain, state=None
                 ) -> tuple[torch.Tensor, dict]:
    """Speculative greedy decoding of one row with chain drafts, lean: prompt [1, P] -> (ids [1, P +
    max_new_tokens], {"steps", "tokens"}), token for token plain greedy decoding.

    `chain(tokens)` makes the drafter's batch-1 form (`objectives.decoding.drafters.ChainDrafter`) over the host
    list of tokens. A step feeds the next certain token and the drafts; the drafter's forward returns, for every
    fed position, the model's argmax and what the drafter drafts from there (the heads' guesses come out of the
    verify forward's own pass over the unembedding); one `.tolist()` brings them to the host, where the accepted
    prefix is counted on integers and the next drafts are read off the last accepted position's row. The cache
    is cropped by its lengths (checked on the host, no sync).
    """
    P = prompt_ids.shape[1]
    device = prompt_ids.device
    end, limit, eos = P + max_new_tokens, model.trunk.max_seq_len, model.eos_id
    state = model.start_decoding(1, device) if state is None else state
    tokens = prompt_ids[0].tolist()
    drafter = chain(tokens)
    rows, accepted = drafter.forward(prompt_ids, state, last=True).tolist(), 0
    tokens.append(rows[0][0])
    done = tokens[-1] == eos
    steps = 0
    while len(tokens) < end and not done:
        depth = min(end - len(tokens) - 1, limit - len(tokens))  # drafts that fit the budget and the cache
        drafts = drafter.drafts(rows, accepted, depth) if depth > 0 else []
        rows = drafter.forward(torch.tensor([tokens[-1:] + drafts], device=device), state).tolist()  # one sync
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == rows[accepted][0]:
            accepted += 1
        new = drafts[:accepted] + rows[accepted][:1]
        tokens += new
        done = eos is not None and eos in new
        state.crop(len(tokens) - 1)  # the cache holds every token but the next certain one
        steps += 1
    generated = tokens[P:end]
    if eos is not None and eos in generated:  # finished at eos: eos from then on, as plain decoding writes
        first = generated.index(eos)
        generated = generated[:first] + [eos] * (max_new_tokens - first)
    ids = torch.tensor([tokens[:P] + generated], dtype=prompt_ids.dtype, device=device)
    return ids, {"steps": steps, "tokens": max_new_tokens}


def _accept(drafts, q, logits, temperature, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many leading drafts are accepted, and the index of the first rejected one (k if none).
    logits [B, k, V] are the model's at the positions that predict the drafts."""
    k = drafts.shape[1]
    if k == 0:
        zero = torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
        return zero, zero
    if temperature <= 0:
        ok = drafts == greedy_token(logits)
    else:
        p = token_probs(logits, temperature, top_k).gather(-1, drafts[..., None])[..., 0]
        q_d = q.gather(-1, drafts[..., None])[..., 0] if q is not None else torch.ones_like(p)
        ok = torch.rand_like(p) * q_d < p  # accept with probability min(1, p / q)
    accepted = ok.long().cumprod(1).sum(1)
    return accepted, accepted  # the first rejection sits right after the accepted prefix


def _next_certain_token(logits, at, q, drafts, reject_at, temperature, top_k) -> torch.Tensor:
    """The token after each row's kept prefix (`at` [B, 1]): greedy argmax; or a sample from p, or from the
    residual max(0, p - q) where the draft at this position was rejected."""
    row_logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))[:, 0]
    if temperature <= 0:
        return greedy_token(row_logits)
    p = token_probs(row_logits, temperature, top_k)
    k = drafts.shape[1]
    if k:
        safe = at.clamp(max=k - 1)
        draft = drafts.gather(1, safe)[:, 0]
        q_row = (q.gather(1, safe[..., None].expand(-1, -1, q.shape[-1]))[:, 0] if q is not None
                 else torch.nn.functional.one_hot(draft, p.shape[-1]).to(p.dtype))
        residual = (p - q_row).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        use_residual = ((reject_at == at[:, 0]) & (at[:, 0] < k))[:, None] & (mass > 1e-12)
        p = torch.where(use_residual, residual / mass.clamp(min=1e-12), p)
    return torch.multinomial(p, 1)[:, 0]
