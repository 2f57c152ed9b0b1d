"""benchmarks/countdown.py's scoring: pass@k, distinct valid solutions and Coconut's hidden-step check on
hand-made generations, and the id-level path (timed generation, decoding, checking) on stand-in models, a CoT-like
one and a Coconut-like one scored by the same rules."""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import repeated, timed_generation
from benchmarks.countdown import (accuracy_row, latent_prefix_check, pass_at_k, sample_scores, samples_row,
                                  solution_key)
from datamodules import ReasoningDataModule

Q = "8 19 20 -> 47".split()  # three solutions: 8+20 then +19, 8+19 then +20, 19+20 then +8
A = "8 + 20 = 28 <step> 19 + 28 = 47 <step> <ans> 47 <eos>".split()
A_SWAPPED = "20 + 8 = 28 <step> 28 + 19 = 47 <step> <ans> 47 <eos>".split()  # the same solution
B = "19 + 8 = 27 <step> 27 + 20 = 47 <step> <ans> 47 <eos>".split()
C = "20 + 19 = 39 <step> 39 + 8 = 47 <step> <ans> 47".split()
WRONG = "8 + 20 = 28 <step> 19 + 28 = 48 <step> <ans> 47 <eos>".split()  # a wrong sum
ANSWER_ONLY = "<ans> 47 <eos>".split()  # the target without steps is not a solution


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 8, 8) == 1.0
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3, 3) / C(5, 3)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 5, 2)


def test_a_solution_is_its_steps_with_commutative_operands_unordered():
    assert solution_key(A) == solution_key(A_SWAPPED) == (("20", "+", "8", "=", "28"), ("28", "+", "19", "=", "47"))
    assert solution_key(A) != solution_key(B) != solution_key(C)
    assert solution_key("10 - 3 = 7 <step> <ans> 7".split()) != solution_key("3 - 10 = 7 <step> <ans> 7".split())


def test_distinct_valid_solutions_and_pass_at_k_of_hand_made_samples():
    samples = [A, A_SWAPPED, B, WRONG, ANSWER_ONLY, A, WRONG, C]
    scores = sample_scores(Q, samples, k=8)
    assert scores == {"pass": 1.0, "distinct": 3, "valid": 5 / 8}  # A (three times), B, C valid; A counted once
    assert sample_scores(Q, [WRONG, ANSWER_ONLY] * 4, k=8) == {"pass": 0.0, "distinct": 0, "valid": 0.0}
    two = sample_scores(Q, [A, WRONG, WRONG, B], k=2)
    assert two["distinct"] == 2 and two["pass"] == pytest.approx(1 - 1 / 6)


def test_coconut_written_last_step_is_checked_against_some_valid_hidden_step():
    assert latent_prefix_check(Q, "19 + 28 = 47 <step> <ans> 47 <eos>".split(), 1)  # hidden 8 + 20 = 28
    assert latent_prefix_check(Q, "39 + 8 = 47 <step> <ans> 47".split(), 1)  # hidden 19 + 20 = 39
    assert not latent_prefix_check(Q, "19 + 29 = 48 <step> <ans> 47".split(), 1)  # wrong sum
    assert latent_prefix_check(Q, "20 + 27 = 47 <step> <ans> 47".split(), 1)  # hidden 8 + 19 = 27
    assert not latent_prefix_check(Q, "8 + 39 = 47 <step> 8 + 39 = 47 <step> <ans> 47".split(), 1)  # 8 used twice
    assert not latent_prefix_check(Q, "8 + 30 = 38 <step> <ans> 47".split(), 1)  # 30 is not one step away
    # every step hidden: only the answer, the target copied from the question, would be left; no solution
    assert not latent_prefix_check(Q, ANSWER_ONLY, 2)
    assert not latent_prefix_check(Q, ANSWER_ONLY, 1)
    assert latent_prefix_check(Q, A, 0) and not latent_prefix_check(Q, WRONG, 0)  # nothing hidden: `check`


