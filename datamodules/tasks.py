"""The generated reasoning tasks and what every task shares: the special tokens of the word-level vocabularies,
`Example` (a question, its reasoning steps and its answer, as token lists), and the generators of path-star
graphs, ProsQA-style questions (one entity) and k-digit multiplication. ProsQA's Algorithm 1
(`datamodules/prosqa.py`) and Countdown (`datamodules/countdown.py`) are generators of their own files;
`datamodules/reasoning.py` turns any of them into a Lightning datamodule. Their sources and equations are in
`datamodules/reasoning.py`'s module docstring."""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Sequence

PAD, EOS, UNK, STEP, ANS, DUMMY = "<pad>", "<eos>", "<unk>", "<step>", "<ans>", "<dummy>"
SPECIALS = (PAD, EOS, UNK, STEP, ANS, DUMMY)  # ids 0..5 in every word-level vocabulary


# ----------------------------------------------------------------------------------------------------------
# Examples and tasks
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One problem: token lists for the question, each reasoning step and the answer.

    `key` identifies the problem up to presentation (e.g. the edge order of a path-star graph); held-out sets
    are kept disjoint from training by a hash of it.
    """

    question: list[str]
    steps: list[list[str]]
    answer: list[str]
    key: str = ""

    def __post_init__(self):
        if not self.key:
            self.key = " ".join(self.question)

    def to_record(self) -> dict:
        """The ``{"question", "steps", "answer"}`` record, tokens joined by spaces."""
        return {
            "question": " ".join(self.question),
            "steps": [" ".join(s) for s in self.steps],
            "answer": " ".join(self.answer),
        }


def key_hash(key: str) -> bytes:
    return hashlib.sha1(key.encode("utf-8")).digest()[:12]


def example_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    # str seeds go through SHA-512 in random.Random: stable across runs and PYTHONHASHSEED
    return random.Random(f"{seed}/{split}/{index}/{attempt}")


def full_length(ex_lens: tuple[int, Sequence[int], int]) -> int:
    """Length of the cot sequence (question, steps with separators, <ans>, answer, <eos>)."""
    q, steps, a = ex_lens
    return q + sum(s + 1 for s in steps) + a + 2


class PathStarTask:
    """Path-star graphs G(d, l, N) of Bachmann & Nagarajan 2024, "The Pitfalls of Next-Token Prediction".

    A source with `degree` arms of `path_length` nodes each (source included: `path_length - 1` fresh nodes per
    arm), node labels drawn without replacement from `num_nodes` labels, edges ``u v`` shuffled and separated
    by ``|``, then ``/ source goal``. The answer is the path source -> goal; there are no steps.
    """

    name = "path_star"

    def __init__(self, degree: int = 2, path_length: int = 5, num_nodes: int = 50):
        if degree < 1 or path_length < 2:
            raise ValueError(f"path-star needs degree >= 1 and path_length >= 2, got {degree}, {path_length}")
        needed = 1 + degree * (path_length - 1)
        if num_nodes < needed:
            raise ValueError(
                f"path-star G({degree}, {path_length}, {num_nodes}) needs num_nodes >= {needed} distinct labels"
            )
        self.d, self.l, self.n = degree, path_length, num_nodes

    def vocab(self) -> list[str]:
        return [str(i) for i in range(self.n)] + ["|", "/"]

    def max_len(self) -> int:
        n_edges = self.d * (self.l - 1)
        return full_length((3 * n_edges - 1 + 3, [], self.l))

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        d, l = self.d, self.l
        labels = rng.sample(range(self.n), 1 + d * (l - 1))
        source = labels[0]
        arms = [labels[1 + a * (l - 1) : 1 + (a + 1) * (l - 1)] for a in range(d)]
        edges = []
        for arm in arms:
            prev = source
            for v in arm:
                edges.append((prev, v))
                prev = v
        rng.shuffle(edges)
        goal_arm = rng.randrange(d)
        goal = arms[goal_arm][-1]
        question: list[str] = []
        for j, (u, v) in enumerate(edges):
            if j:
                question.append("|")
            question += [str(u), str(v)]
        question += ["/", str(source), str(goal)]
        path = [source] + arms[goal_arm]
        key = "ps:" + ",".join(sorted(f"{u}>{v}" for u, v in edges)) + f"/{source}/{goal}"
        return Example(question, [], [str(v) for v in path], key)


def _concept_names() -> list[str]:
    onsets = ["b", "br", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "sh", "st", "t", "v",
              "w", "y", "z"]
    return [o + v + c for c in ("mpus", "rpus") for o in onsets for v in "aeiou"]


CONCEPTS = _concept_names()  # 220 made-up concept names (wumpus, yumpus, ... as in ProntoQA / ProsQA)
ENTITIES = ["Alex", "Bob", "Fae", "Gary", "Max", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren"]


def poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def weighted_sample(rng: random.Random, items: list[int], weights: list[float], n: int) -> list[int]:
    items, weights, out = list(items), list(weights), []
    for _ in range(min(n, len(items))):
        r, acc = rng.random() * sum(weights), 0.0
        for j, w in enumerate(weights):
            acc += w
            if r < acc:
                break
        out.append(items.pop(j))
        weights.pop(j)
    return out


class ProsQATask:
    """ProsQA-style questions after Coconut (Hao et al. 2024, arXiv:2412.06769), Appendix, Algorithm 1.

    Nodes 0 and 1 are the two candidate concepts (labels 1 and 2: "reaches concept 0" / "reaches concept 1",
    as bits). Each further node gets Poisson(1.5) parents, chosen among (with probability 0.35) the nodes
    reaching concept 0 or neither, (0.35) those reaching concept 1 or neither, (0.3) all nodes, by sampling
    without replacement with weight ``1 + 1.5 * depth`` (depth = longest distance to a parentless node), and
    its label is the OR of its parents' labels. An edge child -> parent is the fact "Every child is a parent .".
    The entity ("Tom") then gets max(1, Poisson(1.5)) parents among the non-concept nodes reaching only the
    target concept or neither (at least one reaching the target), so it reaches the target and not the other.
    Steps = the facts along a shortest path entity -> target; answer = "Tom is a target .".

    Deviations (Algorithm 1 is followed in spirit, not transcribed): the graph has a fixed `num_nodes` concept
    nodes, the entity is a separate final node, and graphs whose full sequence exceeds `max_len` tokens are
    redrawn.
    """

    name = "prosqa"

    def __init__(self, num_nodes: int = 23, max_len: int = 384):
        if not 3 <= num_nodes <= len(CONCEPTS):
            raise ValueError(f"prosqa num_nodes must be in [3, {len(CONCEPTS)}], got {num_nodes}")
        self.num_nodes, self.limit = num_nodes, max_len

    def vocab(self) -> list[str]:
        return CONCEPTS + ENTITIES + ["Every", "is", "a", "Is", "or", ".", "?"]

    def max_len(self) -> int:
        return self.limit

    def _graph(self, rng: random.Random):
        parents: list[list[int]] = [[], []]
        labels, depth = [1, 2], [0, 0]
        groups: dict[int, list[int]] = {0: [], 1: [0], 2: [1], 3: []}
        for idx in range(2, self.num_nodes):
            n = poisson(rng, 1.5)
            r = rng.random()
            if r <= 0.35:
                cand = groups[0] + groups[1]
            elif r <= 0.7:
                cand = groups[0] + groups[2]
            else:
                cand = list(range(idx))
            ps = weighted_sample(rng, cand, [1 + 1.5 * depth[c] for c in cand], n)
            label = 0
            for p in ps:
                label |= labels[p]
            parents.append(sorted(ps))
            labels.append(label)
            depth.append(1 + max(depth[p] for p in ps) if ps else 0)
            groups[label].append(idx)
        return parents, labels, depth, groups

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        for _ in range(1000):
            parents, labels, depth, groups = self._graph(rng)
            target = rng.randrange(2)  # concept node 0 or 1 is the answer
            good = [v for v in groups[1 << target] if v > 1]
            if not good:
                continue
            first = weighted_sample(rng, good, [1 + 1.5 * depth[c] for c in good], 1)
            rest = [v for v in groups[0] + good if v > 1 and v not in first]
            more = weighted_sample(rng, rest, [1 + 1.5 * depth[c] for c in rest], max(1, poisson(rng, 1.5)) - 1)
            entity_parents = sorted(first + more)
            break
        else:  # pragma: no cover - needs ~1000 consecutive degenerate graphs
            raise RuntimeError("prosqa: could not draw a graph with a reachable concept")
        names = rng.sample(CONCEPTS, self.num_nodes)
        entity = rng.choice(ENTITIES)
        facts = [["Every", names[c], "is", "a", names[p], "."] for c in range(self.num_nodes) for p in parents[c]]
        facts += [[entity, "is", "a", names[p], "."] for p in entity_parents]
        rng.shuffle(facts)
        options = [names[0], names[1]]
        rng.shuffle(options)
        ask = ["Is", entity, "a", options[0], "or", options[1], "?"]
        # shortest path by BFS (parents visited in index order), entity = node -1
        prev: dict[int, int] = {p: -1 for p in entity_parents}
        frontier = list(entity_parents)
        while target not in prev:
            nxt = []
            for v in frontier:
                for p in parents[v]:
                    if p not in prev:
                        prev[p] = v
                        nxt.append(p)
            frontier = nxt
        path = [target]
        while prev[path[-1]] != -1:
            path.append(prev[path[-1]])
        path.reverse()
        steps = [[entity, "is", "a", names[path[0]], "."]]
        steps += [["Every", names[u], "is", "a", names[v], "."] for u, v in zip(path, path[1:])]
        question = [t for f in facts for t in f] + ask
        key = "pq:" + "|".join(sorted(" ".join(f) for f in facts)) + "|" + " ".join(ask)
        return Example(question, steps, [entity, "is", "a", names[target], "."], key)


class MultiplicationTask:
    """k-digit by k-digit multiplication; the steps are the partial products a * b_i * 10**i (each written with
    k + 1 + i digits, zero padded), the answer the 2k-digit product, as in the implicit chain-of-thought work
    (Deng et al. 2023, arXiv:2311.01460; 2024, arXiv:2405.14838). With `reverse_digits` (their format) every
    number is written least-significant digit first. Operands are uniform over k-digit numbers."""

    name = "multiplication"

    def __init__(self, digits: int = 4, reverse_digits: bool = True):
        if digits < 1:
            raise ValueError(f"multiplication needs digits >= 1, got {digits}")
        self.k, self.reverse = digits, reverse_digits

    def vocab(self) -> list[str]:
        return [str(i) for i in range(10)] + ["*"]

    def max_len(self) -> int:
        k = self.k
        return full_length((2 * k + 1, [k + 1 + i for i in range(k)], 2 * k))

    def _digits(self, n: int, width: int) -> list[str]:
        s = list(str(n).zfill(width))
        return s[::-1] if self.reverse else s

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        k = self.k
        lo = 10 ** (k - 1) if k > 1 else 0
        a, b = rng.randint(lo, 10**k - 1), rng.randint(lo, 10**k - 1)
        steps = [self._digits(a * ((b // 10**i) % 10) * 10**i, k + 1 + i) for i in range(k)]
        question = self._digits(a, k) + ["*"] + self._digits(b, k)
        return Example(question, steps, self._digits(a * b, 2 * k), f"mul:{a}*{b}")
