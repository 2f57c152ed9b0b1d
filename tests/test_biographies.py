"""The biographies task (datamodules/biographies.py): the training text holds every biography and the questions
about the QA half only, never a held-out wording or a held-out person's question; val and test are those
questions, with every word known; and a generated answer is scored by exact match of <ans> and its words, through
the same batches and CLI links as every reasoning task."""
from __future__ import annotations

import pytest
import torch

from datamodules import BiographiesDataModule
from datamodules.biographies import ATTRIBUTES, QUESTION_TEMPLATES, question
from objectives.decoding.scoring import exact_match


@pytest.fixture(scope="module")
def dm():
    return BiographiesDataModule()


def training_text(dm) -> str:
    return " | ".join(dm.decode(item["tokens"]) for item in dm.train_set)


def test_heldout_wordings_and_questions_never_appear_in_the_training_text(dm):
    text = training_text(dm)
    heldout = {a: t[-1:] for a, t in QUESTION_TEMPLATES.items()}  # the default: the last wording held out
    assert dm.heldout_wordings == heldout
    # a held-out wording about anyone, any question about a held-out person (lists, not `in` asserts: pytest would
    # diff the whole text)
    leaked = [question(heldout[a][0], p) for p in dm.people for a in ATTRIBUTES]
    leaked += [question(t, p) for p in dm.heldout_people for a in ATTRIBUTES for t in QUESTION_TEMPLATES[a]]
    assert [q for q in leaked if q in text] == []
    # the held-out people's biographies are there, and the QA half's questions
    assert all(text.count(p["name"]) >= 5 * dm.hparams.bios_per_person for p in dm.heldout_people)
    trained = [question(t, p) + " <ans> " + p[a] for p in dm.qa_people for a in ATTRIBUTES
               for t in QUESTION_TEMPLATES[a][:-1]]
    assert [q for q in trained if q not in text] == []
    # val and test: new questions in known words, about the held-out people, answered by their attributes
    words = set(text.split())
    asked = {p["name"]: p for p in dm.heldout_people}
    for q, answer in dm.val_questions + dm.test_questions:
        assert set(q.split()) <= words
        name = next(n for n in asked if f" {n} " in f" {q} ")
        assert answer in asked[name].values()
    assert [q for q, _ in dm.val_questions + dm.test_questions if q in text] == []
    assert len(dm.val_questions) == 200 and len(dm.test_questions) == 300
    assert not {q for q, _ in dm.val_questions} & {q for q, _ in dm.test_questions}


def test_without_heldout_wordings_val_asks_trained_wordings_about_heldout_people():
    dm = BiographiesDataModule(num_people=40, heldout_templates=0, val_size=20)
    text = training_text(dm)
    trained = {t for templates in QUESTION_TEMPLATES.values() for t in templates}
    assert [q for q, _ in dm.val_questions + dm.test_questions if q in text] == []
    for q, _ in dm.val_questions + dm.test_questions:
        assert any(q == question(t, p) for t in trained for p in dm.heldout_people)


def test_batches_follow_the_reasoning_contract_and_exact_match_scores_them(dm):
    batch = dm.val_dataloader().collate_fn([dm.val_set[i] for i in range(4)])
    ids = dm.tokenizer.token_to_id
    for row in range(4):
        q, answer = dm.val_questions[row]
        plen = int(batch["prompt_len"][row])
        assert dm.decode(batch["tokens"][row, :plen]) == q
        gold = [t for t in batch["answer"][row].tolist() if t >= 0]
        assert dm.decode(gold) == "<ans> " + answer
        words = answer.split()
        right = [ids(w) for w in ["<ans>", *words, "<eos>", "<eos>"]]
        assert exact_match(right, gold, dm.eos_id) == (right[:-1], True)
        # a wrong last word, an answer cut short, a word before the answer's first: all wrong
        for wrong in (["<ans>", *words[:-1], "Boston" if words[-1] != "Boston" else "Denver"], ["<ans>", *words[:-1]],
                      ["<ans>", "Denver", *words]):
            assert not exact_match([ids(w) for w in wrong] + [dm.eos_id], gold, dm.eos_id)[1], wrong
    # a biography: every token trained, no prompt
    bio = next(item for item in dm.train_set if item["prompt_len"] == 0)
    assert all(m == 1.0 for m in bio["loss_mask"]) and bio["tokens"][-1] == dm.eos_id


def test_a_fit_step_then_answer_scoring_by_exact_match(tmp_path):
    from conftest import TINY_MODEL, run_cli
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--data", "configs/data/biographies.yaml",
                  *TINY_MODEL, "--data.init_args.num_people", "40", "--data.init_args.val_size", "20",
                  "--model.init_args.eval_examples", "4", steps=1)
    model, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == 1
    assert dm.check_answer([dm.answer_id], [dm.answer_id]) is None  # no verdict of the task's own: exact match
    right = {tuple(dm.encode(q)): dm.encode(a) for q, a in dm.test_questions[::2]}  # every other answer right

    def generate(prompts, budget, **options):  # each row's answer after its own prompt, as the ragged batch has it
        width = prompts.shape[1] + int(torch.as_tensor(budget).max())
        rows = []
        for prompt, n in zip(prompts.tolist(), options["prompt_lengths"].tolist()):
            answer = right.get(tuple(prompt[:n]), dm.encode("Boston Denver"))  # two cities: never an answer
            rows.append((prompt[:n] + [dm.answer_id, *answer] + [dm.eos_id] * width)[:width])
        return torch.tensor(rows)

    model.generate = generate
    tested = cli.trainer.test(model, datamodule=dm, verbose=False)[0]
    assert tested["test/accuracy"] == pytest.approx(len(right) / len(dm.test_questions))
