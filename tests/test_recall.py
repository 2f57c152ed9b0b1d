"""Recall that learns in minutes: MQAR's examples (unique keys, every query answerable from its context, exactly the
answers supervised, seeded), its per-query accuracy as a transformer computes it, val sets at several settings,
dense supervision of induction heads, the constant schedule after warm-up, the report's accuracy per group and the
zoo_recall experiment's dry run."""
from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch

from datamodules.recall import MQARDataModule, MQARDataset, mqar_example
from datamodules.synthetic import InductionHeadsDataModule, SyntheticDataModule, SyntheticTaskDataset
from objectives.training import metrics as M


def solve_mqar(tokens: list[int], num_kv_pairs: int) -> dict[int, int]:
    """position -> the value that answers it: the token after the first occurrence of the key before it."""
    pairs = dict(zip(tokens[0 : 2 * num_kv_pairs : 2], tokens[1 : 2 * num_kv_pairs : 2]))
    return {t + 1: pairs[tokens[t]] for t in range(2 * num_kv_pairs, len(tokens) - 1) if tokens[t] in pairs}


@pytest.mark.parametrize("pairs", [4, 8, 16])
def test_mqar_examples_are_answerable_from_their_context_and_only_answers_are_supervised(pairs):
    data = MQARDataset(seq_len=64, num_kv_pairs=pairs, num_examples=60, vocab=256, split="val")
    for i in range(len(data)):
        item = data[i]
        tokens = item["tokens"].tolist()
        keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # unique within the example
        assert all(1 <= k < 128 for k in keys) and all(128 <= v < 256 for v in values)  # disjoint halves
        answers = solve_mqar(tokens, pairs)  # every later occurrence of a key is a query, each key queried once
        assert sorted(tokens[p - 1] for p in answers) == sorted(keys)
        assert all(tokens[p] == value for p, value in answers.items())
        supervised = item["loss_mask"].nonzero().flatten().tolist()
        assert supervised == sorted(answers) and item["answer_mask"].nonzero().flatten().tolist() == supervised
        assert item["loss_mask"].sum() == pairs and int(item["num_kv_pairs"]) == pairs


def test_mqar_queries_follow_a_power_law_and_settings_are_checked():
    rng = np.random.default_rng(0)
    first_slots = [int((mqar_example(rng, 256, 256, 4)[1].min() - 1 - 8) // 2) for _ in range(300)]
    assert sum(s < 4 for s in first_slots) > 150  # power_a 0.01: most queries come right after the pairs
    uniform = [int((mqar_example(rng, 256, 256, 4, power_a=1.0)[1].min() - 1 - 8) // 2) for _ in range(300)]
    assert sum(s < 4 for s in uniform) < 100
    with pytest.raises(ValueError, match="seq_len / 4"):
        MQARDataModule(seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="raise vocab"):
        MQARDataModule(vocab=32, num_kv_pairs=16)


def test_mqar_items_depend_on_seed_split_and_index_only():
    a, b = (MQARDataset(64, 8, 20, seed=0) for _ in range(2))
    first = a[5]["tokens"]
    _ = [a[i] for i in (9, 0, 3)]
    assert torch.equal(a[5]["tokens"], first) and torch.equal(b[5]["tokens"], first)
    assert not torch.equal(a[6]["tokens"], first)
    assert not torch.equal(MQARDataset(64, 8, 20, seed=1)[5]["tokens"], first)
    assert not torch.equal(MQARDataset(64, 8, 20, split="val")[5]["tokens"], first)
    # a val example does not change with the batch size or with the other settings beside it
    small = MQARDataModule(batch_size=2, test_kv_pairs=[8], val_examples=4)
    large = MQARDataModule(batch_size=4, test_kv_pairs=[4, 8], val_examples=4)
    assert torch.equal(next(iter(small.val_dataloader()))["tokens"][1], list(large.val_dataloader())[1]["tokens"][1])


def test_val_batches_hold_one_setting_each_the_settings_taking_turns():
    dm = MQARDataModule(batch_size=4, test_kv_pairs=[4, 8, 16], val_examples=6)
    pairs = [batch["num_kv_pairs"].tolist() for batch in dm.val_dataloader()]
    assert pairs == [[4] * 4, [8] * 4, [16] * 4, [4] * 2, [8] * 2, [16] * 2]
    # induction heads at several lengths: one length a batch, about a training batch's tokens each
    dm = InductionHeadsDataModule(seq_len=32, test_seq_len=[32, 128], batch_size=8, val_examples=8)
    shapes = [tuple(batch["tokens"].shape) for batch in dm.val_dataloader()]
    assert shapes == [(8, 34), (2, 130), (2, 130), (2, 130), (2, 130)]
    assert dm.max_positions == 128 + 2 + 8


def test_dense_induction_supervises_the_value_at_every_recurrence_and_leaves_the_test_task_alone():
    key, counts, roomy = 15, set(), set()
    data = SyntheticTaskDataset("induction_heads", 64, 200, recurrences=4)
    for i in range(len(data)):
        item = data[i]
        tokens, mask = item["tokens"].tolist(), item["loss_mask"]
        value = item["answer"].item()
        assert tokens[64:] == [value, 16] and mask[64:].tolist() == [1.0, 1.0]  # the paper's answer and eos
        first = tokens.index(key)
        assert tokens[first + 1] == value and tokens[63] == key
        supervised = mask[:64].nonzero().flatten().tolist()
        assert all(tokens[p] == value and tokens[p - 1] == key and p > first + 1 for p in supervised)
        assert sorted(p - 1 for p in supervised) == [t for t in range(first + 1, 63) if tokens[t] == key]
        counts.add(len(supervised))
        if first < 40:  # room for all four recurrences: how many there are is drawn, not fixed
            roomy.add(len(supervised))
    assert counts == roomy == {0, 1, 2, 3, 4}  # k ~ U{0..4}: some examples are the paper's own
    dm = InductionHeadsDataModule(seq_len=64, recurrences=4, batch_size=16, val_examples=16)
    val = next(iter(dm.val_dataloader()))
    assert (val["loss_mask"][:, :64] == 0).all() and (val["tokens"][:, :63] == key).sum() == 16
    with pytest.raises(ValueError, match="recurrences"):  # an option of induction heads only
        SyntheticDataModule("selective_copying", recurrences=2)


def test_per_query_accuracy_counts_the_answers_a_transformer_gets_right():
    """A hand-made batch whose answers are, left to right, set to the model's own greedy next token (right) or to
    another token (wrong): val/accuracy and its breakdown by pairs count exactly those."""
    from models import Transformer
    from objectives import NextTokenPrediction
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), vocab_size=50).eval()
    tokens = torch.randint(0, 50, (2, 16))
    plan = {(0, 5): True, (0, 9): False, (0, 12): True, (1, 4): False, (1, 14): True}  # (row, position): right?
    for (row, t), right in sorted(plan.items(), key=lambda x: x[0][1]):
        with torch.no_grad():
            guess = int(model.logits(model.hidden(tokens[row : row + 1, :t]))[0, -1].argmax())
        tokens[row, t] = guess if right else (guess + 1) % 50
    answer_mask = torch.zeros(2, 16, dtype=torch.bool)
    for row, t in plan:
        answer_mask[row, t] = True
    batch = {"tokens": tokens, "loss_mask": answer_mask.float(), "answer_mask": answer_mask,
             "num_kv_pairs": torch.tensor([4, 8])}
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    model.score_answer_tokens(batch, "val")
    assert float(logged[M.VAL_ACCURACY].compute()) == pytest.approx(3 / 5)
    assert float(logged["val/accuracy_4_pairs"]) == pytest.approx(2 / 3)
    assert float(logged["val/accuracy_8_pairs"]) == pytest.approx(1 / 2)
    # over a validation every query counts once: a second batch of row 1 alone (1 right of 2) makes it 4 of 7
    model.score_answer_tokens({k: v[1:] for k, v in batch.items()}, "val")
    assert float(logged[M.VAL_ACCURACY].compute()) == pytest.approx(4 / 7)


def test_warmup_then_constant_learning_rate():
    from objectives.training.optim import WarmupCosine
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=100, min_lr_ratio=1.0)
    rates = []
    for _ in range(150):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])
    assert rates[10:] == [1e-3] * 140


