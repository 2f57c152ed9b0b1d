"""ProsQA-style questions: proof search over a random DAG of made-up concepts, after Coconut (Hao et al. 2024,
"Training Large Language Models to Reason in a Continuous Latent Space", arXiv:2412.06769, Appendix A.2 and
Algorithm 1; the public set is facebookresearch/coconut's data/prosqa_*.json).

Construction (Algorithm 1). Nodes are added one at a time. Nodes 0 and 1 start the two families and carry the
labels 1 and 2 (bit j = "descends from node j"). Every further node `idx` draws ``n ~ Poisson(1.5)`` in-nodes
from a candidate set chosen by a uniform draw r:

    r <= 0.35: groups[0] + groups[1]    (nodes that descend from node 0 only, or from neither)
    r <= 0.70: groups[0] + groups[2]    (from node 1 only, or from neither)
    else:      every node so far

sampled without replacement with weight ``1 + 1.5 * depth(c)`` (depth = longest distance from a parentless
node); its label is the OR of its in-nodes' labels, and each in-node u gives the edge u -> idx, the fact
"u is a idx". Then parentless nodes get entity names (several per question: nodes 0 and 1 and any node that
drew no in-node) and the others concept names. The question's entity is node 0 or 1; the true target is a
leaf that descends from it alone, the false target a leaf that descends from the other root alone, so exactly
one is reachable. The steps are the facts along a shortest path entity -> target; the number of steps (3 to 6)
is drawn first from the public test set's shares and graphs are drawn until one has a target at that distance
(`GRAPH_TRIES`). The two candidates are written in random order.

Text (word-level, punctuation as its own token, as the datamodule's whitespace tokenizer splits the public
files): facts "Every X is a Y ." (or "Tom is a Y ." for an entity), shuffled, then "Is Tom a A or B ?";
steps "Tom is a X .", "Every X is a Y .", ...; answer "Tom is a A .".

ProsQA-mini (`configs/data/prosqa_mini.yaml`): the same construction with options that make the task learnable
in minutes on a CPU: a range of graph sizes (`nodes`), the shares of 1-, 2- and 3-step questions in training
(`step_shares`) and the test split's step count (`test_steps`), a smaller pool of concept names (`concepts`), and
a compact syntax: facts "X Y ." ("every X is a Y"), the question "? Tom A B", steps "Tom X .", "X Y .", the
answer "Tom A .": about 30-token questions at 6-9 nodes, against the public set's 209. The DAG keeps its branching and an
entity's several parents, so a first step can still lead into a dead end.

Deviations: a draw of zero in-nodes is kept only with probability 0.1 and otherwise redrawn, which gives the
public set's in-degrees (2.8% parentless non-root nodes, 2.6 entities per question; a plain Poisson(1.5) would
leave 22% of the nodes parentless); the number of nodes of a graph is drawn uniformly from [0.6 n, 1.2 n] for
the configured mean size n (the public test set spans 14..28 nodes around its mean of 22.8); the target is drawn
uniformly among the reachable leaves at the drawn distance; shortest paths are found by breadth-first search in a
shuffled order.
"""
from __future__ import annotations

import random
from collections import deque

from datamodules.tasks import CONCEPTS, ENTITIES, Example, poisson, weighted_sample

STEP_SHARES = {3: 0.40, 4: 0.43, 5: 0.14, 6: 0.03}  # the public test set's: 202, 217, 69, 12 of 500
MIN_NODES = 18  # smaller graphs seldom hold a 6-step question
# Graphs drawn for one question before giving up. The rarest case, a 6-step question at MIN_NODES, is found in
# 0.31% of graphs (93 of 30,000 measured; 0.9% at 23 nodes), so 20,000 tries fail with probability
# (1 - 0.0031)^20000 < 1e-26 per question, where 1,000 tries failed for 4.5% of such questions (1 in 8,000 at
# 23 nodes); a hopeless draw costs about a second.
GRAPH_TRIES = 20_000
KEEP_PARENTLESS = 0.1  # a draw of 0 in-nodes is kept with this probability (else redrawn)


