"""The synthetic tasks of the Mamba paper, section 4.1 (Gu & Dao 2023, arXiv:2312.00752), as Lightning datamodules.

* **Selective copying** (sec. 4.1.1, appendix E.1): `num_tokens` data tokens scattered at random positions of a
  stretch of noise tokens; after a delimiter the model writes the data tokens in order. Unlike plain copying
  the spacing varies, so a time-invariant (convolutional) model cannot solve it: the model has to select by
  content.
* **Induction heads** (sec. 4.1.2; Olsson et al. 2022): random tokens, a special key token at a random place
  followed by a value token; the sequence ends with the key again and the model must recall the value. Trained
  at length 256 with a vocabulary of 16, and evaluated at other lengths (length generalisation: `test_seq_len`,
  one length or several).

Dense supervision (`recurrences`, training examples only). The paper's example supervises one token in 256 (the
answer; the eos is free), and its models train for 200k-400k steps. With `recurrences` R > 0 a training example
has the key come back k times between the pair and the final query, k drawn uniformly from 0..R, each time followed
by the value, and every such value is supervised: (k + 1) answers per example, R/2 + 1 on average. The pair's
position is drawn as in the paper and the recurrences fall in random non-overlapping places after it. Why this
shape: every supervised value is the same induction step as the test's (find the key's previous occurrence, copy
what followed), so nothing else can be learned from them; with a single key, more recurrences mean shorter gaps
between occurrences, and the test asks for the paper's long gaps (up to the whole prompt, and 16x that), so k is
drawn from 0..R rather than fixed: a share 1/(R+1) of the examples is the paper's own, long gap included. Val and
test examples are always the paper's (k = 0): the measured task does not change.

Vocabulary (`vocab` task tokens, 16 by default, plus the end-of-sequence token):
    induction heads:   data 0 .. vocab-2, key vocab-1;      selective copying: noise 0, data 1 .. vocab-2,
                                                                               delimiter vocab-1;
    eos = vocab (so `vocab_size` = vocab + 1).

An example is ``prompt (seq_len tokens) | answer | <eos>``:
    induction heads:   prompt = x_0 .. x_{seq_len-2} with x_p = key, x_{p+1} = value, and x_{seq_len-1} = key;
                       answer = [value] (1 token).
    selective copying: prompt = seq_len - 1 noise/data tokens, then the delimiter; answer = the num_tokens data
                       tokens in order.
so the prompt is the paper's input sequence of length seq_len and the answer follows it.

Batch contract (dict of tensors, all rows of a split the same length, no padding)
    ``tokens`` [B, seq_len + A + 1] long; ``loss_mask`` [B, same] float, 1 on the answer tokens and the eos (the
    objective predicts tokens[:, 1:] from tokens[:, :-1] weighted by loss_mask[:, 1:]), and with `recurrences` on
    the values that follow the key's recurrences; ``prompt_len`` [B] long (= seq_len of the example); ``answer``
    [B, A] long (the answer tokens, for `val/accuracy`: the objective generates after the prompt and scores an
    exact match); ``seq_len`` [B] long, the prompt length again under the name that breaks val/accuracy down by
    length (val/accuracy_1024_tokens).

Item i of every split is a function of (seed, split, length, i) only: the train split is a stream of fresh random
examples read in order (distributed samplers split it by index), val and test are fixed sets. With several test
lengths, val and test batches each hold one length, the lengths taking turns (`SettingBlocks`).
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

Task = Literal["induction_heads", "selective_copying"]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def induction_heads_example(rng: np.random.Generator, seq_len: int, vocab: int,
                            recurrences: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt [seq_len], answer [1], supervised positions of the prompt [k]): random data tokens 0..vocab-2, the
    key (vocab-1) at a random position p in 0..seq_len-3 followed by the value, and the key again at the end; the
    answer is the value. With `recurrences` R, the key and the value also come back k ~ U{0..R} times in between
    (as many as fit), and the positions of those values are returned to be supervised (dense supervision)."""
    if seq_len < 4:
        raise ValueError(f"induction heads needs seq_len >= 4, got {seq_len}")
    key = vocab - 1
    prompt = rng.integers(0, vocab - 1, size=seq_len)
    p = int(rng.integers(0, seq_len - 2))
    prompt[p] = key
    prompt[-1] = key
    supervised = np.zeros(0, dtype=np.int64)
    if recurrences:
        # k two-token cells (key, value) in the room between the pair and the final key, positions p+2 .. seq_len-2,
        # not overlapping: k sorted distinct draws c_i from range(room - k), the i-th cell starting at p+2 + c_i + i
        room = seq_len - 3 - p
        k = min(int(rng.integers(0, recurrences + 1)), room // 2)
        starts = p + 2 + np.sort(rng.choice(room - k, size=k, replace=False)) + np.arange(k)
        prompt[starts], prompt[starts + 1] = key, prompt[p + 1]
        supervised = starts + 1
    return prompt, prompt[p + 1 : p + 2].copy(), supervised


def selective_copying_example(rng: np.random.Generator, seq_len: int, vocab: int,
                              num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt [seq_len], answer [num_tokens]): num_tokens data tokens (1..vocab-2) at random sorted positions
    among seq_len-1 noise tokens (0), then the delimiter (vocab-1); the answer is the data tokens in order."""
    if num_tokens > seq_len - 1:
        raise ValueError(f"selective copying of {num_tokens} tokens needs seq_len > {num_tokens}, got {seq_len}")
    data = rng.integers(1, vocab - 1, size=num_tokens)
    positions = np.sort(rng.choice(seq_len - 1, size=num_tokens, replace=False))
    prompt = np.zeros(seq_len, dtype=np.int64)
    prompt[positions] = data
    prompt[-1] = vocab - 1
    return prompt, data


class SyntheticTaskDataset(Dataset):
    """`num_examples` examples of one task at one length; item i is a function of (seed, split, seq_len, i).
    `recurrences`: dense supervision of induction heads (see the module's docstring)."""

    def __init__(self, task: Task, seq_len: int, num_examples: int, vocab: int = 16, num_tokens: int = 16,
                 seed: int = 0, split: str = "train", recurrences: int = 0):
        self.task, self.seq_len, self.num_examples = task, seq_len, num_examples
        self.vocab, self.num_tokens, self.seed, self.split_id = vocab, num_tokens, seed, SPLIT_IDS[split]
        self.answer_len = 1 if task == "induction_heads" else num_tokens
        self.recurrences = recurrences

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_examples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split_id, self.seq_len, i])
        if self.task == "induction_heads":
            prompt, answer, supervised = induction_heads_example(rng, self.seq_len, self.vocab, self.recurrences)
        else:
            prompt, answer = selective_copying_example(rng, self.seq_len, self.vocab, self.num_tokens)
            supervised = []
        eos = self.vocab
        tokens = np.concatenate([prompt, answer, [eos]]).astype(np.int64)
        loss_mask = torch.zeros(len(tokens))
        loss_mask[self.seq_len:] = 1.0
        loss_mask[supervised] = 1.0
        return {"tokens": torch.from_numpy(tokens), "loss_mask": loss_mask,
                "prompt_len": torch.tensor(self.seq_len), "answer": torch.from_numpy(answer.astype(np.int64)),
                "seq_len": torch.tensor(self.seq_len)}


