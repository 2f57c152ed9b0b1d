"""Answer scoring on reasoning data: exact match of an objective's own generated answer and the tokens it took.

The generation after the prompt, cut after the first eos, must end with the gold `answer` row (the answer marker
and the answer's tokens), so reasoning written before the answer is free; a datamodule with `check_answer`
(Countdown) gives its own verdict instead, so that any valid solution counts. A family whose `generate` takes
`prompt_lengths` decodes the whole batch at once, prompts of every length together (rows finishing on their
own); the others (the denoising families, which fill a canvas) one prompt length at a time. Each row gets the
budget it would get alone: the batch's length minus its prompt plus the family's `generation_slack`, within the
trunk's max_seq_len (per-row budgets where `generate` takes them; otherwise the largest, each row cut to its own).

`AnswerScorer`, one per objective (`model.scorer`), owns the state this needs: the running means, the count of
questions a validation has scored, the examples for TensorBoard's text tab and the task's answer check. A family
with its own generation loop (LaDiR's trajectories) composes its `questions`, `judge` and `record` with
`ragged_prompts`. Both figures are torchmetrics means over questions, so that under DDP every rank's questions
count once, however many each rank scored.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from objectives.training import metrics as M


class AnswerScorer(nn.Module):
    """Scores an objective's generated answers on reasoning data and logs {stage}/accuracy and
    {stage}/answer_tokens (metric objects, so that Lightning computes, syncs and resets them per epoch).

    Args:
        eval_examples: questions scored per validation (test scores every question).
        check_answer: the task's own verdict, ``check_answer(prompt_ids, generated_ids) -> bool | None``
            (Countdown evaluates the generated solution, so any valid one counts; None from it = exact match).
    """

    def __init__(self, eval_examples: int, check_answer: Callable | None = None):
        super().__init__()
        self.eval_examples, self.check_answer = eval_examples, check_answer
        self.accuracy = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.answer_tokens = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.scored = 0  # questions this validation has scored
        # (prompt, generation, gold or None) for TensorBoard's text tab, in the data's vocabulary
        self.examples: list[tuple[list[int], list[int], list[int] | None]] = []

    def start_validation(self) -> None:
        self.scored, self.examples = 0, []

    def score(self, model, batch: dict, stage: str = "val") -> None:
        """Generate the answers of a batch (at most `eval_examples` per validation; every question in test), judge
        them and log the figures."""
        questions = self.questions(batch, stage)
        if questions is None:
            return
        tokens, prompt_len, answers, teacherless = questions
        prompts = [tokens[row, :p].tolist() for row, p in enumerate(prompt_len.tolist())]
        golds = [[t for t in row if t >= 0] for row in answers.tolist()]
        judged = [self.judge(model, prompt, gen, gold) for prompt, gen, gold in
                  zip(prompts, generate_answers(model, tokens, prompt_len, teacherless), golds)]
        groups = {key: batch[key][: len(prompts)] for key in M.ACCURACY_GROUPS if key in batch}
        self.record(model, stage, prompts, [g for g, _ in judged], golds, [r for _, r in judged], groups)

    def questions(self, batch: dict, stage: str = "val"):
        """The questions of a batch that get scored: (tokens, prompt_len, answers, teacherless), or None when this
        validation has scored its `eval_examples` already. On teacherless batches (`inputs` given) teacherless =
        (answer marker, dummy id): after the marker the model reads the dummy token."""
        budget = self.eval_examples - self.scored if stage == "val" else len(batch["tokens"])
        if budget <= 0:
            return None
        tokens, prompt_len, answers = batch["tokens"][:budget], batch["prompt_len"][:budget], batch["answer"][:budget]
        teacherless = None
        if "inputs" in batch:
            replaced = batch["inputs"][batch["inputs"] != batch["tokens"]]
            teacherless = (int(answers[0, 0]), int(replaced[0])) if replaced.numel() else None
        return tokens, prompt_len, answers, teacherless

    def judge(self, model, prompt: list[int], gen: list[int], gold: list[int]) -> tuple[list[int], bool]:
        """(the generation cut after its first eos, whether it is right): the task's own check where it has one,
        else exact match of the answer at its end."""
        gen, right = exact_match(gen, gold, model.eos_id)
        # the task checks what is written in its own vocabulary (a family's markers and thoughts are not words)
        verdict = None if self.check_answer is None else self.check_answer(
            prompt, [t for t in gen if t < model.vocab_size])
        return gen, right if verdict is None else verdict

    def record(self, model, stage: str, prompts: list[list[int]], gens: list[list[int]], golds: list[list[int]],
               correct: list[bool], groups: dict[str, torch.Tensor] | None = None) -> None:
        """Update and log {stage}/accuracy and {stage}/answer_tokens with scored questions, the accuracy per group
        where the batch gives the questions' ACCURACY_GROUPS values (`groups`: key -> [questions]), and on reasoning
        data (step counts given) the share of answers in the right format; keep the first four of a validation as
        examples."""
        if stage == "val":
            for prompt, gen, gold in zip(prompts, gens, golds):
                if len(self.examples) < 4:
                    self.examples.append((prompt, [t for t in gen if t < model.vocab_size], gold))
            self.scored += len(correct)
        self.log_accuracy(model, stage, torch.tensor(correct, dtype=torch.bool, device=model.device), groups)
        self.answer_tokens[stage].update(torch.tensor([float(len(g)) for g in gens], device=model.device))
        model.log(M.VAL_ANSWER_TOKENS if stage == "val" else M.TEST_ANSWER_TOKENS, self.answer_tokens[stage])
        if groups and "num_steps" in groups:
            shaped = [well_formed(gen, gold, model.eos_id) for gen, gold in zip(gens, golds)]
            model.log(M.answer_format(stage), sum(shaped) / len(shaped), batch_size=len(shaped), sync_dist=True)

    def log_accuracy(self, model, stage: str, correct: torch.Tensor, groups: dict[str, torch.Tensor] | None = None):
        """{stage}/accuracy over questions judged right or wrong (`correct` [N] bool), a running mean in which every
        rank's questions count once, and {stage}/accuracy_<k>_<unit> over those whose group value (`groups`: an
        ACCURACY_GROUPS key -> [N] values) is k, epoch means weighted by each batch's questions with k."""
        self.accuracy[stage].update(correct.float())
        model.log(M.VAL_ACCURACY if stage == "val" else M.TEST_ACCURACY, self.accuracy[stage])
        for key, values in (groups or {}).items():
            for k in values.unique().tolist():
                right = correct[values == k].float()
                model.log(M.accuracy_by(stage, key, k), right.mean(), batch_size=len(right), sync_dist=True)