def concepts_of(parents: list[list[int]]) -> list[int]:
    return [v for v, ps in enumerate(parents) if ps]


class ProsQAGraphTask:
    """A generator of ProsQA-style examples for `ReasoningDataModule(task="prosqa_alg1")`.

    Args:
        num_nodes: mean number of graph nodes (entities and concepts); 23 is the public set's mean (22.8). Graphs
            have 0.6 to 1.2 times as many nodes.
        max_len: questions whose full training sequence is longer are redrawn.
        nodes: (lo, hi), the range of graph sizes instead of num_nodes's.
        step_shares: {steps: share} of the training and val questions (default: the public test set's 3-6).
        test_steps: the test split's questions all have this many steps (default: drawn as in training).
        concepts: how many concept names a graph's concepts are named from (default: all 220).
        syntax: "words" (the public set's sentences) or "compact" (facts "X Y .", about a third of the tokens).
    """

    name = "prosqa_alg1"

    def __init__(self, num_nodes: int = 23, max_len: int = 384, nodes: tuple[int, int] | None = None,
                 step_shares: dict[int, float] | None = None, test_steps: int | None = None,
                 concepts: int | None = None, syntax: str = "words"):
        self.step_shares = {int(k): float(v) for k, v in (step_shares or STEP_SHARES).items()}
        self.test_steps, self.syntax = test_steps, syntax
        self.concepts = CONCEPTS[: len(CONCEPTS) if concepts is None else concepts]
        if syntax not in ("words", "compact"):
            raise ValueError(f"prosqa_alg1: syntax={syntax!r}: use 'words' or 'compact'")
        if min(self.step_shares) < 1 or min(self.step_shares.values()) < 0 or not sum(self.step_shares.values()):
            raise ValueError(f"prosqa_alg1: step_shares={step_shares}: give {{steps >= 1: share >= 0}} with a "
                             f"positive total")
        if test_steps is not None and test_steps < 1:
            raise ValueError(f"prosqa_alg1: test_steps={test_steps} must be at least 1")
        if nodes is None:
            if not MIN_NODES <= num_nodes <= len(CONCEPTS) / 1.2:
                raise ValueError(f"prosqa_alg1: num_nodes={num_nodes} is out of range: graphs of fewer than about "
                                 f"{MIN_NODES} nodes seldom hold a {max(STEP_SHARES)}-step question, and there are "
                                 f"{len(CONCEPTS)} concept names; use {MIN_NODES} <= num_nodes <= "
                                 f"{int(len(CONCEPTS) / 1.2)}, or give the range of sizes as nodes=[lo, hi]")
            nodes = (round(0.6 * num_nodes), round(1.2 * num_nodes))
        lo, hi = nodes
        deepest = max(max(self.step_shares), test_steps or 0)
        if not deepest + 2 <= lo <= hi <= len(self.concepts) + len(ENTITIES):
            raise ValueError(f"prosqa_alg1: nodes=[{lo}, {hi}] must hold a {deepest}-step question (at least "
                             f"{deepest + 2} nodes) and be named from {len(self.concepts)} concepts and "
                             f"{len(ENTITIES)} entities: use {deepest + 2} <= lo <= hi, or more concepts")
        self.sizes, self.limit = (lo, hi), max_len

    def vocab(self) -> list[str]:
        words = ["Every", "is", "a", "Is", "or"] if self.syntax == "words" else []
        return self.concepts + ENTITIES + words + [".", "?"]

    def max_len(self) -> int:
        return self.limit

    @staticmethod
    def graph(rng: random.Random, n: int) -> tuple[list[list[int]], list[int]]:
        """Algorithm 1: in-nodes of every node and the labels (bit j: descends from node j)."""
        parents: list[list[int]] = [[], []]
        labels, depth = [1, 2], [0, 0]
        groups: dict[int, list[int]] = {0: [], 1: [0], 2: [1], 3: []}
        for idx in range(2, n):
            k = poisson(rng, 1.5)
            while k == 0 and rng.random() >= KEEP_PARENTLESS:
                k = poisson(rng, 1.5)
            r = rng.random()
            candidates = groups[0] + groups[1] if r <= 0.35 else groups[0] + groups[2] if r <= 0.7 else list(range(idx))
            chosen = weighted_sample(rng, candidates, [1 + 1.5 * depth[c] for c in candidates], k)
            label = 0
            for p in chosen:
                label |= labels[p]
            parents.append(chosen)
            labels.append(label)
            depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
            groups[label].append(idx)
        return parents, labels

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        if split == "test" and self.test_steps is not None:
            wanted = self.test_steps
        else:
            wanted = rng.choices(list(self.step_shares), weights=list(self.step_shares.values()))[0]
        for _ in range(GRAPH_TRIES):
            n = rng.randint(*self.sizes)
            parents, labels = self.graph(rng, n)
            children: list[list[int]] = [[] for _ in range(n)]
            for v, ps in enumerate(parents):
                for u in ps:
                    children[u].append(v)
            root = rng.randrange(2)
            prev, frontier = {root: -1}, deque([root])  # breadth-first search in a shuffled order
            while frontier:
                u = frontier.popleft()
                for v in rng.sample(children[u], len(children[u])):
                    if v not in prev:
                        prev[v] = u
                        frontier.append(v)

            def steps_to(v: int) -> int:
                k = 0
                while prev[v] != -1:
                    v, k = prev[v], k + 1
                return k

            leaves = [v for v in range(2, n) if not children[v]]
            targets = [v for v in leaves if labels[v] == 1 << root and steps_to(v) == wanted]
            negatives = [v for v in leaves if labels[v] == 2 >> root]
            if (targets and negatives and n - len(concepts_of(parents)) <= len(ENTITIES)
                    and len(concepts_of(parents)) <= len(self.concepts)):
                break
        else:  # pragma: no cover - less likely than 1e-26 per question (GRAPH_TRIES)
            raise RuntimeError(f"prosqa_alg1: could not draw a graph of {self.sizes[0]}..{self.sizes[1]} nodes with "
                               f"a {wanted}-step question in {GRAPH_TRIES} tries: use a larger "
                               f"data.init_args.num_nodes")
        target, negative = rng.choice(targets), rng.choice(negatives)
        entity = [v for v in range(n) if not parents[v]]
        names = dict(zip(entity, rng.sample(ENTITIES, len(entity))))
        concepts = concepts_of(parents)
        names.update(zip(concepts, rng.sample(self.concepts, len(concepts))))
        compact = self.syntax == "compact"

        def fact(u: int, v: int) -> list[str]:
            if compact:
                return [names[u], names[v], "."]
            return ([names[u]] if not parents[u] else ["Every", names[u]]) + ["is", "a", names[v], "."]

        facts = [fact(u, v) for v in range(n) for u in parents[v]]
        rng.shuffle(facts)
        options = [names[target], names[negative]]
        rng.shuffle(options)
        ask = (["?", names[root], *options] if compact
               else ["Is", names[root], "a", options[0], "or", options[1], "?"])
        path = [target]
        while prev[path[-1]] != -1:
            path.append(prev[path[-1]])
        path.reverse()
        steps = [fact(u, v) for u, v in zip(path, path[1:])]
        key = "pq2:" + "|".join(sorted(" ".join(f) for f in facts)) + "|" + " ".join(ask)
        answer = [names[root], names[target], "."] if compact else [names[root], "is", "a", names[target], "."]
        return Example([t for f in facts for t in f] + ask, steps, answer, key)