class SettingBlocks(Dataset):
    """Val or test examples of several settings (prompt lengths, numbers of key-value pairs) as whole batches of
    one setting each, the settings taking turns: every batch is rectangular, a distributed sampler hands each rank
    whole batches, and a validation cut short by limit_val_batches still sees each setting (while it has
    batches left). Item b is a collated batch: load it with DataLoader(batch_size=None)."""

    def __init__(self, datasets: list[Dataset], batch_sizes: list[int]):
        per_setting = [[(d, i, min(i + b, len(d))) for i in range(0, len(d), b)] for d, b in zip(datasets, batch_sizes)]
        self.blocks = [blocks[k] for k in range(max(map(len, per_setting)))
                       for blocks in per_setting if k < len(blocks)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        dataset, start, stop = self.blocks[b]
        return default_collate([dataset[i] for i in range(start, stop)])


class ShortThenLong(Dataset):
    """The train stream of a short-to-long curriculum: items before `short_items` from `short`, the rest from
    `long` (both streams of fresh examples read in order)."""

    def __init__(self, short: Dataset, long: Dataset, short_items: int):
        self.short, self.long, self.short_items = short, long, short_items

    def __len__(self) -> int:
        return len(self.long)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return (self.short if i < self.short_items else self.long)[i]


def padding_collate(pad_id: int):
    """default_collate, rows of different lengths right-padded (tokens with `pad_id`, loss_mask with 0): a batch
    that straddles a curriculum's change of length (a distributed sampler strides the stream across ranks). Training
    reads only tokens and loss_mask, and a causal model's earlier positions do not see the padding."""
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["tokens"]) for item in items)
        if any(len(item["tokens"]) < longest for item in items):
            items = [{**item, "tokens": F.pad(item["tokens"], (0, longest - len(item["tokens"])), value=pad_id),
                      "loss_mask": F.pad(item["loss_mask"], (0, longest - len(item["loss_mask"])))} for item in items]
        return default_collate(items)
    return collate


