"""The ProsQA generator of Algorithm 1 (datamodules/prosqa.py, task "prosqa_alg1"): the steps chain through the
question's own facts from the entity to the answer, and graphs at the smallest accepted size draw the rarest step
count without failing."""
from __future__ import annotations

import random
from collections import deque

import pytest

import datamodules.prosqa as prosqa
from datamodules.prosqa import MIN_NODES, ProsQAGraphTask


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
    dist, todo = {entity: 0}, deque([entity])
    while todo:
        u = todo.popleft()
        for v in graph.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
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
