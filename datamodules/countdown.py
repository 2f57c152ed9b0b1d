"""Countdown: reach a target number from a few given numbers with the four arithmetic operations.

The game of the Stream of Search work (Gandhi et al. 2024, "Stream of Search (SoS): Learning to Search in
Language", arXiv:2404.03683) and of the planning comparisons of Ye et al. 2024 ("Beyond Autoregression: Discrete
Diffusion for Complex Reasoning and Planning", arXiv:2410.14157), where a tiny masked-diffusion model solves
91.5% of Countdown-3 beside 45.8% for autoregression.

Rules: every given number is used exactly once; a step takes two numbers of the pool and writes one result that
replaces them; results are non-negative integers no larger than `max_value` (subtraction keeps the larger number
first, division only where exact, never by zero); after ``n - 1`` steps the pool holds the target alone.

Text (word-level, each number one token)::

    question:  12 7 3 -> 33
    steps:     7 * 3 = 21 <step> 12 + 21 = 33 <step>   (one ``a op b = c`` per step)
    answer:    <ans> 33

A problem has several distinct valid solutions (at least `min_solutions`); the shown steps are one of them, drawn
at random. Two solutions are the same when they write the same steps, in any order: ``a + b`` and ``b + a`` are
one step, and Countdown-4's two independent first steps written the other way round are one solution; solutions
through different intermediate results (``(6 + 4) + 2`` and ``(6 + 2) + 4``) are distinct. Answer scoring
(`check`) evaluates a generated solution against the question, so any valid solution counts, not only the shown
one.

Sizes: numbers are drawn from ``1..max_number`` and every result, the target included, is at most `max_value`
(each value is one token). Small settings have few distinct problems, and the val and test sets are drawn from
them: Countdown-3 with max_number 9 and max_value 30 has 922 problems with two distinct solutions, Countdown-4
10,021; the defaults 20 and 100 give 7,820 and about 260,000.

Where this departs from Ye et al. 2024, whose Countdown sets follow Stream of Search (Gandhi et al. 2024,
`src/countdown_generate.py` of kanishkg/stream-of-search): there the target is drawn first, uniformly from
10..100 (a tenth of the targets held out for a second test set), the numbers uniformly from 1..99 until some
solution exists, intermediate results are not bounded, any solvable problem counts (no `min_solutions`), and a
solution is written character by character.
Here the numbers come first and random play gives the target (small targets are more frequent, 0 is possible),
results are bounded by `max_value` so that every number is one word of the vocabulary, problems with fewer than
`min_solutions` distinct solutions are redrawn, and val/test problems are held out by their numbers and target,
not by target value.
"""
from __future__ import annotations

import random
from collections import Counter
from itertools import combinations

from datamodules.tasks import ANS, EOS, STEP, Example

OPS = ("+", "-", "*", "/")
ARROW = "->"