def example_loader(dataset: Dataset, batch_size: int, num_workers: int, collate_fn=None) -> DataLoader:
    """Examples read in order (the train stream, or the fixed val set of one setting)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0, drop_last=False, collate_fn=collate_fn)


def settings_loader(datasets: list[Dataset], batch_sizes: list[int], num_workers: int) -> DataLoader:
    """The val or test sets of one or more settings: plain batches for one, `SettingBlocks` for several."""
    if len(datasets) == 1:
        return example_loader(datasets[0], batch_sizes[0], num_workers)
    return DataLoader(SettingBlocks(datasets, batch_sizes), batch_size=None, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class SyntheticDataModule(L.LightningDataModule):
    """The Mamba paper's synthetic tasks (section 4.1) for every causal objective.

    Args:
        task: "induction_heads" or "selective_copying".
        vocab: task tokens (16 as in the paper); the vocabulary adds the eos token.
        seq_len: prompt length of the training examples (256 as in the paper's induction-heads runs).
        test_seq_len: prompt length of the val and test examples (length generalisation), or a list of them (a val
            and test set at each: val/accuracy_<n>_tokens per length); default seq_len. With several, a batch of
            length n holds batch_size x seq_len / n rows (at least one): about a training batch's tokens, so that
            16x the training length fits in memory.
        num_tokens: data tokens to copy (selective copying; 16 as in the paper).
        recurrences: induction heads, training examples only: the key comes back up to this many times after the
            pair, each time followed by the value, every one supervised (dense supervision; see the module's
            docstring). 0 (the default) is the paper's task.
        short_seq_len, short_steps: a short-to-long curriculum: the first short_steps training batches (on one
            device; under DDP the ranks share the stream, so short_steps / world size steps) have prompts of
            short_seq_len tokens, the rest seq_len. Attention finds the induction step quickly at 64 tokens and not
            in thousands of steps at 256 (BENCHMARKS.md, "Recall"); what it learned short then carries to the
            training length. Val and test are unchanged.
        batch_size: examples per training batch (per device).
        train_examples: examples per training epoch (fresh random ones, read in order).
        val_examples, test_examples: sizes of the fixed val and test sets (of each, per test length).
        num_workers: dataloader worker processes.
        seed: seed of every split.
    """

    def __init__(self, task: Task = "induction_heads", vocab: int = 16, seq_len: int = 256,
                 test_seq_len: int | list[int] | None = None, num_tokens: int = 16, recurrences: int = 0,
                 short_seq_len: int | None = None, short_steps: int = 0,
                 batch_size: int = 32, train_examples: int = 1_000_000, val_examples: int = 512,
                 test_examples: int = 1024, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if task not in ("induction_heads", "selective_copying"):
            raise ValueError(f"data.init_args.task {task!r} is unknown: use 'induction_heads' or 'selective_copying'")
        if vocab < 3:
            raise ValueError(f"vocab must be at least 3 (data tokens and the special token), got {vocab}")
        if recurrences and task != "induction_heads":
            raise ValueError(f"recurrences (dense supervision) is an option of induction heads, not of {task}")
        if recurrences < 0:
            raise ValueError(f"recurrences must be 0 (the paper's task) or more, got {recurrences}")
        if (short_seq_len is None) != (short_steps == 0) or short_steps < 0:
            raise ValueError(f"a short-to-long curriculum needs both short_seq_len and short_steps > 0 (got "
                             f"short_seq_len={short_seq_len}, short_steps={short_steps}); set both, or neither")
        self.save_hyperparameters()
        self.task, self.vocab, self.seq_len = task, vocab, seq_len
        lengths = test_seq_len or seq_len
        self.test_seq_lens = list(lengths) if isinstance(lengths, (list, tuple)) else [lengths]
        self.test_seq_len = max(self.test_seq_lens)
        # check the settings now rather than in a dataloader worker
        for length in {seq_len, *self.test_seq_lens, *([short_seq_len] if short_seq_len else [])}:
            self._dataset("train", length, 1)[0]

    # --- what the model is linked to ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.vocab + 1

    @property
    def eos_id(self) -> int:
        return self.vocab

    @property
    def bytes_per_token(self) -> float:
        return 1.0

    @property
    def chance_accuracy(self) -> float | None:
        """val/accuracy of a guess: induction heads' value is one of the vocab - 1 data tokens (selective copying's
        16-token answers: none worth stating)."""
        return 1 / (self.vocab - 1) if self.task == "induction_heads" else None

    @property
    def answer_len(self) -> int:
        return 1 if self.task == "induction_heads" else self.hparams.num_tokens

    def example_len(self, seq_len: int | None = None) -> int:
        """Tokens per example (prompt, answer, eos) at a prompt length (default: the training one)."""
        return (seq_len or self.seq_len) + self.answer_len + 1

    @property
    def max_positions(self) -> int:
        """Positions a trunk must accept: the longest example plus the objective's answer-scoring slack (8)."""
        return self.example_len(max(self.seq_len, self.test_seq_len)) + 8

    # --- data ---------------------------------------------------------------------------------------------------
    def _dataset(self, split: str, seq_len: int, n: int) -> SyntheticTaskDataset:
        h = self.hparams
        recurrences = h.recurrences if split == "train" else 0  # val and test: the paper's task
        return SyntheticTaskDataset(self.task, seq_len, n, self.vocab, h.num_tokens, h.seed, split, recurrences)

    def _eval_loader(self, split: str, examples: int) -> DataLoader:
        h, lengths = self.hparams, self.test_seq_lens
        rows = [h.batch_size] if len(lengths) == 1 else [max(1, h.batch_size * self.seq_len // n) for n in lengths]
        return settings_loader([self._dataset(split, n, examples) for n in lengths], rows, h.num_workers)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        stream = self._dataset("train", self.seq_len, h.train_examples)
        if not h.short_seq_len:
            return example_loader(stream, h.batch_size, h.num_workers)
        short = self._dataset("train", h.short_seq_len, h.train_examples)
        return example_loader(ShortThenLong(short, stream, h.short_steps * h.batch_size), h.batch_size,
                              h.num_workers, padding_collate(self.eos_id))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.hparams.val_examples)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.hparams.test_examples)