class StandIn(torch.nn.Module):
    """A model whose generation writes given solutions: sample j of question i is solutions[i][j] (words, or ids
    for what has no word: a Coconut's markers and thoughts)."""

    generation_slack = 0

    def __init__(self, dm, solutions):
        super().__init__()
        self.dm, self.solutions, self.eos_id = dm, solutions, dm.eos_id
        self.trunk = type("Trunk", (), {"max_seq_len": 64})()
        self.calls = 0

    def ids(self, words, width):
        ids = [w if isinstance(w, int) else self.dm._itos.index(w) for w in words]
        return ids + [self.eos_id] * (width - len(ids))

    def sample_trajectories(self, prompt_ids, max_new_tokens, prompt_lengths=None, num_trajectories=8):
        rows = []
        for prompt in prompt_ids.tolist():
            i = next(n for n, ex in enumerate(self.dm.test_examples) if self.ids(ex.question, 0) == prompt)
            rows.append([prompt + self.ids(s, max_new_tokens) for s in self.solutions[i][:num_trajectories]])
        return torch.tensor(rows)

    def generate(self, prompt_ids, max_new_tokens, prompt_lengths=None):
        return self.sample_trajectories(prompt_ids, max_new_tokens, prompt_lengths, 1)[:, 0]


def test_scoring_rows_from_token_ids_of_a_stand_in_model():
    dm = ReasoningDataModule(task="countdown", num_numbers=3, val_size=2, test_size=2)
    (q0, steps0), (q1, steps1) = [(ex.question, ex.steps) for ex in dm.test_examples]
    shown = [sum(([*s, "<step>"] for s in steps), []) + ["<ans>", q[-1], "<eos>"] for q, steps in
             ((q0, steps0), (q1, steps1))]
    copied = [["<ans>", q[-1], "<eos>"] for q in (q0, q1)]  # the target copied from the question, no steps
    wrong = ["<ans>", "0", "<eos>"]
    assert q1[-1] != "0"
    model = StandIn(dm, [[shown[0], copied[0], shown[0], copied[0]], [wrong] + [copied[1]] * 3])
    prompts, gold, gens, seconds = timed_generation(model, dm, 2, model.sample_trajectories, num_trajectories=4)
    assert len(gens) == 2 and all(len(g) == 4 for g in gens) and gens[0][0][-1] == dm.eos_id
    row = samples_row(model, dm, 2, 4, "stand-in", model.sample_trajectories, num_trajectories=4)
    assert row["pass@4 %"] == 50.0 and row["distinct valid"] == 0.5 and row["sample acc %"] == 25.0
    row = accuracy_row(model, dm, 2, "first")  # one solution written, one wrong answer
    assert (row["answer %"], row["valid %"], row["latent steps"]) == (50.0, 50.0, 0)
    # a Coconut-like model (2 thoughts per step), scored by the same rules: question 0 hides its first step and
    # writes a valid last one; question 1 hides both steps and copies the target, which is no solution
    V = dm.vocab_size
    bot, latent, eot = V, V + 2, V + 1
    coconut = StandIn(dm, [[[bot, *[latent] * 2, eot, *shown[0][6:]]], [[bot, *[latent] * 4, eot, *copied[1]]]])
    coconut.latent_id, coconut.c = latent, 2
    row = accuracy_row(coconut, dm, 2, "greedy")
    assert (row["answer %"], row["valid %"], row["latent steps"]) == (100.0, 50.0, 1.5)
    # k samples of a one-sample generate: the same rows k times
    again = repeated(model.generate, 3)(torch.tensor([prompts[0]]), 15)
    assert again.shape[:2] == (1, 3) and torch.equal(again[0, 0], again[0, 2])


def test_countdown_benchmark_trains_scores_and_writes_its_table(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "countdown.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.countdown", "--runs", "cot,coconut", "--steps", "2",
                           "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--test_size", "8",
                           "--samples", "2", "--save_dir", str(tmp_path), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["run"], r["decoding"]) for r in rows] == [("cot", "greedy"), ("cot", "2 samples, T=1"),
                                                         ("coconut", "greedy")]
    assert all(r["steps"] == 2 and r["tokens/s"] > 0 for r in rows)
    # a smoke test of the table's wiring (the figures themselves are tested on the stand-ins above): a valid
    # solution has the right answer, one valid sample of two makes the question pass, and a passing question
    # has one or two distinct valid solutions
    for r in (rows[0], rows[2]):
        assert r["valid %"] <= r["answer %"]
    cot = rows[1]
    assert cot["sample acc %"] <= cot["pass@2 %"] <= 100 * cot["distinct valid"] <= 2 * cot["pass@2 %"]
    # Coconut trained 2 steps with stage_every 1: it generates at stage 1, one of the two steps latent
    assert rows[2]["latent steps"] == 1 and rows[0]["latent steps"] == 0
    assert "Countdown-3 (8 test questions)" in done.stdout
