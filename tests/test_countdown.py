"""Countdown: the generator's solutions reach the target, the checker accepts every valid solution and refuses
invalid ones (also inside answer scoring, where exact match of the answer alone would accept them), and a
next-token model fits a step on it through the CLI."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_MODEL, run_cli
from datamodules.countdown import CountdownTask, check, solutions
from datamodules.reasoning import ANS, EOS, STEP

SAFE_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def written(steps, target) -> list[str]:
    out: list[str] = []
    for s in steps:
        out += [str(t) for t in s[:3]] + ["=", str(s[3])] + [STEP] if len(s) == 4 else list(s) + [STEP]
    return out + [ANS, str(target), EOS]


@pytest.mark.parametrize("n", [3, 4])
def test_generator_solutions_evaluate_to_the_target(n):
    task = CountdownTask(num_numbers=n)
    for i in range(40):
        ex = task.sample(random.Random(f"t/{n}/{i}"))
        numbers, target = [int(t) for t in ex.question[:n]], int(ex.answer[0])
        assert ex.question[n:] == ["->", ex.answer[0]] and len(ex.steps) == n - 1
        pool = list(numbers)
        for a, op, b, eq, c in ex.steps:  # evaluated independently of the module's rules
            assert eq == "=" and int(a) in pool
            pool.remove(int(a))
            assert int(b) in pool
            pool.remove(int(b))
            value = SAFE_OPS[op](int(a), int(b))
            assert value == int(c) and value >= 0
            pool.append(int(c))
        assert pool == [target]
        assert check(ex.question, written(ex.steps, target))
        assert len(solutions(numbers, target, task.max_value)) >= 2  # several valid solutions


def test_checker_accepts_every_valid_solution_and_rejects_invalid_ones():
    found = solutions([6, 4, 2], 12, 100)  # 6 + 4 + 2 (three orders), 6 * 4 / 2, (4 - 2) * 6, ...
    assert ((4, "-", 2, 2), (6, "*", 2, 12)) in found and ((6, "*", 4, 24), (24, "/", 2, 12)) in found
    for sol in found:
        assert check(["6", "4", "2", "->", "12"], written(sol, 12)), sol
    question = ["12", "7", "3", "->", "33"]
    assert check(question, ["3", "*", "7", "=", "21", STEP, "12", "+", "21", "=", "33", STEP, ANS, "33"])  # no eos
    invalid = {
        "wrong arithmetic": ["7", "*", "3", "=", "22", STEP, "22", "+", "12", "=", "34", STEP, ANS, "33", EOS],
        "wrong answer": ["7", "*", "3", "=", "21", STEP, "21", "+", "12", "=", "33", STEP, ANS, "34", EOS],
        "number used twice": ["7", "*", "7", "=", "49", STEP, "49", "-", "12", "=", "37", STEP, ANS, "33", EOS],
        "number not given": ["11", "*", "3", "=", "33", STEP, ANS, "33", EOS],
        "number left over": ["7", "*", "3", "=", "21", STEP, ANS, "33", EOS],
        "inexact division": ["12", "/", "7", "=", "1", STEP, "1", "*", "3", "=", "3", STEP, ANS, "33", EOS],
        "negative result": ["3", "-", "7", "=", "-4", STEP, "12", "*", "-4", "=", "33", STEP, ANS, "33", EOS],
        "no answer marker": ["7", "*", "3", "=", "21", STEP, "21", "+", "12", "=", "33", STEP, "33", EOS],
        "malformed step": ["7", "*", "3", "21", STEP, "21", "+", "12", "=", "33", STEP, ANS, "33", EOS],
        "nothing": [],
    }
    for why, gen in invalid.items():
        assert not check(question, gen), why


def test_one_step_fit_and_answer_scoring_evaluates_the_solution(tmp_path):
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--data", "configs/data/countdown.yaml",
                  *TINY_MODEL, "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
                  "--data.init_args.batch_size", "2", "--model.init_args.eval_examples", "2",
                  "--trainer.limit_val_batches", "1", steps=1)
    assert cli.trainer.global_step == 1
    # the fit scores its two val questions; a model one step from random init writes no valid solution
    assert cli.model.scorer.scored == 2 and float(cli.trainer.callback_metrics["val/accuracy"]) == 0.0
    # the task's own check and the special tokens' ids reach the objective through train.py's links
    assert cli.model.scorer.check_answer == cli.datamodule.check_answer
    assert cli.model.special_ids == cli.datamodule.special_ids and cli.model.special_ids["step"] == cli.datamodule.step_id
    assert "answer_check" not in cli.model.hparams  # behaviour stays out of the checkpoint's settings
    dm, model = cli.datamodule, cli.model
    batch = dm.val_dataloader().collate_fn([dm.val_set[0]])
    ex = dm.val_examples[0]
    numbers, target = [int(t) for t in ex.question[:3]], int(ex.answer[0])
    ids = lambda toks: [dm.tokenizer.token_to_id(t) for t in toks]  # noqa: E731
    plen = int(batch["prompt_len"][0])
    # every valid solution counts, not only the shown one; an invalid one ending in the right answer does not
    for sol in solutions(numbers, target, 100):
        assert dm.check_answer(batch["tokens"][0, :plen].tolist(), ids(written(sol, target)))

    def fixed(valid: bool):  # a generation per prompt: a valid solution, or wrong steps ending in the right answer
        def generate(prompts, budget, **kw):
            rows = []
            for prompt in prompts.tolist():
                q = dm.decode(prompt).split()
                nums, goal = [int(t) for t in q[:3]], int(q[4])
                steps = solutions(nums, goal, 100)[-1] if valid else [(nums[0], "+", nums[1], nums[0] + nums[1] + 1)]
                rows.append(prompt + ids(written(steps, goal)[:-1]) + [dm.eos_id] * 40)
            return torch.tensor([r[:60] for r in rows])
        return generate

    for valid in (False, True):
        model.generate = fixed(valid)
        cli.trainer.test(model, datamodule=dm, verbose=False)
        assert float(cli.trainer.callback_metrics["test/accuracy"]) == float(valid)