class InductionHeadsDataModule(SyntheticDataModule):
    """Induction heads (Mamba paper sec. 4.1.2): vocabulary 16, training length 256; see SyntheticDataModule."""

    def __init__(self, vocab: int = 16, seq_len: int = 256, test_seq_len: int | list[int] | None = None,
                 recurrences: int = 0, short_seq_len: int | None = None, short_steps: int = 0,
                 batch_size: int = 32, train_examples: int = 1_000_000, val_examples: int = 512,
                 test_examples: int = 1024, num_workers: int = 0, seed: int = 0):
        super().__init__("induction_heads", vocab, seq_len, test_seq_len, 16, recurrences, short_seq_len,
                         short_steps, batch_size, train_examples, val_examples, test_examples, num_workers, seed)


class SelectiveCopyingDataModule(SyntheticDataModule):
    """Selective copying (Mamba paper sec. 4.1.1): vocabulary 16, 16 tokens to copy; see SyntheticDataModule."""

    def __init__(self, vocab: int = 16, seq_len: int = 256, test_seq_len: int | list[int] | None = None,
                 num_tokens: int = 16, batch_size: int = 32, train_examples: int = 1_000_000,
                 val_examples: int = 512, test_examples: int = 1024, num_workers: int = 0, seed: int = 0):
        super().__init__("selective_copying", vocab, seq_len, test_seq_len, num_tokens, 0, None, 0, batch_size,
                         train_examples, val_examples, test_examples, num_workers, seed)
