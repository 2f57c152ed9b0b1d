"""Synthetic biographies and questions about them: knowledge storage and extraction after the bioS data of
Allen-Zhu & Li ("Physics of Language Models: Part 3.1, Knowledge Storage and Extraction", arXiv:2309.14316), as a
reasoning task scored by exact match.

A population of `num_people` individuals with distinct names (first and last name), each with five attributes
drawn uniformly and independently: birth date, birth city, university, major and employer. The training text is

* every individual's biographies, `bios_per_person` of them (bioS "multi"): each attribute is one sentence, in one
  of four paraphrases drawn for each biography, the sentences in a random order (bioS "permute") and the full name
  in every sentence (bioS "fullname"), the augmentations that bioS found make knowledge extractable:
  ``Anya Forger is employed by Intel . Anya Forger was born on 2 October 1996 . ...``
* questions and answers about the first `qa_fraction` of the individuals (bioS: half), every attribute asked in
  every training wording: ``Which university did Anya Forger attend ? <ans> Rice University <eos>``.

The val and test questions ask about the other individuals, whose biographies are in the training text and whose
questions are not (bioS's split of the people: an answer has to be extracted from the biographies, it cannot be
recalled from a trained question), in wordings held out of training (the last `heldout_templates` of each
attribute's question templates): neither a held-out question nor its wording occurs in the training text, while
each of its words does. val/accuracy is the exact match of the generated answer, ``<ans>`` and the attribute's
words, as on every reasoning task (`objectives/decoding/scoring.py`).

Where this departs from bioS: there 100,000 individuals with three-part names, six attributes (the employer's city
too), pools of hundreds of values and dozens of sentence templates per attribute; here a few hundred people, pools
of 16 to 20 values and four paraphrases per attribute, so that a quickstart-sized model stores the facts within
minutes on a CPU. bioS fine-tunes on the questions after pretraining on the biographies (or mixes them in), in one
wording per attribute; here they are mixed into one training set, and the held-out wordings add a paraphrase shift
to the questions.

Batch contract: that of `datamodules/reasoning.py`. A question is the prompt (segment 0) and ``<ans>`` answer
``<eos>`` the trained answer (segment 1); a biography has no prompt (prompt_len 0) and is trained on every token
(segment 1, no answer row), so that an objective learns the biographies as text; num_steps is 0 (no reasoning
steps).
"""
from __future__ import annotations

import random

import lightning as L

from datamodules.reasoning import ReasoningDataModule, SequenceOptions, build_sequence, word_level_tokenizer

FIRST_NAMES = ["Anya", "Bruno", "Carlos", "Dana", "Elio", "Farah", "Gideon", "Hana", "Ivo", "Jolene", "Kofi", "Lena",
               "Mateo", "Nadia", "Oren", "Priya", "Quinn", "Rosa", "Soren", "Talia", "Umar", "Vera", "Wes", "Xenia",
               "Yusuf", "Zara", "Celia", "Dmitri", "Esme", "Felix"]
