"""The ProsQA generator of Algorithm 1 (datamodules/prosqa.py, task "prosqa_alg1"): the steps chain through the
question's own facts from the entity to the answer, and graphs at the smallest accepted size draw the rarest step
count without failing."""
from __future__ import annotations

import random

import pytest

import datamodules.prosqa as prosqa
from datamodules.prosqa import MIN_NODES, ProsQAGraphTask
from test_reasoning_data import bfs


def subject(fact: list[str]) -> str:
    return fact[1] if fact[0] == "Every" else fact[0]


def check_chain(ex) -> None:
    """Each step is a fact stated in the question, the first starts at the asked entity, step k+1 starts where step
    k ended, the last ends at the answer, and there are as many steps as the shortest path is long."""
    words = " ".join(ex.question).split(" . ")
    ask = words.pop().split()
    facts = {tuple(f.split()) + (".",) for f in words}
    entity, target = ask[1], ex.answer[3]
    assert ex.answer == [entity, "is", "a", target, "."] and target in (ask[3], ask[5])
    at = entity
    for step in ex.steps:
        assert tuple(step) in facts, f"step {' '.join(step)} is not a fact of the question"
        assert subject(step) == at
        at = step[-2]
    assert at == target
    graph: dict[str, set[str]] = {}
    for f in facts:
        graph.setdefault(subject(list(f)), set()).add(f[-2])
    dist = bfs(graph, entity)
    assert len(ex.steps) == dist[target]


def test_steps_chain_through_the_question_s_facts_to_the_answer():
    task = ProsQAGraphTask(num_nodes=23)
    counts = {}
    for i in range(60):
        ex = task.sample(random.Random(i))
        check_chain(ex)
        counts[len(ex.steps)] = counts.get(len(ex.steps), 0) + 1
    assert set(counts) >= {3, 4, 5}  # the draws span the step counts (6 steps is 3% of questions)


def test_the_smallest_graphs_always_draw_a_six_step_question(monkeypatch):
    """At MIN_NODES about 0.3% of graphs hold a 6-step question: with 1000 tries per question 4-5% of these 100
    questions failed; every one must come out, with 6 steps that chain."""
    monkeypatch.setattr(prosqa, "STEP_SHARES", {6: 1.0})
    task = ProsQAGraphTask(num_nodes=MIN_NODES)
    for i in range(100):
        ex = task.sample(random.Random(f"boundary/{i}"))
        assert len(ex.steps) == 6
        check_chain(ex)


def test_graph_sizes_out_of_range_are_refused_naming_the_range():
    with pytest.raises(ValueError, match=f"prosqa_alg1: num_nodes=17.*use {MIN_NODES} <= num_nodes"):
        ProsQAGraphTask(num_nodes=MIN_NODES - 1)
    with pytest.raises(ValueError, match="num_nodes=200"):
        ProsQAGraphTask(num_nodes=200)
    assert ProsQAGraphTask.name == "prosqa_alg1"


MINI = dict(nodes=(6, 9), step_shares={1: 0.15, 2: 0.35, 3: 0.5}, test_steps=3, concepts=40, syntax="compact")


def check_compact_chain(ex) -> None:
    """ProsQA-mini's compact syntax: facts "X Y .", the question "? Tom A B", steps "Tom X .", "X Y .", ..., and the
    answer "Tom A .". Each step is a fact of the question, the first starts at the entity, step k+1 starts where
    step k ended, the last ends at the answer, and there are as many steps as the shortest path is long."""
    cut = ex.question.index("?")
    body, (entity, *options) = ex.question[:cut], ex.question[cut + 1:]
    facts = {tuple(body[i:i + 3]) for i in range(0, len(body), 3)}
    assert all(f[2] == "." for f in facts) and len(options) == 2
    target = ex.answer[1]
    assert ex.answer == [entity, target, "."] and target in options
    at = entity
    for step in ex.steps:
        assert tuple(step) in facts, f"step {' '.join(step)} is not a fact of the question"
        assert step[0] == at
        at = step[1]
    assert at == target
    graph: dict[str, set[str]] = {}
    for u, v, _ in facts:
        graph.setdefault(u, set()).add(v)
    dist = bfs(graph, entity)
    assert len(ex.steps) == dist[target]
    other = options[1 - options.index(target)]
    assert other not in dist, "the wrong option must not be reachable from the entity"


def test_prosqa_mini_step_shares_hold_on_2000_draws_and_the_test_split_asks_three_steps():
    task = ProsQAGraphTask(**MINI)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(2000):
        counts[len(task.sample(random.Random(f"mini/{i}"), "train").steps)] += 1
    for k, share in MINI["step_shares"].items():
        # four standard deviations of a binomial share over 2000 draws (at most 0.045)
        assert abs(counts[k] / 2000 - share) < 4 * (share * (1 - share) / 2000) ** 0.5, (k, counts)
    assert {len(task.sample(random.Random(f"mini-test/{i}"), "test").steps) for i in range(200)} == {3}


def test_prosqa_mini_steps_chain_through_the_question_s_facts_and_questions_stay_short():
    task = ProsQAGraphTask(**MINI)
    lengths = []
    for i in range(300):
        ex = task.sample(random.Random(f"chain/{i}"), "test" if i % 2 else "train")
        check_compact_chain(ex)
        lengths.append(len(ex.question))
        assert set(ex.question) <= set(task.vocab())
    assert 20 < sum(lengths) / len(lengths) < 40  # about 30 tokens against the public set's 209
    assert len({w for w in task.vocab() if w in prosqa.CONCEPTS}) == 40


def test_prosqa_mini_options_are_checked_and_belong_to_prosqa_alg1():
    from datamodules import ReasoningDataModule
    with pytest.raises(ValueError, match="must hold a 3-step question"):
        ProsQAGraphTask(nodes=(4, 8), step_shares={3: 1.0})
    with pytest.raises(ValueError, match="syntax='terse'"):
        ProsQAGraphTask(**{**MINI, "syntax": "terse"})
    with pytest.raises(ValueError, match="graph_nodes=\\[9, 14\\].*options of task='prosqa_alg1'"):
        ReasoningDataModule(task="path_star", graph_nodes=[9, 14], train_size=8, val_size=2, test_size=2)
