"""Reasoning and planning tasks as a Lightning datamodule: path-star graphs, ProsQA-style DAG questions,
k-digit multiplication with partial products, Countdown, and JSON/JSONL files of ``{"question", "steps",
"answer"}``.

Every example is a question, a list of reasoning steps and an answer, each a list of tokens from a small
fixed word-level vocabulary (no BPE for the generated tasks). A training sequence is::

    question tokens | step 0 tokens <step> | step 1 tokens <step> | ... | <ans> answer tokens <eos>

Tasks
-----
* **path-star** G(d, l, N): Bachmann & Nagarajan 2024, "The Pitfalls of Next-Token Prediction" (ICML 2024,
  arXiv:2403.06963). A source node with ``d`` arms of ``l`` nodes each (the source plus ``l - 1`` fresh nodes
  per arm), labels drawn without replacement from ``{0..N-1}``, the edge list shuffled. Prompt =
  ``u v | u v | ... / source goal``; answer = the path source -> goal (``l`` nodes). No reasoning steps.
* **ProsQA**: the DAG questions of Coconut (Hao et al. 2024, "Training Large Language Models to Reason in a
  Continuous Latent Space", arXiv:2412.06769, Appendix, Algorithm 1): concept nodes added one at a time, each
  with Poisson(1.5) parents chosen by depth-weighted sampling, the two candidate concepts being the first two
  nodes; "Every X is a Y ." facts for the edges, "Tom is a X ." facts for the entity; the question asks
  whether the entity is concept A or concept B; the steps are the facts along a shortest path from the
  entity to the right concept; the answer names it ("Tom is a A ."). Task "prosqa" (`ProsQATask`, below): one
  entity and a fixed number of concept nodes. Task "prosqa_alg1" (`datamodules/prosqa.py`): Algorithm 1 closer
  to the public set, with several entities, graphs of varying size and its shares of 3 to 6 steps.
* **multiplication**: k-digit by k-digit multiplication with the k partial products ``a * b_i * 10**i`` as the
  reasoning steps, as in the implicit chain-of-thought work (Deng et al. 2023, "Implicit Chain of Thought
  Reasoning via Knowledge Distillation", arXiv:2311.01460; Deng et al. 2024, "From Explicit CoT to Implicit
  CoT", arXiv:2405.14838), digits written least-significant first by default as they do.
* **countdown** (`datamodules/countdown.py`): reach a target from `num_numbers` given numbers with + - * /; the
  steps are ``a op b = c``, and any valid solution counts (the task checks a generated solution).
* **file**: JSON (a list) or JSONL files of ``{"question", "steps", "answer"}`` records, the shape of the public
  ProsQA, ProntoQA and GSM8k-Aug releases; a word-level vocabulary built from the train split (held-out words
  become ``<unk>``, counted in `unknown_tokens`), or a given ``tokenizer.json`` (tokenizers library). The files
  are the splits as they are; only a val split is held out of the train file where no val file is given.

Batch contract (dict of tensors, right-padded)
----------------------------------------------
``tokens`` [B, L] long; ``loss_mask`` [B, L] float, 1 where tokens[t] is a training target (an objective
predicts tokens[:, 1:] from tokens[:, :-1] weighted by loss_mask[:, 1:]); ``segments`` [B, L] long: -1 padding,
0 prompt, 1 answer (``<ans>``, answer tokens, ``<eos>``), 2 + k reasoning step k (its tokens and its ``<step>``);
``prompt_len`` [B] long; ``answer`` [B, A] long = ``<ans>`` + answer tokens (no ``<eos>``), padded with -1;
with ``teacherless`` also ``inputs`` [B, L] long = tokens with the answer tokens replaced by ``<dummy>``; with a
byte-level BPE ``tokenizer.json`` also ``token_bytes`` [B, L] long, each token's UTF-8 bytes (0 for specials), for
bits per byte (a word-level vocabulary has none: its tokens do not add up to the text's bytes).
Exact match: the generation after the prompt, cut at the first ``<eos>``, ends with the unpadded answer row.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.countdown import CountdownTask
from datamodules.prosqa import ProsQAGraphTask
from datamodules.tasks import (ANS, DUMMY, EOS, PAD, SPECIALS, STEP, UNK, Example, MultiplicationTask, PathStarTask,
                               ProsQATask, example_rng, full_length, key_hash)
from datamodules.text import token_byte_lengths

RECORD_HINT = (
    'a JSON list or a JSONL file of {"question": str, "steps": [str, ...], "answer": str} records'
)


# ----------------------------------------------------------------------------------------------------------
# Files and vocabularies
# ----------------------------------------------------------------------------------------------------------


def load_records(path: str) -> list[dict]:
    """Read a JSON list or JSONL file of ``{"question", "steps", "answer"}`` records (steps optional)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"reasoning data file {path!r} does not exist: pass train_file= (and optionally val_file=, "
            f"test_file=) pointing to {RECORD_HINT}"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"reasoning data file {path!r} is empty: it must hold {RECORD_HINT}")
    if stripped[0] == "[":
        raw = json.loads(stripped)
    else:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e}); expected {RECORD_HINT}") from e
    if not raw:
        raise ValueError(f"reasoning data file {path!r} holds no records: it must hold {RECORD_HINT}")
    out = []
    for n, r in enumerate(raw):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise ValueError(f"{path}: record {n} lacks 'question' or 'answer'; expected {RECORD_HINT}")
        steps = r.get("steps") or []
        if isinstance(steps, str):
            steps = [steps]
        out.append({"question": str(r["question"]), "steps": [str(s) for s in steps], "answer": str(r["answer"])})
    return out