LAST_NAMES = ["Forger", "Abbott", "Brennan", "Castillo", "Delacroix", "Eriksen", "Fontaine", "Galloway", "Hartley",
              "Ibarra", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quintero",
              "Rahman", "Sandoval", "Takahashi", "Underwood", "Valdez", "Whitaker", "Yamamoto", "Zielinski",
              "Albright", "Baptiste", "Carrington", "Dunmore"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
VALUES = {
    "birth_city": ["Boston", "Denver", "Seattle", "Austin", "Chicago", "Phoenix", "Portland", "Atlanta", "Detroit",
                   "Miami", "Dallas", "Houston", "Memphis", "Omaha", "Tucson", "Raleigh", "Fresno", "Tampa",
                   "Buffalo", "Spokane"],
    "university": [f"{name} University" for name in ("Cornell", "Stanford", "Rice", "Duke", "Purdue", "Brown",
                                                     "Emory", "Tufts", "Vanderbilt", "Yale", "Harvard", "Princeton",
                                                     "Columbia", "Northwestern", "Baylor", "Auburn")],
    "major": ["Physics", "Chemistry", "Biology", "Economics", "History", "Philosophy", "Mathematics", "Linguistics",
              "Sociology", "Geology", "Astronomy", "Music", "Architecture", "Nursing", "Psychology", "Statistics",
              "Computer Science", "Electrical Engineering", "Civil Engineering", "Political Science"],
    "employer": ["Intel", "Boeing", "Pfizer", "Oracle", "Nike", "Ford", "Cisco", "Target", "Costco", "Walmart",
                 "Adobe", "Netflix", "Visa", "Moderna", "Honeywell", "Caterpillar", "Starbucks", "Qualcomm",
                 "Salesforce", "Verizon"],
}
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")

# four paraphrases of each attribute's sentence
BIO_TEMPLATES = {
    "birth_date": ["{name} was born on {value} .", "{name} came into this world on {value} .",
                   "{name} 's date of birth is {value} .", "The birth date of {name} is {value} ."],
    "birth_city": ["{name} was born in {value} .", "{name} spent the early years of life in {value} .",
                   "{name} is a native of {value} .", "The birth city of {name} is {value} ."],
    "university": ["{name} studied at {value} .", "{name} graduated from {value} .",
                   "{name} received an education at {value} .", "{name} attended {value} ."],
    "major": ["{name} majored in {value} .", "{name} completed a degree in {value} .",
              "{name} chose {value} as a field of study .", "The major of {name} was {value} ."],
    "employer": ["{name} works for {value} .", "{name} is employed by {value} .", "{name} has a job at {value} .",
                 "The employer of {name} is {value} ."],
}
# the question wordings of each attribute; the last `heldout_templates` are kept out of training (each uses only
# words the training text has, in an order it does not)
QUESTION_TEMPLATES = {
    "birth_date": ["When was {name} born ?", "What is the birth date of {name} ?",
                   "What is the date of birth of {name} ?"],
    "birth_city": ["Where was {name} born ?", "What is the birth city of {name} ?", "Which city was {name} born in ?"],
    "university": ["Which university did {name} attend ?", "Where did {name} study ?",
                   "Which university did {name} study at ?"],
    "major": ["What was the major of {name} ?", "Which field did {name} study ?", "What did {name} major in ?"],
    "employer": ["Who employs {name} ?", "Which company does {name} work for ?", "Where does {name} work ?"],
}


def draw_people(rng: random.Random, num_people: int) -> list[dict[str, str]]:
    """`num_people` individuals with distinct names and their attributes (each value a string of words)."""
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], num_people)
    people = []
    for name in names:
        person = {"name": name, "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 1999)}"}
        person.update({attribute: rng.choice(pool) for attribute, pool in VALUES.items()})
        people.append(person)
    return people


