"""Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology: Measuring and improving recall in
efficient language models", arXiv:2312.04927) as a Lightning datamodule.

An example of `seq_len` tokens: `num_kv_pairs` key-value pairs, then filler in which every key comes back once as
a query, followed by its value; each of those values is supervised, so one example trains num_kv_pairs recalls:

    k1 v1 k2 v2 k3 v3 k4 v4 | x k3 v3 k1 v1 x x x k4 v4 x x ... x k2 v2 x
    '------ the pairs ------'  '------ queries among filler, each value supervised ------'

As in Zoology's generator (zoology/data/multiquery_ar.py, HazyResearch/zoology): keys come from the lower half of
the vocabulary (1 .. vocab/2 - 1) and values from the upper half (vocab/2 .. vocab - 1), each drawn without
replacement (keys are unique within an example, and so are values); the region after the pairs is cut into
two-token slots and the i-th key's query takes slot g_i, the slots drawn without replacement with probability
proportional to g^(power_a - 1), g = 1, 2, ... (a power law: with power_a = 0.01, as in Zoology, most queries
come soon after the pairs, as a repeated bigram does in text); the filler is random tokens.

Where this departs from Zoology, and why:
  * The value is written after its query key, in the sequence. The batch contract's `tokens` are the input and
    the target at once, as text is to a language model; Zoology's input has a filler token there and the value
    only in its labels. Every key is queried once, so an earlier query's value says nothing about a later one.
  * The filler never repeats one of the example's keys (Zoology draws it from the whole vocabulary). At the
    vocabulary used here (256 rather than 8192) a filler copy of a key would turn up about once per example, an
    unsupervised second "pair" that makes a later query ambiguous; at 8192, in about one example of 40.
  * Training examples are drawn fresh at one setting (`num_kv_pairs`); Zoology trains on a fixed set mixing
    settings. The val and test sets vary the number of pairs at the training length (`test_kv_pairs`, more pairs
    than in training among them), so that accuracy against the number of pairs is not mixed up with length
    generalisation (a transformer with rotary positions meets unseen positions past seq_len).

Vocabulary: `vocab` tokens (256 by default, no special tokens: nothing is generated after a prompt). At Zoology's
8192 a given key is in one example of 500 (8 pairs), so its embedding is learned from few examples, and the
unembedding costs more than a 2-layer d64 trunk; 256 leaves 127 keys (64 tokens hold at most 16 pairs), and a
2-layer d64 transformer reached 0.88 per-query accuracy at 8 pairs within 900 steps (a minute on 2 CPU cores).

Batch contract (dict of tensors, no padding):
    ``tokens`` [B, seq_len] long; ``loss_mask`` [B, seq_len] float, 1 on each query's value (the objective
    predicts tokens[:, 1:] from tokens[:, :-1] weighted by loss_mask[:, 1:]); ``answer_mask`` [B, seq_len] bool, the
    same positions marked as one-token answers: causal objectives log `val/accuracy` as the share of them their
    greedy next token gets right, teacher-forced (each query sees the earlier values as given), as Zoology's
    accuracy is computed; ``num_kv_pairs`` [B] long, which breaks that down (`val/accuracy_<k>_pairs`).

Item i of every split is a function of (seed, split, num_kv_pairs, i) only: the train split is a stream of fresh
random examples read in order, val and test are fixed sets, one per number of pairs, their batches taking turns.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.synthetic import SPLIT_IDS, example_loader, settings_loader


def mqar_example(rng: np.random.Generator, seq_len: int, vocab: int, num_kv_pairs: int,
                 power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [seq_len], answer positions [num_kv_pairs]): the pairs, then each key once as a query at a power-law
    distributed slot of the filler, followed by its value; the answers are those values' positions."""
    context = 2 * num_kv_pairs
    slots = (seq_len - context) // 2
    if num_kv_pairs < 1 or slots < num_kv_pairs:
        raise ValueError(f"MQAR with {num_kv_pairs} pairs needs 1 <= num_kv_pairs <= seq_len / 4 (the pairs, then a "
                         f"query slot of two tokens per key), got seq_len {seq_len}")
    half = vocab // 2
    if half - 1 < num_kv_pairs:
        raise ValueError(f"MQAR with {num_kv_pairs} pairs needs {num_kv_pairs} distinct keys in 1 .. vocab/2 - 1: "
                         f"raise vocab (got {vocab})")
    keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab), size=num_kv_pairs, replace=False)
    filler = np.setdiff1d(np.arange(vocab), keys)  # no false queries (see the module's docstring)
    tokens = filler[rng.integers(0, len(filler), size=seq_len)]
    tokens[0:context:2], tokens[1:context:2] = keys, values
    weights = np.arange(1, slots + 1) ** (power_a - 1.0)
    gaps = rng.choice(slots, size=num_kv_pairs, replace=False, p=weights / weights.sum())
    queries = context + 2 * gaps
    tokens[queries], tokens[queries + 1] = keys, values
    return tokens, queries + 1


