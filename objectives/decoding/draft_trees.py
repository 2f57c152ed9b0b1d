"""Tree drafts for speculative decoding (`objectives/decoding/speculative.py` runs the loop).

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
"""
from __future__ import annotations

import itertools

import torch

from objectives.decoding.greedy import greedy_token, token_probs


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


def at_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, m, ...] at one position per row (index [B])."""
    return x.gather(1, index.view(-1, 1, *[1] * (x.dim() - 2)).expand(-1, 1, *x.shape[2:]))[:, 0]


def verify_tree(model, state, tree: DraftTree, next_token, ranked, temperature, top_k, cached, longest: int):
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
        prediction = greedy_token(logits)  # [B, N]: one argmax per node
        match = nodes == prediction.gather(1, parent.clamp(min=0).expand(B, -1))
        match[:, 0] = True
        on_path = (ancestor[None] & ~match[:, None, :]).sum(-1) == 0  # [B, N]: every node up to the root matched
        best = (on_path * ((depth + 1) * N - torch.arange(N, device=device))).argmax(1)  # the deepest, first
        new_token = prediction.gather(1, best[:, None])[:, 0]
    else:
        best, new_token = sample_tree(tree, nodes, logits, temperature, top_k)
    path = tree.at_depth.to(device)[best]  # [B, max_depth + 1], padded with best
    return depth[best], new_token, path, nodes.gather(1, path[:, 1:]), features


def sample_tree(tree: DraftTree, nodes, logits, temperature, top_k):
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


def compact_to_path(state, cached: torch.Tensor, path: torch.Tensor) -> None:
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