def word_level_tokenizer(words: Sequence[str]):
    """A `tokenizers` WordLevel tokenizer (Whitespace pre-tokenizer) with SPECIALS as ids 0..5, then `words`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def _records_vocab(records: Sequence[dict]) -> list[str]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for r in records:
        for text in [r["question"], r["answer"], *r["steps"]]:
            for w, _ in pre.pre_tokenize_str(text):
                counts[w] = counts.get(w, 0) + 1
    return sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w], w))


# ----------------------------------------------------------------------------------------------------------
# Sequences and batches
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    step: int
    ans: int
    dummy: int


@dataclass(frozen=True)
class SequenceOptions:
    train_on: str = "steps+answer"  # or "answer", or "all" (the question's tokens too)
    include_steps: bool = True
    reverse_answer: bool = False
    teacherless: bool = False


def build_sequence(question: Sequence[int], steps: Sequence[Sequence[int]], answer: Sequence[int],
                   ids: SpecialIds, opts: SequenceOptions) -> dict[str, list[int]]:
    """One example's lists: tokens, segments, loss_mask, prompt_len, answer (and inputs if teacherless)."""
    answer = list(answer)[::-1] if opts.reverse_answer else list(answer)
    tokens, segments = list(question), [0] * len(question)
    if opts.include_steps:
        for k, s in enumerate(steps):
            tokens += list(s) + [ids.step]
            segments += [2 + k] * (len(s) + 1)
    start = len(tokens) + 1  # first answer token
    tokens += [ids.ans] + answer + [ids.eos]
    segments += [1] * (len(answer) + 2)
    trained = {"answer": lambda g: g == 1, "steps+answer": lambda g: g >= 1, "all": lambda g: g >= 0}[opts.train_on]
    out = {
        "tokens": tokens,
        "segments": segments,
        "loss_mask": [1.0 if trained(g) else 0.0 for g in segments],
        "prompt_len": len(question),
        "answer": [ids.ans] + answer,
        "num_steps": len(steps),  # the worked solution's, written or not (a no-CoT batch has the same questions)
    }
    if opts.teacherless:
        out["inputs"] = tokens[:start] + [ids.dummy] * len(answer) + tokens[start + len(answer):]
    return out