def biography(rng: random.Random, person: dict[str, str]) -> str:
    """One biography: every attribute in a paraphrase drawn here, the sentences in a random order."""
    sentences = [rng.choice(BIO_TEMPLATES[a]).format(name=person["name"], value=person[a]) for a in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join(sentences)


def question(template: str, person: dict[str, str]) -> str:
    return template.format(name=person["name"])


class BiographiesDataModule(ReasoningDataModule):
    """Biographies of a synthetic population and questions about it (see the module's docstring), served by
    ReasoningDataModule's word-level vocabulary, loaders, decoding and checkpoint state.

    Args:
        num_people: individuals in the population (at most 900 distinct names).
        bios_per_person: biographies of each individual in the training text.
        qa_fraction: the share of the individuals whose questions are in the training text; the others' questions
            are the val and test sets.
        heldout_templates: question wordings per attribute kept out of training and used by val and test (0: val
            and test ask in the training wordings, about the held-out individuals).
        val_size: val questions; the test split has the held-out individuals' other questions (at most
            test_size of them).
        test_size: the most test questions (None: all that are left).
        train_size: the first train_size training sequences (biographies and questions shuffled together) for
            smoke tests; None: all of them.
        batch_size, num_workers: loader settings.
        seed: seeds the population, the biographies and the splits.
    """

    def __init__(self, num_people: int = 200, bios_per_person: int = 4, qa_fraction: float = 0.5,
                 heldout_templates: int = 1, val_size: int = 200, test_size: int | None = None,
                 train_size: int | None = None, batch_size: int = 32, seed: int = 0, num_workers: int = 0):
        # ReasoningDataModule's vocabulary, loaders, decoding and checkpoint state serve this data unchanged; its
        # constructor, which draws a task generator's examples, does not
        L.LightningDataModule.__init__(self)
        self.save_hyperparameters({k: v for k, v in locals().items() if k != "self"})  # named: no super() call to find
        names = len(FIRST_NAMES) * len(LAST_NAMES)
        wordings = min(len(t) for t in QUESTION_TEMPLATES.values())
        if not 2 <= num_people <= names or bios_per_person < 1 or not 0 < qa_fraction < 1:
            raise ValueError(f"biographies need 2 <= num_people <= {names}, bios_per_person >= 1 and 0 < qa_fraction "
                             f"< 1; got {num_people}, {bios_per_person}, {qa_fraction}")
        if not 0 <= heldout_templates < wordings:
            raise ValueError(f"heldout_templates={heldout_templates}: each attribute has {wordings} question wordings "
                             f"and training needs at least one, so 0 <= heldout_templates < {wordings}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.stream, self.generator = False, None

        rng = random.Random(f"biographies/{seed}")
        self.people = draw_people(rng, num_people)
        cut = round(qa_fraction * num_people)
        self.qa_people, self.heldout_people = self.people[:cut], self.people[cut:]
        if not self.qa_people or not self.heldout_people:
            raise ValueError(f"qa_fraction={qa_fraction} of {num_people} people leaves one group empty")
        self.train_wordings = {a: t[: len(t) - heldout_templates] for a, t in QUESTION_TEMPLATES.items()}
        self.heldout_wordings = {a: t[len(t) - heldout_templates :] or t for a, t in QUESTION_TEMPLATES.items()}

        # the training text: biographies of everyone, the QA people's questions in every training wording
        self.biographies = [biography(rng, p) for p in self.people for _ in range(bios_per_person)]
        self.train_questions = [(question(t, p), p[a]) for p in self.qa_people for a in ATTRIBUTES
                                for t in self.train_wordings[a]]
        # the held-out people's questions, one per attribute in a held-out wording, shuffled into val and test
        heldout = [(question(rng.choice(self.heldout_wordings[a]), p), p[a]) for p in self.heldout_people
                   for a in ATTRIBUTES]
        rng.shuffle(heldout)
        if not 0 < val_size < len(heldout):
            raise ValueError(f"val_size={val_size}: the held-out people have {len(heldout)} questions, shared by val "
                             f"and test; give 0 < val_size < {len(heldout)}")
        self.val_questions = heldout[:val_size]
        self.test_questions = heldout[val_size:][:test_size]

        texts = self.biographies + [f"{q} {a}" for q, a in self.train_questions + heldout]
        self._set_tokenizer(word_level_tokenizer(sorted({w for text in texts for w in text.split()})), word_level=True)
        self.train_set = [self.text_item(b) for b in self.biographies]
        self.train_set += [self.question_item(q, a) for q, a in self.train_questions]
        random.Random(f"biographies/{seed}/order").shuffle(self.train_set)  # train_size takes a mix of both kinds
        self.train_set = self.train_set[:train_size]
        self.val_set = [self.question_item(q, a) for q, a in self.val_questions]
        self.test_set = [self.question_item(q, a) for q, a in self.test_questions]
        self.seq_len = max(len(item["tokens"]) for item in self.train_set + self.val_set + self.test_set)
        self.bytes_per_token = 0.0  # a word-level vocabulary: no val/bpb

    def encode(self, text: str) -> list[int]:
        return [self.tokenizer.token_to_id(w) for w in text.split()]

    def text_item(self, text: str) -> dict:
        """A biography as a training sequence: every token trained, no prompt, no answer row."""
        tokens = self.encode(text) + [self.eos_id]
        return {"tokens": tokens, "segments": [1] * len(tokens), "loss_mask": [1.0] * len(tokens), "prompt_len": 0,
                "answer": [], "num_steps": 0}

    def question_item(self, text: str, answer: str) -> dict:
        """A question as a sequence: the prompt, then ``<ans>`` answer ``<eos>`` trained (the reasoning contract)."""
        return build_sequence(self.encode(text), [], self.encode(answer), self.ids, SequenceOptions(train_on="answer"))
