"""Speculative (draft-then-verify) decoding shared by every left-to-right objective.

A drafter proposes tokens, one cached forward of the model scores them all, the longest prefix the model agrees
with is kept plus one token of the model's own, and the cache is cropped back to it.

Greedy (temperature 0): a draft is kept when it equals the model's own argmax, so the output is token for token
plain greedy decoding. Sampling, chain drafts: speculative sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023): accept draft d with probability
min(1, p(d) / q(d)); on rejection resample from normalize(max(0, p - q)), so the output has the distribution of
plain sampling.

Tree drafts (Medusa, Cai et al. 2024, section 2.1.2; SpecInfer, Miao et al. 2024): depth d of the tree holds the
drafter's top-`widths[d]` candidates for the d-th token ahead, under every node of depth d-1 (or an explicit list
of paths, Medusa's sparse trees). All nodes are verified in one forward: node i sits at position L + depth(i) and
attends to the cached prefix and to its own ancestors (an explicit tree attention mask). The deepest accepted
node's path is kept and its keys and values are moved to the positions L, L+1, ... (the cache is compacted to the
path). Greedy: a child is accepted when it is its parent's argmax. Sampling stays exact with deterministic
candidates by recursive rejection (SpecInfer, Algorithm 2, with one-hot drafts): at a node with residual r
(initially p), candidate c is accepted with probability r(c) / sum(r); on rejection r(c) is set to 0 and the
next sibling is tried; when every child is rejected the next token is drawn from r / sum(r). A sibling's token
is thus accepted with exactly its probability under p.

Rows of a batch keep their own accepted length (each row's cache is cropped to its own end; the trunk's per-row
lengths and positions place the next drafts). A drafter whose state advances for the whole batch at once (a
DeepSeek MTP module chain) sets `per_row = False` on its state; the batch then keeps the shortest accepted prefix,
which changes no output.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from objectives.decoding.greedy import sample_token, token_probs


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


class DraftTree:
    """The shape of a tree of drafts: node 0 is the next certain token; every other node is a path of ranks
    (path (0, 2) = the top candidate one token ahead, then the third candidate two tokens ahead).

    `DraftTree.from_widths([4, 2, 1])` is the product tree (4 + 8 + 8 drafts); `DraftTree(paths)` takes a sparse
    tree as a list of rank paths (every prefix of a path must be in the list too).
    """

    def __init__(self, paths: list[tuple[int, ...]]):
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        missing = [p for p in paths if p[:-1] and p[:-1] not in paths]
        if missing:
            raise ValueError(f"every path of a draft tree needs its prefixes in the tree: {missing[:3]} lack theirs")
        self.paths = [()] + paths
        index = {p: i for i, p in enumerate(self.paths)}
        self.parent = torch.tensor([-1] + [index[p[:-1]] for p in paths])
        self.depth = torch.tensor([len(p) for p in self.paths])
        self.rank = torch.tensor([0] + [p[-1] for p in paths])
        n, self.max_depth = len(self.paths), int(self.depth.max())  # a tree cut to depth 0 is its root alone
        self.width = int(self.rank.max()) + 1
        # ancestor[i, j]: node j is node i or one of its ancestors; at_depth[i, d]: i's ancestor at depth d
        self.ancestor = torch.zeros(n, n, dtype=torch.bool)
        self.at_depth = torch.zeros(n, self.max_depth + 1, dtype=torch.long)
        for i, p in enumerate(self.paths):
            for d in range(len(p) + 1):
                self.ancestor[i, index[p[:d]]] = True
                self.at_depth[i, d] = index[p[:d]]
            self.at_depth[i, len(p) + 1 :] = i
        self.children = [[j for j in range(n) if int(self.parent[j]) == i] for i in range(n)]

    @classmethod
    def from_widths(cls, widths: list[int]) -> "DraftTree":
        if not widths or min(widths) < 1:
            raise ValueError(f"tree widths {widths} must be one positive width per depth")
        paths = [p for d in range(1, len(widths) + 1) for p in itertools.product(*(range(w) for w in widths[:d]))]
        return cls(paths)

    def truncated(self, depth: int) -> "DraftTree":
        return self if depth >= self.max_depth else DraftTree([p for p in self.paths[1:] if len(p) <= depth])

    @property
    def is_chain(self) -> bool:
        return self.width == 1


def as_tree(tree) -> DraftTree | None:
    """None, a DraftTree, widths per depth [4, 2, 1], or a list of rank paths [[0], [1], [0, 0]]."""
    if tree is None or isinstance(tree, DraftTree):
        return tree
    tree = list(tree)
    if all(isinstance(w, int) for w in tree):
        return DraftTree.from_widths(tree)
    return DraftTree([tuple(p) for p in tree])


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, m, ...] at one position per row (index [B])."""
    return x.gather(1, index.view(-1, 1, *[1] * (x.dim() - 2)).expand(-1, 1, *x.shape[2:]))[:, 0]


