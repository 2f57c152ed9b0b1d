"""Countdown's size options (max_number, max_value, min_solutions) hold on 2000 drawn problems, counted by a solver
written here; distinct solutions are step sets (the same steps in another order are one solution); and the
benchmark's decoding-steps sweep gives one MDLM row per number of steps."""
from __future__ import annotations

import functools
import random
from collections import defaultdict
from itertools import combinations

import pytest
import torch

from datamodules import ReasoningDataModule
from datamodules.countdown import CountdownTask, distinct_solutions, solutions


@functools.lru_cache(maxsize=None)
def step_sets(pool: tuple[int, ...], max_value: int) -> dict[int, frozenset]:
    """For a sorted pool of numbers: final value -> the sets of steps (a, op, b, c) that reduce the pool to it,
    each set as a sorted tuple (a + b and a * b with a >= b). Memoised over sub-pools, and independent of the
    module's search."""
    if len(pool) == 1:
        return {pool[0]: frozenset([()])}
    out: dict[int, set] = defaultdict(set)
    for i, j in combinations(range(len(pool)), 2):
        a, b = max(pool[i], pool[j]), min(pool[i], pool[j])
        steps = [(a, "+", b, a + b), (a, "*", b, a * b), (a, "-", b, a - b), (b, "-", a, b - a)]
        steps += [(x, "/", y, x // y) for x, y in ((a, b), (b, a)) if y and x % y == 0]
        rest = tuple(v for k, v in enumerate(pool) if k not in (i, j))
        for step in steps:
            if not 0 <= step[3] <= max_value:
                continue
            for value, ways in step_sets(tuple(sorted(rest + (step[3],))), max_value).items():
                out[value].update(tuple(sorted(way + (step,))) for way in ways)
    return {value: frozenset(ways) for value, ways in out.items()}


def canonical(step: list[str]) -> tuple:
    """A written step "a op b = c" as (a, op, b, c), the larger operand of + and * first."""
    a, op, b, _, c = step
    a, b = (max(int(a), int(b)), min(int(a), int(b))) if op in "+*" else (int(a), int(b))
    return a, op, b, int(c)


# sizes at which the filter bites: without it 20% (Countdown-3) and 15% (Countdown-4) of the problems fall short
SETTINGS = [(3, 15, 50, 2), (4, 9, 30, 8)]


@pytest.mark.parametrize("n,max_number,max_value,min_solutions", SETTINGS)
def test_options_hold_on_2000_drawn_problems(n, max_number, max_value, min_solutions):
    dm = ReasoningDataModule(task="countdown", num_numbers=n, max_number=max_number, max_value=max_value,
                             min_solutions=min_solutions, train_size=2000, val_size=8, test_size=8)
    assert (dm.generator.max_number, dm.generator.max_value, dm.generator.min_solutions) == (max_number, max_value,
                                                                                             min_solutions)
    for i in range(2000):
        ex = dm.train_set.example(i)
        numbers, target = [int(t) for t in ex.question[:n]], int(ex.answer[0])
        assert all(1 <= v <= max_number for v in numbers) and 0 <= target <= max_value
        assert all(0 <= int(step[4]) <= max_value for step in ex.steps)
        found = step_sets(tuple(sorted(numbers)), max_value).get(target, frozenset())
        assert len(found) >= min_solutions, (numbers, target, found)
        assert tuple(sorted(map(canonical, ex.steps))) in found  # the written solution is one of them


@pytest.mark.parametrize("n,max_number,max_value,min_solutions", SETTINGS)
def test_min_solutions_is_not_vacuous_at_those_sizes(n, max_number, max_value, min_solutions):
    """Without the filter many problems have fewer distinct solutions: the test above checks a filter that removes
    something."""
    task = CountdownTask(n, max_number, max_value, min_solutions=1)
    rng = random.Random(0)
    counts = []
    for _ in range(200):
        ex = task.sample(rng)
        counts.append(len(step_sets(tuple(sorted(int(t) for t in ex.question[:n])), max_value)[int(ex.answer[0])]))
    assert sum(c < min_solutions for c in counts) >= 20


def test_distinct_solutions_are_step_sets():
    # (2 + 3) * (4 + 5): the two independent sums in either order are one solution
    orders = [s for s in solutions([2, 3, 4, 5], 45, 100) if sorted(s) == [(3, "+", 2, 5), (5, "+", 4, 9),
                                                                        (9, "*", 5, 45)]]
    assert len(orders) == 2 and ((3, "+", 2, 5), (5, "+", 4, 9), (9, "*", 5, 45)) in distinct_solutions(
        [2, 3, 4, 5], 45, 100)
    # (6 + 4) + 2 and (6 + 2) + 4 pass through different results: distinct
    assert {((6, "+", 4, 10), (10, "+", 2, 12)), ((6, "+", 2, 8), (8, "+", 4, 12))} <= {
        tuple(s) for s in solutions([6, 4, 2], 12, 100)}
    assert len({d for d in distinct_solutions([6, 4, 2], 12, 100) if all(op == "+" for _, op, _, _ in d)}) == 3
    assert distinct_solutions([2, 3, 4, 5], 45, 100) == set(step_sets((2, 3, 4, 5), 100)[45])


def test_countdown_options_are_refused_elsewhere_and_checked():
    with pytest.raises(ValueError, match="max_number=9 is a Countdown option"):
        ReasoningDataModule(task="path_star", max_number=9)
    with pytest.raises(ValueError, match="max_number <= max_value"):
        ReasoningDataModule(task="countdown", max_number=40, max_value=30, val_size=2, test_size=2)


class Writer(torch.nn.Module):
    """A stand-in MDLM: it writes each test question's shown solution when given at least 2 denoising steps, and a
    wrong answer with 1; it records the steps it was asked for. Like MDLM it fills one canvas per prompt length,
    takes **options and refuses `prompt_lengths`."""

    generation_slack = 0
    generates_ragged = False

    def __init__(self, dm):
        super().__init__()
        self.dm, self.eos_id, self.asked = dm, dm.eos_id, []
        self.trunk = type("Trunk", (), {"max_seq_len": 64})()

    def generate(self, prompt_ids, max_new_tokens, steps=None, temperature=0.0, **options):
        assert not options, f"MDLM has no {options} option"
        self.asked.append(steps)
        ids = self.dm.tokenizer.token_to_id
        rows = []
        for prompt in prompt_ids.tolist():
            ex = next(e for e in self.dm.test_examples if [ids(t) for t in e.question] == prompt)
            words = [w for s in ex.steps for w in [*s, "<step>"]] + ["<ans>", ex.answer[0], "<eos>"]
            if steps == 1:
                words = ["<ans>", "0", "<eos>"]
            row = [ids(w) for w in words]
            rows.append(prompt + row + [self.eos_id] * (max_new_tokens - len(row)))
        return torch.tensor(rows)


def test_benchmark_adds_one_mdlm_row_per_number_of_decoding_steps():
    from benchmarks.countdown import evaluate
    dm = ReasoningDataModule(task="countdown", num_numbers=3, val_size=2, test_size=3)
    assert all(ex.answer[0] != "0" for ex in dm.test_examples)
    model = Writer(dm)
    rows = evaluate("mdlm", model, dm, 3, 2, decode_steps=(1, 4))
    greedy = "greedy, most confident first"
    assert [r["decoding"] for r in rows] == [greedy, f"{greedy}, 1 steps", f"{greedy}, 4 steps", "2 samples, T=1"]
    assert [r["valid %"] for r in rows[:3]] == [100.0, 0.0, 100.0]
    assert model.asked[:3] == [None, 1, 4]  # the default row decodes with the model's own number of steps