def test_report_breaks_accuracy_down_by_pairs_and_prompt_length(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lab.experiment import Run
    from lab.report import reasoning_table, seed_figures, summarise
    writer = SummaryWriter(str(tmp_path))
    for step, acc in ((200, 0.3), (400, 0.9)):
        for tag, value in (("val/accuracy", acc), ("val/accuracy_16_pairs", acc / 2), ("val/accuracy_4_pairs", acc),
                           ("val/accuracy_1024_tokens", 0.25)):
            writer.add_scalar(tag, value, step)
    writer.close()
    figures = seed_figures(tmp_path, Run(model="m.yaml"))["figures"]
    assert figures["accuracy 16 pairs"] == pytest.approx(0.45) and figures["accuracy AUC"] == pytest.approx(0.6)
    row = {"label": "MQAR", "seeds": [0], "figures": {k: summarise([v]) for k, v in figures.items()}}
    header, _, line = reasoning_table([row])[1:4]
    assert "| val/accuracy | accuracy, 4 pairs | accuracy, 16 pairs | accuracy @1024 tokens |" in header
    assert "answer tokens" not in header  # nothing generated: no tokens per answer
    assert line.startswith("| MQAR | 0.900 | 0.900 | 0.450 | 0.250 |")


def test_zoo_recall_dry_runs_every_trunk_at_both_tasks():
    import compare
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert compare.main(["configs/experiments/zoo_recall.yaml", "--dry-run", "--runs-dir", "/nonexistent"]) == 0
    runs = re.findall(r"^# (\S+) seed\d+", out.getvalue(), flags=re.M)
    assert len(runs) == 12
    for trunk in ("transformer", "mamba", "mamba2", "rwkv7"):
        assert {f"mqar_{trunk}_d64", f"mqar_{trunk}_d128", f"induction_{trunk}"} <= set(runs)
    commands = [line for line in out.getvalue().splitlines() if "train.py fit" in line]
    assert all("configs/data/mqar.yaml" in c for c in commands if " --trainer.logger.init_args.name mqar_" in c)
    assert all("[256, 1024, 4096]" in c for c in commands if "init_args.name induction_" in c)
    # the transformer's induction run trains its curriculum recipe for its own 2000 steps, the others the base's 800
    steps = {c.split("--trainer.logger.init_args.name ")[1].split()[0]: c.split("--trainer.max_steps ")[1].split()[0]
             for c in commands}
    assert steps.pop("induction_transformer") == "2000" and set(steps.values()) == {"800"}