def apply(op: str, a: int, b: int, max_value: int) -> int | None:
    """The result of ``a op b`` under the game's rules, or None where the step is not allowed."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            return None
        c = a // b
    else:
        return None
    return c if 0 <= c <= max_value else None


def solutions(numbers: list[int], target: int, max_value: int) -> list[tuple[tuple[int, str, int, int], ...]]:
    """Every valid solution (a tuple of steps ``(a, op, b, c)``), by exhaustive search over pairs and operations.
    Steps on the same pair in the other order are one step (``a + b`` and ``b + a`` count once)."""
    found: list[tuple] = []

    def search(pool: list[int], steps: tuple):
        if len(pool) == 1:
            if pool[0] == target:
                found.append(steps)
            return
        for i, j in combinations(range(len(pool)), 2):
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            x, y = pool[i], pool[j]
            a, b = max(x, y), min(x, y)
            for op in OPS:
                for p, q in {(a, b), (b, a)} if op in "-/" else {(a, b)}:
                    c = apply(op, p, q, max_value)
                    if c is not None:
                        search(rest + [c], steps + ((p, op, q, c),))

    search(list(numbers), ())
    return sorted(set(found))


def distinct_solutions(numbers: list[int], target: int, max_value: int) -> set[tuple]:
    """The distinct valid solutions: each solution's steps as a sorted tuple, so that the same steps written in
    another order are one solution (the module's docstring says why)."""
    return {tuple(sorted(steps)) for steps in solutions(numbers, target, max_value)}


def check(question: list[str], generated: list[str], max_value: int = 10**9) -> bool:
    """Whether `generated` (the tokens after the question, up to an optional ``<eos>``) is a valid solution of
    `question` (``n1 ... nk -> target``): steps ``a op b = c`` separated by ``<step>``, each on two numbers of the
    pool with the right result, every number used, then ``<ans> target``."""
    if ARROW not in question:
        return False
    try:
        pool = Counter(int(t) for t in question[: question.index(ARROW)])
        target = int(question[question.index(ARROW) + 1])
    except (ValueError, IndexError):
        return False
    if EOS in generated:
        generated = generated[: generated.index(EOS)]
    if generated.count(ANS) != 1:
        return False
    cut = generated.index(ANS)
    body, answer = generated[:cut], generated[cut + 1 :]
    if answer != [str(target)]:
        return False
    if body and body[-1] == STEP:
        body = body[:-1]
    steps: list[list[str]] = [[]]
    for t in body:
        if t == STEP:
            steps.append([])
        else:
            steps[-1].append(t)
    if steps == [[]]:
        steps = []
    for s in steps:
        if len(s) != 5 or s[1] not in OPS or s[3] != "=":
            return False
        try:
            a, b, c = int(s[0]), int(s[2]), int(s[4])
        except ValueError:
            return False
        pool[a] -= 1
        pool[b] -= 1
        if pool[a] < 0 or pool[b] < 0 or apply(s[1], a, b, max_value) != c:
            return False
        pool[c] += 1
    return +pool == Counter([target])


class CountdownTask:
    """A generator of Countdown problems for `ReasoningDataModule(task="countdown")`.

    Args:
        num_numbers: how many numbers are given (Countdown-3: 3); a solution has ``num_numbers - 1`` steps.
        max_number: the given numbers are drawn uniformly from ``1..max_number``.
        max_value: the largest allowed result of a step (and target); every number ``0..max_value`` is a token.
        min_solutions: problems with fewer distinct valid solutions (`distinct_solutions`) are redrawn (2: every
            problem has several).
    """

    name = "countdown"

    def __init__(self, num_numbers: int = 3, max_number: int = 20, max_value: int = 100, min_solutions: int = 2):
        if num_numbers < 2 or max_number < 1 or max_value < max_number or min_solutions < 1:
            raise ValueError(
                f"countdown needs num_numbers >= 2, 1 <= max_number <= max_value and min_solutions >= 1; got "
                f"num_numbers={num_numbers}, max_number={max_number}, max_value={max_value}, "
                f"min_solutions={min_solutions}"
            )
        if num_numbers > 5:
            raise ValueError(f"countdown: num_numbers={num_numbers} makes the exhaustive solution count too slow; "
                             f"use at most 5")
        self.n, self.max_number, self.max_value, self.min_solutions = num_numbers, max_number, max_value, min_solutions

    def vocab(self) -> list[str]:
        return [str(i) for i in range(self.max_value + 1)] + list(OPS) + ["=", ARROW]

    def max_len(self) -> int:
        q, steps, a = self.n + 2, [5] * (self.n - 1), 1
        return q + sum(s + 1 for s in steps) + a + 2

    def check(self, question: list[str], generated: list[str]) -> bool:
        return check(question, generated, self.max_value)

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        for _ in range(10_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n)]
            pool, steps = list(numbers), []
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                c = op = None
                for op in rng.sample(OPS, len(OPS)):
                    c = apply(op, pool[i], pool[j], self.max_value)
                    if c is not None:
                        break
                if c is None:
                    break
                steps.append([str(pool[i]), op, str(pool[j]), "=", str(c)])
                pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [c]
            if len(pool) > 1:
                continue
            target = pool[0]
            if len(distinct_solutions(numbers, target, self.max_value)) < self.min_solutions:
                continue
            question = [str(v) for v in numbers] + [ARROW, str(target)]
            key = "cd:" + ",".join(map(str, sorted(numbers))) + f"->{target}"
            return Example(question, steps, [str(target)], key)
        raise RuntimeError("countdown: could not draw a problem with enough solutions; lower min_solutions")
