"""The Mamba paper's synthetic tasks: every example's answer follows from its prompt, splits are seeded and fixed,
and the test length applies to the val and test loaders."""
from __future__ import annotations

import pytest
import torch

from datamodules.synthetic import (InductionHeadsDataModule, SelectiveCopyingDataModule, SyntheticDataModule,
                                   SyntheticTaskDataset)


def solve_induction_heads(prompt: list[int], key: int) -> list[int]:
    """The token that followed the first occurrence of the key (the prompt ends with the key again)."""
    return [prompt[prompt.index(key) + 1]]


def solve_selective_copying(prompt: list[int]) -> list[int]:
    """The data (non-noise) tokens before the delimiter, in order."""
    return [t for t in prompt[:-1] if t != 0]


def examples(loader, limit=200):
    n = 0
    for batch in loader:
        for i in range(batch["tokens"].shape[0]):
            yield {k: v[i] for k, v in batch.items()}
            n += 1
            if n >= limit:
                return


def check_layout(ex, seq_len, answer_len, eos):
    tokens, mask = ex["tokens"].tolist(), ex["loss_mask"]
    assert len(tokens) == seq_len + answer_len + 1 and int(ex["prompt_len"]) == seq_len
    assert tokens[-1] == eos and eos not in tokens[:-1]
    assert tokens[seq_len:-1] == ex["answer"].tolist()
    assert mask.tolist() == [0.0] * seq_len + [1.0] * (answer_len + 1)
    return tokens[:seq_len]


@pytest.mark.parametrize("split", ["train", "val"])
def test_induction_heads_answer_follows_from_the_prompt(split):
    dm = InductionHeadsDataModule(batch_size=16, test_seq_len=512)
    assert (dm.vocab_size, dm.eos_id, dm.bytes_per_token, dm.seq_len) == (17, 16, 1.0, 256)
    key, seq_len = 15, 256 if split == "train" else 512
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    positions = set()
    for ex in examples(loader):
        prompt = check_layout(ex, seq_len, 1, dm.eos_id)
        assert prompt.count(key) == 2 and prompt[-1] == key  # the key, and the query at the end
        assert solve_induction_heads(prompt, key) == ex["answer"].tolist()
        assert 0 <= ex["answer"].item() < key
        positions.add(prompt.index(key))
    assert len(positions) > 50  # the key lands anywhere


@pytest.mark.parametrize("split", ["train", "test"])
def test_selective_copying_answer_follows_from_the_prompt(split):
    dm = SelectiveCopyingDataModule(batch_size=16, test_seq_len=1024)
    seq_len = 256 if split == "train" else 1024
    loader = dm.train_dataloader() if split == "train" else dm.test_dataloader()
    gaps = set()
    for ex in examples(loader, 100):
        prompt = check_layout(ex, seq_len, 16, dm.eos_id)
        assert prompt[-1] == 15  # the delimiter
        answer = ex["answer"].tolist()
        assert solve_selective_copying(prompt) == answer and len(answer) == 16
        assert all(1 <= t <= 14 for t in answer)
        where = [i for i, t in enumerate(prompt[:-1]) if t != 0]
        gaps.update(b - a for a, b in zip(where, where[1:]))
    assert len(gaps) > 10  # the spacing varies: what makes the copying selective


def test_determinism_by_seed():
    a, b, c = (InductionHeadsDataModule(batch_size=8, seed=s) for s in (0, 0, 1))
    batch_a, batch_b, batch_c = (next(iter(dm.val_dataloader())) for dm in (a, b, c))
    assert torch.equal(batch_a["tokens"], batch_b["tokens"])
    assert not torch.equal(batch_a["tokens"], batch_c["tokens"])
    # item i is a function of (seed, split, i): order of access does not matter, and splits differ
    train = a.train_dataloader().dataset
    first = train[5]["tokens"]
    _ = [train[i] for i in (9, 0, 3)]
    assert torch.equal(train[5]["tokens"], first)
    assert torch.equal(b.train_dataloader().dataset[5]["tokens"], first)
    assert not torch.equal(train[5]["tokens"], train[6]["tokens"])
    assert not torch.equal(a.val_dataloader().dataset[5]["tokens"], first)
    # the val set is fixed: the same on every pass
    assert torch.equal(next(iter(a.val_dataloader()))["tokens"], batch_a["tokens"])


def test_sizes_lengths_and_errors():
    dm = SyntheticDataModule("selective_copying", seq_len=64, num_tokens=8, batch_size=4, train_examples=40,
                             val_examples=12, test_examples=20, test_seq_len=96)
    assert len(dm.train_dataloader().dataset) == 40 and len(dm.val_dataloader()) == 3
    assert len(dm.test_dataloader().dataset) == 20
    assert dm.example_len() == 64 + 8 + 1 and dm.max_positions == 96 + 8 + 1 + 8
    assert next(iter(dm.train_dataloader()))["tokens"].shape == (4, 73)
    assert next(iter(dm.val_dataloader()))["tokens"].shape == (4, 105)
    with pytest.raises(ValueError, match="task"):
        SyntheticDataModule("copying")
    with pytest.raises(ValueError, match="seq_len"):
        SelectiveCopyingDataModule(seq_len=10, num_tokens=16)
    with pytest.raises(IndexError):
        SyntheticTaskDataset("induction_heads", 32, 3)[3]


def test_a_short_to_long_curriculum_trains_short_then_long_and_pads_a_straddling_batch():
    dm = InductionHeadsDataModule(seq_len=32, short_seq_len=8, short_steps=2, batch_size=4, train_examples=24,
                                  recurrences=2)
    lengths = [batch["tokens"].shape[1] for batch in dm.train_dataloader()]
    assert lengths == [8 + 2, 8 + 2, 32 + 2, 32 + 2, 32 + 2, 32 + 2]
    # the short batches are the short task's own examples, the long ones the plain stream's
    short, long = dm._dataset("train", 8, 24), dm._dataset("train", 32, 24)
    batches = list(dm.train_dataloader())
    assert torch.equal(batches[1]["tokens"][3], short[7]["tokens"]) and torch.equal(batches[2]["tokens"][0], long[8]["tokens"])
    # a batch across the change (as a distributed sampler's stride makes): short rows padded with eos, unsupervised
    loader = torch.utils.data.DataLoader(dm.train_dataloader().dataset, batch_size=3, collate_fn=dm.train_dataloader().collate_fn)
    straddling = list(loader)[2]  # items 6, 7 short, item 8 long
    assert straddling["tokens"].shape == (3, 34)
    assert torch.equal(straddling["tokens"][0, :10], short[6]["tokens"])
    assert (straddling["tokens"][0, 10:] == dm.eos_id).all() and (straddling["loss_mask"][0, 10:] == 0).all()
    assert torch.equal(straddling["loss_mask"][0, :10], short[6]["loss_mask"])
    # val is the paper's task at the training length
    assert next(iter(dm.val_dataloader()))["tokens"].shape[1] == 32 + 2
    with pytest.raises(ValueError, match="short_seq_len and short_steps"):
        InductionHeadsDataModule(short_seq_len=64)