def ragged_prompts(model, tokens: torch.Tensor, prompt_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's prompts right-padded with eos to the longest ([B, max prompt_len]) and each row's budget [B]:
    the batch's length minus its prompt plus the family's `generation_slack`, within the trunk's max_seq_len."""
    budgets = torch.minimum(tokens.shape[1] - prompt_len + model.generation_slack,
                            model.trunk.max_seq_len - prompt_len)
    width = int(prompt_len.max())
    fill = model.eos_id if model.eos_id is not None else 0
    prompts = tokens[:, :width].masked_fill(torch.arange(width, device=tokens.device) >= prompt_len[:, None], fill)
    return prompts, budgets


def generate_answers(model, tokens: torch.Tensor, prompt_len: torch.Tensor, teacherless,
                     ragged: bool | None = None) -> list[list[int]]:
    """Each row's generation after its prompt (`prompt_len[b]` tokens of `tokens[b]`), as a list of ids: the
    whole batch in one call (`ragged`; default where the family can), else one call per prompt length."""
    prompts, budgets = ragged_prompts(model, tokens, prompt_len)
    if model.generates_ragged if ragged is None else ragged:
        if bool((budgets == budgets[0]).all()) or not model.takes_row_budgets:
            budget = int(budgets.max())  # one budget; each row is cut to its own below (greedy prefixes agree)
            if int(prompt_len.max()) + budget > model.trunk.max_seq_len:  # a long row cannot take the largest
                return generate_answers(model, tokens, prompt_len, teacherless, ragged=False)
        else:
            budget = budgets
        out = model.generate(prompts, budget, teacherless=teacherless, prompt_lengths=prompt_len).tolist()
        return [row[p : p + n] for row, p, n in zip(out, prompt_len.tolist(), budgets.tolist())]
    generated: list = [None] * len(tokens)
    for plen in prompt_len.unique().tolist():
        rows = (prompt_len == plen).nonzero().flatten()
        new = model.generate(tokens[rows, :plen], int(budgets[rows[0]]), teacherless=teacherless)[:, plen:]
        for row, gen in zip(rows.tolist(), new.tolist()):
            generated[row] = gen
    return generated


def well_formed(gen: list[int], gold: list[int], eos_id: int | None) -> bool:
    """Whether a generation (cut after its first eos) ends with an answer of the gold's shape: the gold's first
    token (the answer marker), then as many tokens as the gold has after it."""
    body = gen[:-1] if gen and gen[-1] == eos_id else gen
    if not gold or gold[0] not in body:
        return False
    last = len(body) - 1 - body[::-1].index(gold[0])
    return len(body) - last == len(gold)


def exact_match(gen: list[int], gold: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """(the generation cut after its first eos, whether it ends with the gold answer)."""
    if eos_id is not None and eos_id in gen:
        gen = gen[: gen.index(eos_id) + 1]
    body = gen[:-1] if gen and gen[-1] == eos_id else gen
    return gen, len(body) >= len(gold) and body[len(body) - len(gold):] == gold