@torch.no_grad()
def speculative_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, propose: Proposer,
                         temperature: float = 0.0, top_k: int | None = None, tree=None,
                         prompt_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Decode with drafts: prompt [B, P] (rows right-padded to `prompt_lengths`) -> (ids [B, max(P, longest
    prompt + max_new_tokens)], row b's prompt, then its max_new_tokens new tokens, then padding, the layout of
    `objectives.decoding.greedy.left_to_right`; {"steps", "tokens"}: verify forwards and new tokens per row).

    The loop is lean: tokens are written into a preallocated output (the drafter reads a view of it; a copy only
    for ragged rows and a drafter that reads tokens), the model runs one argmax per verified position, the causal
    chain case passes no mask, and a step makes one host sync (the accepted lengths, which the cache crop and
    the loop's end need).
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

    state = model.start_decoding(B, device)
    per_row = getattr(state, "per_row", True)
    if ragged and not per_row:
        raise ValueError(f"{type(model).__name__}'s drafter advances the whole batch at once: decode prompts of "
                         f"different lengths one length at a time")
    options = {"padding_mask": arange[:P] < lengths[:, None]} if ragged else {}
    logits, features = model.decode_forward(prompt_ids, state, **options)
    if hasattr(state, "accept"):
        state.accept(features)
    next_token = sample_token(_at(logits, lengths - 1), temperature, top_k)
    features = _at(features, lengths - 1)
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
                prediction = logits.argmax(-1)  # one argmax per position
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
            accepted, new_token, path_nodes, path_tokens, step_features = _verify_tree(
                model, state, shape, next_token, ranked, temperature, top_k, cached, max(host_n) - 1)
        steps += 1
        # each row keeps its own accepted drafts, at most up to its final length (a whole-batch drafter: the
        # shortest); where that cuts an accepted path, the next token is the path's own
        cap = torch.tensor([max(e - x - 1, 0) for e, x in zip(end, host_n)], device=device)
        final = torch.minimum(accepted, cap)
        if not per_row:
            final = final[torch.tensor(active, device=device)].min().expand(B)
        if path_tokens.shape[1]:
            cut = _at(path_tokens[..., None], final.clamp(max=path_tokens.shape[1] - 1))[:, 0]
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
            _compact(state, cached, path_nodes)
        host = torch.cat([grow, is_eos.any(1).long() if model.eos_id is not None else grow[:0]]).tolist()  # one sync
        grow_host = host[:B]
        if model.eos_id is not None:
            done = [d or bool(e) for d, e in zip(done, host[B:])]
        new_cached = [x - 1 + g for x, g in zip(host_n, grow_host)]
        state.crop(new_cached[0] if len(set(new_cached)) == 1 else cached + grow)
        if hasattr(state, "accept"):
            state.accept(step_features.gather(1, path_nodes[:, : max(grow_host)].view(
                B, -1, *[1] * (step_features.dim() - 2)).expand(-1, -1, *step_features.shape[2:])))
        features = _at(step_features, path_nodes.gather(1, final[:, None])[:, 0])
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


def _accept(drafts, q, logits, temperature, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many leading drafts are accepted, and the index of the first rejected one (k if none).
    logits [B, k, V] are the model's at the positions that predict the drafts."""
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


def _next_certain_token(logits, at, q, drafts, reject_at, temperature, top_k) -> torch.Tensor:
    """The token after each row's kept prefix (`at` [B, 1]): greedy argmax; or a sample from p, or from the
    residual max(0, p - q) where the draft at this position was rejected."""
    row_logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))[:, 0]
    if temperature <= 0:
        return row_logits.argmax(-1)
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