def collate(items: list[dict], pad_id: int, token_bytes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of `build_sequence` outputs into the batch contract (with `token_bytes` [V], bytes per
    token id, also each token's bytes)."""
    B, T = len(items), max(len(it["tokens"]) for it in items)
    A = max(len(it["answer"]) for it in items)
    batch = {
        "tokens": torch.full((B, T), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(B, T),
        "segments": torch.full((B, T), -1, dtype=torch.long),
        "prompt_len": torch.tensor([it["prompt_len"] for it in items], dtype=torch.long),
        "answer": torch.full((B, A), -1, dtype=torch.long),
        "num_steps": torch.tensor([it["num_steps"] for it in items], dtype=torch.long),
    }
    if "inputs" in items[0]:
        batch["inputs"] = torch.full((B, T), pad_id, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["tokens"])
        batch["tokens"][b, :n] = torch.tensor(it["tokens"])
        batch["loss_mask"][b, :n] = torch.tensor(it["loss_mask"])
        batch["segments"][b, :n] = torch.tensor(it["segments"])
        batch["answer"][b, : len(it["answer"])] = torch.tensor(it["answer"])
        if "inputs" in batch:
            batch["inputs"][b, :n] = torch.tensor(it["inputs"])
    if token_bytes is not None:
        batch["token_bytes"] = token_bytes[batch["tokens"]]
    return batch


class _Collate:  # picklable for worker processes
    def __init__(self, pad_id: int, token_bytes: torch.Tensor | None = None):
        self.pad_id, self.token_bytes = pad_id, token_bytes

    def __call__(self, items):
        return collate(items, self.pad_id, self.token_bytes)


Encoded = tuple[list[int], list[list[int]], list[int]]


class EncodedDataset(Dataset):
    """A fixed list of encoded examples."""

    def __init__(self, examples: list[Encoded], ids: SpecialIds, opts: SequenceOptions):
        self.examples, self.ids, self.opts = examples, ids, opts

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return build_sequence(*self.examples[i], self.ids, self.opts)


class GeneratedDataset(Dataset):
    """Training examples of a generator: item i is a deterministic function of (seed, i), redrawn while its
    key hash is among the held-out (val/test) hashes or it is longer than the task allows."""

    def __init__(self, task, size: int, seed: int, exclude: set[bytes], encode, ids: SpecialIds,
                 opts: SequenceOptions, split: str = "train"):
        self.task, self.size, self.seed, self.exclude = task, size, seed, exclude
        self.encode, self.ids, self.opts, self.split = encode, ids, opts, split

    def __len__(self):
        return self.size

    def example(self, i: int) -> Example:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return draw(self.task, self.seed, self.split, i, self.exclude, self.encode)[0]

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return build_sequence(*draw(self.task, self.seed, self.split, i, self.exclude, self.encode)[1],
                              self.ids, self.opts)


def draw(task, seed: int, split: str, index: int, exclude: set[bytes], encode,
         max_attempts: int = 1000) -> tuple[Example, Encoded]:
    for attempt in range(max_attempts):
        ex = task.sample(example_rng(seed, split, index, attempt), split)
        if key_hash(ex.key) in exclude:
            continue
        enc = encode(ex)
        if full_length((len(enc[0]), [len(s) for s in enc[1]], len(enc[2]))) > task.max_len():
            continue
        return ex, enc
    raise RuntimeError(
        f"{task.name}: no new example for {split}[{index}] after {max_attempts} draws; the task has too few "
        f"distinct problems for the requested val_size/test_size (or max_seq_len is too small)"
    )


# ----------------------------------------------------------------------------------------------------------
# The datamodule
# ----------------------------------------------------------------------------------------------------------

Task = Literal["path_star", "prosqa", "prosqa_alg1", "multiplication", "countdown", "file"]


class ReasoningDataModule(L.LightningDataModule):
    """Reasoning / planning tasks with fixed val and test sets and a generated (or fixed-size) train set.

    Args:
        task: "path_star", "prosqa" (`ProsQATask`: one entity, a fixed number of concept nodes), "prosqa_alg1"
            (`datamodules/prosqa.py`: Algorithm 1 with several entities and the public set's 3-6 step shares),
            "multiplication", "countdown" (`datamodules/countdown.py`) or "file".
        degree: path-star arms d.
        path_length: path-star nodes per arm l, source included.
        num_nodes: path-star number of node labels N (default 50); "prosqa" number of concept nodes in the DAG;
            "prosqa_alg1" mean number of graph nodes, entities included (both default 23, the mean graph size of
            the public ProsQA set). Not a Countdown option (see num_numbers).
        graph_nodes, step_shares, test_steps, concepts, syntax: "prosqa_alg1" only (ProsQA-mini,
            `configs/data/prosqa_mini.yaml`): the range [lo, hi] of graph sizes (instead of num_nodes), the
            {steps: share} of training and val questions, the test split's step count, the size of the concept
            name pool, and "words" or "compact" syntax (`datamodules/prosqa.py`).
        num_numbers: Countdown: how many numbers a question gives (default 3, Countdown-3); a solution has
            num_numbers - 1 steps.
        max_number, max_value, min_solutions: Countdown: the given numbers are drawn from 1..max_number (default
            20), every result is at most max_value (default 100), and every problem has at least min_solutions
            distinct solutions (default 2; `datamodules/countdown.py`).
        reverse_answer: write the answer tokens in reverse order (path-star: the path goal-first).
        teacherless: add `inputs` = tokens with the answer tokens replaced by <dummy> (Bachmann & Nagarajan's
            teacherless training: every answer token is predicted from the prompt alone).
        digits: multiplication operand digits k.
        reverse_digits: multiplication numbers written least-significant digit first.
        max_seq_len: ProsQA: graphs whose full sequence is longer are redrawn (default 384); files: records
            longer are dropped with a warning (default: no limit).
        train_file, val_file, test_file: task "file": JSON or JSONL records; the files are the splits, whatever
            their size, and train_size/val_size/test_size are not used. Without val_file, a tenth of the shuffled
            train file (at most 500 records) is held out as the val split; without test_file there is no test
            split (`train.py test` then asks for test_file).
        tokenizer_path: task "file": a `tokenizers` tokenizer.json to use instead of a word-level vocabulary
            built from the files (missing special tokens are added to it).
        train_size: generated tasks: number of train examples, or None for a fresh stream of `stream_size` items.
        val_size, test_size: generated tasks: sizes of the fixed held-out sets (disjoint from train and from each
            other), default 500 and 1000.
        stream_size: nominal length of the generated train stream (an epoch).
        batch_size, num_workers: loader settings.
        seed: seeds everything the data depends on.
        train_on: "steps+answer", "answer" (<ans>, answer tokens and <eos>) or "all" (every token, the question's
            too: what a right-to-left companion needs, which reads the answer before the question).
        format: "cot" (steps then answer) or "no_cot" (answer only).
        include_steps: if given, overrides `format` (False = drop the steps).
    """

    def __init__(
        self,
        task: Task = "path_star",
        degree: int = 2,
        path_length: int = 5,
        num_nodes: int | None = None,
        num_numbers: int | None = None,
        max_number: int | None = None,
        max_value: int | None = None,
        min_solutions: int | None = None,
        graph_nodes: list[int] | None = None,
        step_shares: dict[int, float] | None = None,
        test_steps: int | None = None,
        concepts: int | None = None,
        syntax: Literal["words", "compact"] = "words",
        reverse_answer: bool = False,
        teacherless: bool = False,
        digits: int = 4,
        reverse_digits: bool = True,
        max_seq_len: int | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        tokenizer_path: str | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        stream_size: int = 1_000_000,
        batch_size: int = 64,
        seed: int = 0,
        train_on: Literal["answer", "steps+answer", "all"] = "steps+answer",
        format: Literal["cot", "no_cot"] = "cot",
        include_steps: bool | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_on not in ("answer", "steps+answer", "all"):
            raise ValueError(f"train_on must be 'answer', 'steps+answer' or 'all', got {train_on!r}")
        if format not in ("cot", "no_cot"):
            raise ValueError(f"format must be 'cot' or 'no_cot', got {format!r}")
        self.task_name, self.seed = task, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.opts = SequenceOptions(
            train_on=train_on,
            include_steps=(format == "cot") if include_steps is None else include_steps,
            reverse_answer=reverse_answer,
            teacherless=teacherless,
        )
        if task == "countdown" and num_nodes is not None:
            raise ValueError(f"num_nodes={num_nodes} is not a Countdown option: give how many numbers a question has "
                             f"as data.init_args.num_numbers")
        countdown_options = {"num_numbers": num_numbers, "max_number": max_number, "max_value": max_value,
                             "min_solutions": min_solutions}
        for name, value in countdown_options.items():
            if task not in ("countdown", "file") and value is not None:
                raise ValueError(f"{name}={value} is a Countdown option (task='countdown'), not one of "
                                 f"task={task!r}: leave it out")
        graph_options = {"graph_nodes": graph_nodes, "step_shares": step_shares, "test_steps": test_steps,
                         "concepts": concepts, "syntax": None if syntax == "words" else syntax}
        given = ", ".join(f"{k}={v}" for k, v in graph_options.items() if v is not None)
        if task != "prosqa_alg1" and given:
            raise ValueError(f"{given}: options of task='prosqa_alg1' (ProsQA-mini), not of task={task!r}: leave "
                             f"them out")
        if task == "file":
            sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
            unused = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
            if unused:
                rank_zero_info(f"task='file': the files are the splits; {unused} (sizes of generated tasks) not used")
            self._init_file(train_file, val_file, test_file, tokenizer_path, max_seq_len)
        elif task in ("path_star", "prosqa", "prosqa_alg1", "multiplication", "countdown"):
            if task == "path_star":
                gen = PathStarTask(degree, path_length, 50 if num_nodes is None else num_nodes)
            elif task == "prosqa":
                gen = ProsQATask(23 if num_nodes is None else num_nodes, 384 if max_seq_len is None else max_seq_len)
            elif task == "prosqa_alg1":  # several entities, 3..6 steps, the public set's statistics (prosqa.py)
                gen = ProsQAGraphTask(23 if num_nodes is None else num_nodes,
                                      384 if max_seq_len is None else max_seq_len,
                                      tuple(graph_nodes) if graph_nodes is not None else None, step_shares,
                                      test_steps, concepts, syntax)
            elif task == "countdown":
                gen = CountdownTask(**{k: v for k, v in countdown_options.items() if v is not None})
            else:
                gen = MultiplicationTask(digits, reverse_digits)
            self._init_generated(gen, train_size, 500 if val_size is None else val_size,
                                 1000 if test_size is None else test_size, stream_size)
        else:
            raise ValueError(f"task must be one of path_star, prosqa, prosqa_alg1, multiplication, countdown, file; "
                             f"got {task!r}")
        self.bytes_per_token = self._bytes_per_token()

    # -- construction ---------------------------------------------------------------------------------------

    def _set_tokenizer(self, tok, word_level: bool):
        self.tokenizer, self.word_level = tok, word_level
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        tid = tok.token_to_id
        self.pad_id, self.eos_id, self.unk_id = tid(PAD), tid(EOS), tid(UNK)
        self.step_id, self.answer_id, self.dummy_id = tid(STEP), tid(ANS), tid(DUMMY)
        self.ids = SpecialIds(self.pad_id, self.eos_id, self.step_id, self.answer_id, self.dummy_id)
        # what train.py links into the objective (model.init_args.special_ids)
        self.special_ids = {"pad": self.pad_id, "eos": self.eos_id, "step": self.step_id, "answer": self.answer_id,
                            "dummy": self.dummy_id}
        self._itos = [tok.id_to_token(i) for i in range(self.vocab_size)]
        lengths = None if word_level else token_byte_lengths(tok)
        self.token_bytes = None if lengths is None else torch.from_numpy(lengths)

    def _init_generated(self, gen, train_size, val_size, test_size, stream_size):
        self.generator = gen
        self._set_tokenizer(word_level_tokenizer(gen.vocab()), word_level=True)
        self._encode = _StoiEncoder({t: i for i, t in enumerate(self._itos)})
        exclude: set[bytes] = set()
        held = {}
        for split, n in (("test", test_size), ("val", val_size)):
            exs, encs = [], []
            for i in range(n):
                ex, enc = draw(gen, self.seed, split, i, exclude, self._encode)
                exclude.add(key_hash(ex.key))  # no duplicates within or across held-out sets
                exs.append(ex)
                encs.append(enc)
            held[split] = (exs, encs)
        self.heldout_hashes = frozenset(exclude)
        self.test_examples, self.val_examples = held["test"][0], held["val"][0]
        self.test_set = EncodedDataset(held["test"][1], self.ids, self.opts)
        self.val_set = EncodedDataset(held["val"][1], self.ids, self.opts)
        self.stream = train_size is None
        self.train_set = GeneratedDataset(gen, stream_size if train_size is None else train_size, self.seed,
                                          set(exclude), self._encode, self.ids, self.opts)
        self.seq_len = gen.max_len()

    def _init_file(self, train_file, val_file, test_file, tokenizer_path, max_seq_len):
        if not train_file:
            raise ValueError(f"task='file' needs train_file= (and optionally val_file=, test_file=): {RECORD_HINT}")
        train = load_records(train_file)
        test = load_records(test_file) if test_file else []
        if val_file:
            val = load_records(val_file)
        else:  # a tenth of the shuffled train file (at most 500 records) held out
            if len(train) < 2:
                raise ValueError(f"{train_file}: {len(train)} record cannot give a val split and leave one for "
                                 f"training; pass val_file=")
            order = list(range(len(train)))
            random.Random(f"{self.seed}/file-split").shuffle(order)
            take = max(1, min(500, len(train) // 10))
            val, train = [train[i] for i in order[:take]], [train[i] for i in order[take:]]
        heldout = {key_hash(r["question"]) for r in val + test}
        kept = [r for r in train if key_hash(r["question"]) not in heldout]
        if len(kept) < len(train):
            warnings.warn(f"{train_file}: dropped {len(train) - len(kept)} train records whose question is in val/test")
        train = kept
        if not train:
            raise ValueError(f"{train_file}: no train records left; it must hold {RECORD_HINT}")
        if tokenizer_path:
            if not os.path.isfile(tokenizer_path):
                raise FileNotFoundError(
                    f"tokenizer file {tokenizer_path!r} does not exist: pass tokenizer_path= a tokenizers "
                    f"tokenizer.json, or leave it out for a word-level vocabulary built from the data files"
                )
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(tokenizer_path)
            missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
            if missing:
                tok.add_special_tokens(missing)
            self._set_tokenizer(tok, word_level=False)
        else:
            # the vocabulary comes from the train split alone: held-out words are <unk>, as they would be
            self._set_tokenizer(word_level_tokenizer(_records_vocab(train)), word_level=True)
        self.heldout_hashes = frozenset(heldout)
        self.stream = False
        self.generator = None
        sets = {}
        longest = 0
        for split, recs in (("train", train), ("val", val), ("test", test)):
            encs = self._encode_records(recs)
            if max_seq_len is not None:
                ok = [e for e in encs if full_length((len(e[0]), [len(s) for s in e[1]], len(e[2]))) <= max_seq_len]
                if len(ok) < len(encs):
                    warnings.warn(
                        f"{split}: dropped {len(encs) - len(ok)} records longer than max_seq_len={max_seq_len}"
                    )
                encs = ok
            for e in encs:
                longest = max(longest, full_length((len(e[0]), [len(s) for s in e[1]], len(e[2]))))
            sets[split] = encs
        if self.word_level:
            self.unknown_tokens = {split: self._count_unknown(sets[split]) for split in ("val", "test")}
            for split, (unknown, total) in self.unknown_tokens.items():
                if total:
                    rank_zero_info(f"{split}: {unknown} of {total} tokens ({unknown / total:.2%}) are not in the "
                                   f"train split's vocabulary and read as {UNK}")
        self.train_set = EncodedDataset(sets["train"], self.ids, self.opts)
        self.val_set = EncodedDataset(sets["val"], self.ids, self.opts)
        self.test_set = EncodedDataset(sets["test"], self.ids, self.opts)
        self.seq_len = longest

    def _encode_records(self, recs: list[dict]) -> list[Encoded]:
        if not recs:
            return []
        enc = lambda texts: [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        qs = enc([r["question"] for r in recs])
        ans = enc([r["answer"] for r in recs])
        flat = enc([s for r in recs for s in r["steps"]]) if any(r["steps"] for r in recs) else []
        out, j = [], 0
        for q, a, r in zip(qs, ans, recs):
            out.append((q, flat[j : j + len(r["steps"])], a))
            j += len(r["steps"])
        return out

    def _count_unknown(self, encoded: list[Encoded]) -> tuple[int, int]:
        """(tokens read as <unk>, all tokens) of encoded records."""
        ids = [t for q, steps, a in encoded for t in [*q, *(t for st in steps for t in st), *a]]
        return sum(t == self.unk_id for t in ids), len(ids)

    def _bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the val split's trained tokens (byte-level BPE only); 0.0 where undefined (a
        word-level vocabulary: its tokens do not add up to the text's bytes), and no val/bpb is logged."""
        if self.token_bytes is None:
            return 0.0
        n_bytes = n_tok = 0
        for i in range(min(len(self.val_set), 256)):
            item = self.val_set[i]
            mask = torch.tensor(item["loss_mask"])
            n_bytes += float((self.token_bytes[torch.tensor(item["tokens"])] * mask).sum())
            n_tok += float(mask.sum())
        return n_bytes / max(n_tok, 1)

    # -- public API -----------------------------------------------------------------------------------------

    @property
    def chance_accuracy(self) -> float | None:
        """val/accuracy of a guess among the answers a question allows: path-star 1/degree (an arm picked at random
        and followed to its end, the plateau Bachmann & Nagarajan report for next-token prediction), ProsQA 0.5 (one
        of the two concepts the question names); None where no such figure is simple (Countdown, multiplication,
        files)."""
        if self.task_name == "path_star":
            return 1 / self.generator.d
        return 0.5 if self.task_name in ("prosqa", "prosqa_alg1") else None

    def check_answer(self, prompt_ids, generated_ids) -> bool | None:
        """The task's own verdict on a generated solution where it has one (Countdown evaluates the steps, so any
        valid solution counts); None: answer scoring uses exact match."""
        check = getattr(getattr(self, "generator", None), "check", None)
        return None if check is None else check(self.decode(prompt_ids).split(), self.decode(generated_ids).split())

    def decode(self, ids) -> str:
        """Token ids (list or tensor) -> text; padding (and -1 fill) dropped, specials kept."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [i for i in ids if i >= 0 and i != self.pad_id]
        if self.word_level:
            return " ".join(self._itos[i] for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("tokenizer")
        if saved is not None and saved != self.tokenizer.to_str():
            warnings.warn(
                "the checkpoint's tokenizer differs from this datamodule's vocabulary; token ids may not match "
                "the model's embeddings (same task options and data files give the same vocabulary)"
            )

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=not self.stream,
                          num_workers=self.num_workers, collate_fn=_Collate(self.pad_id, self.token_bytes),
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, ds):
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_Collate(self.pad_id, self.token_bytes), persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        if not len(self.test_set):
            raise ValueError("there is no test split: pass data.init_args.test_file (task 'file': only a test file "
                             "gives one), or a test_size above 0 (generated tasks)")
        return self._eval_loader(self.test_set)


class _StoiEncoder:  # picklable (a closure is not, for worker processes)
    def __init__(self, stoi: dict[str, int]):
        self.stoi = stoi

    def __call__(self, ex: Example) -> Encoded:
        s = self.stoi
        return [s[t] for t in ex.question], [[s[t] for t in st] for st in ex.steps], [s[t] for t in ex.answer]