class MQARDataset(Dataset):
    """`num_examples` MQAR examples at one setting; item i is a function of (seed, split, num_kv_pairs, i)."""

    def __init__(self, seq_len: int, num_kv_pairs: int, num_examples: int, vocab: int = 256, power_a: float = 0.01,
                 seed: int = 0, split: str = "train"):
        self.seq_len, self.num_kv_pairs, self.num_examples = seq_len, num_kv_pairs, num_examples
        self.vocab, self.power_a, self.seed, self.split_id = vocab, power_a, seed, SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_examples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split_id, self.num_kv_pairs, i])
        tokens, answers = mqar_example(rng, self.seq_len, self.vocab, self.num_kv_pairs, self.power_a)
        answer_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        answer_mask[answers] = True
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)), "loss_mask": answer_mask.float(),
                "answer_mask": answer_mask, "num_kv_pairs": torch.tensor(self.num_kv_pairs)}


class MQARDataModule(L.LightningDataModule):
    """Multi-query associative recall (Zoology) for every causal objective; see the module's docstring.

    Args:
        vocab: tokens in the vocabulary: keys 1 .. vocab/2 - 1, values vocab/2 .. vocab - 1 (256 by default).
        seq_len: tokens per example, at every setting (64: Zoology's shortest).
        num_kv_pairs: key-value pairs of the training examples (at most seq_len / 4).
        test_kv_pairs: the numbers of pairs of the val and test sets (one set each; default [num_kv_pairs]).
        power_a: the power law of the query slots, p(g) ~ g^(power_a - 1) (Zoology's 0.01; 1.0 is uniform).
        batch_size: examples per batch (per device), in training and evaluation.
        train_examples: examples per training epoch (fresh random ones, read in order).
        val_examples, test_examples: examples of each val and test set (per number of pairs).
        num_workers: dataloader worker processes.
        seed: seed of every split.
    """

    def __init__(self, vocab: int = 256, seq_len: int = 64, num_kv_pairs: int = 8,
                 test_kv_pairs: list[int] | None = None, power_a: float = 0.01, batch_size: int = 64,
                 train_examples: int = 1_000_000, val_examples: int = 256, test_examples: int = 1000,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if not power_a > 0:
            raise ValueError(f"power_a must be positive (1.0: uniform query slots), got {power_a}")
        self.save_hyperparameters()
        self.test_kv_pairs = list(test_kv_pairs or [num_kv_pairs])
        for pairs in {num_kv_pairs, *self.test_kv_pairs}:  # check every setting now, not in a dataloader worker
            self._dataset("train", pairs, 1)[0]

    # --- what the model is linked to ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hparams.vocab

    @property
    def eos_id(self) -> None:
        return None  # nothing is generated: every answer is one token inside the sequence

    @property
    def bytes_per_token(self) -> float:
        return 0.0  # task tokens, not text: no val/bpb

    # --- data ---------------------------------------------------------------------------------------------------
    def _dataset(self, split: str, num_kv_pairs: int, n: int) -> MQARDataset:
        h = self.hparams
        return MQARDataset(h.seq_len, num_kv_pairs, n, h.vocab, h.power_a, h.seed, split)

    def _eval_loader(self, split: str, examples: int) -> DataLoader:
        h = self.hparams
        return settings_loader([self._dataset(split, k, examples) for k in self.test_kv_pairs],
                               [h.batch_size] * len(self.test_kv_pairs), h.num_workers)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return example_loader(self._dataset("train", h.num_kv_pairs, h.train_examples), h.batch_size, h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.hparams.val_examples)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.hparams.test_examples)