def _verify_tree(model, state, tree: DraftTree, next_token, ranked, temperature, top_k, cached, longest: int):
    """One forward over every node of the tree (ranked candidates [B, depth, width]; each row's prefix is its
    first `cached` positions, `longest` at most). Returns the accepted depth [B], the next certain token [B], the accepted path's
    node indices [B, depth + 1] and tokens [B, depth] (padded past the accepted depth), and the features of
    every node."""
    B, device = next_token.shape[0], next_token.device
    depth, rank, parent = tree.depth.to(device), tree.rank.to(device), tree.parent.to(device)
    ancestor = tree.ancestor.to(device)
    N = depth.numel()
    nodes = torch.cat([next_token[:, None], ranked[:, depth[1:] - 1, rank[1:]]], 1)  # [B, N]
    S = longest + N
    offset = torch.arange(S, device=device)[None, :] - cached[:, None]  # [B, S]: a key's node index in the tree
    tree_part = ancestor[:, offset.clamp(0, N - 1)].transpose(0, 1)  # [B, N, S]
    mask = (offset < 0)[:, None, :] | ((offset < N)[:, None, :] & tree_part)
    logits, features = model.decode_forward(nodes, state, mask=mask[:, None], positions=cached[:, None] + depth)
    if temperature <= 0:
        prediction = logits.argmax(-1)  # [B, N]: one argmax per node
        match = nodes == prediction.gather(1, parent.clamp(min=0).expand(B, -1))
        match[:, 0] = True
        on_path = (ancestor[None] & ~match[:, None, :]).sum(-1) == 0  # [B, N]: every node up to the root matched
        best = (on_path * ((depth + 1) * N - torch.arange(N, device=device))).argmax(1)  # the deepest, first
        new_token = prediction.gather(1, best[:, None])[:, 0]
    else:
        best, new_token = _sample_tree(tree, nodes, logits, temperature, top_k)
    path = tree.at_depth.to(device)[best]  # [B, max_depth + 1], padded with best
    return depth[best], new_token, path, nodes.gather(1, path[:, 1:]), features


def _sample_tree(tree: DraftTree, nodes, logits, temperature, top_k):
    """Recursive rejection over deterministic candidates, row by row (see the module docstring)."""
    p_all = token_probs(logits, temperature, top_k)
    best, new = [], []
    for b in range(nodes.shape[0]):
        node = 0
        while True:
            residual = p_all[b, node].clone()
            moved = False
            for child in tree.children[node]:
                token = int(nodes[b, child])
                mass = residual.sum()
                if mass > 0 and torch.rand(()) * mass < residual[token]:
                    node, moved = child, True
                    break
                residual[token] = 0
            if not moved:
                best.append(node)
                new.append(int(torch.multinomial(residual / residual.sum(), 1)))
                break
    device = nodes.device
    return torch.tensor(best, device=device), torch.tensor(new, device=device, dtype=nodes.dtype)


def _compact(state, cached: torch.Tensor, path: torch.Tensor) -> None:
    """Move each row's keys and values of the path's nodes (block positions cached + path) to positions cached,
    cached + 1, ... of every attention cache in the state (the caller crops the rest)."""
    for layer in state:
        if not (hasattr(layer, "k") and hasattr(layer, "v")):
            raise ValueError(f"tree drafts compact key-value caches; {type(layer).__name__} has none: "
                             f"decode this trunk with chain drafts (no tree)")
        source = (cached[:, None] + path)[:, None, :, None].expand(-1, layer.k.shape[1], -1, layer.k.shape[3])
        target = (cached[:, None] + torch.arange(path.shape[1], device=path.device))[:, None, :, None].expand_as(source)
        for name in ("k", "v"):
            buffer = getattr(layer, name)
            buffer.scatter_(2, target, buffer.gather(2, source))


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
