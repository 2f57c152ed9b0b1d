"""Planning tokens: plan insertion and removal round trip, rule types, k-means determinism, one-step fits."""
from __future__ import annotations

import torch

from conftest import TINY_MODEL, run_cli, train_on_batch
from datamodules import ReasoningDataModule
from objectives.planning import insert_plans, kmeans, multiplication_rule, prosqa_rule, remove_plans
from objectives.training.segments import step_spans


def small_batch(task="multiplication", **kw):
    dm = ReasoningDataModule(task=task, train_size=8, val_size=4, test_size=4, batch_size=4, **kw)
    dm.setup("fit")
    return dm, next(iter(dm.val_dataloader()))


def test_insert_then_remove_round_trip():
    dm, batch = small_batch(digits=3)
    types = [[k % 3 for k in range(len(step_spans(row.tolist())))] for row in batch["segments"]]
    base = dm.vocab_size
    out = insert_plans(batch, types, base, dm.pad_id)
    for b in range(batch["tokens"].shape[0]):
        n_steps = len(types[b])
        row, seg = out["tokens"][b], out["segments"][b]
        plans = (row >= base).nonzero().flatten().tolist()
        assert len(plans) == n_steps
        # each plan token opens its step: its segment is the step's, the next token is the step's first
        assert [int(seg[p]) for p in plans] == [2 + k for k in range(n_steps)]
        assert [int(row[p]) - base for p in plans] == types[b]
    back = remove_plans(out["tokens"], base, dm.pad_id)
    n = batch["tokens"].shape[1]
    assert torch.equal(back[:, :n], batch["tokens"])
    assert (back[:, n:] == dm.pad_id).all()
    assert torch.equal(out["prompt_len"], batch["prompt_len"]) and torch.equal(out["answer"], batch["answer"])


def test_rules_read_the_step_text():
    # 123 * 45 reversed: a = 3 2 1, b = 5 4; partial products 615 (d=5) and 4920 (d=4), reversed, zero padded
    question = ["3", "2", "1", "*", "5", "4"]
    assert multiplication_rule(question, 0, list("5160"), 2) == 5
    assert multiplication_rule(question, 1, list("02940"), 2) == 4
    assert [prosqa_rule([], k, s, 3) for k, s in enumerate([["Tom", "is"], ["Every", "x"], ["Every", "y"]])] == [0, 1, 2]


def test_kmeans_is_deterministic_by_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 4, generator=g) + 5 * i for i in range(3)])
    a, b, c = kmeans(x, 3, seed=1), kmeans(x, 3, seed=1), kmeans(x, 3, seed=2)
    assert torch.equal(a, b)
    # three well-separated blobs: every seed finds them (same centroids up to order)
    assert torch.allclose(a[a[:, 0].argsort()], c[c[:, 0].argsort()], atol=1e-5)
    assignment = torch.cdist(x, a).argmin(1)
    assert len(set(assignment[:40].tolist())) == 1 and len(set(assignment.tolist())) == 3


def test_planning_tokens_fit_a_step_and_generate_without_plans(tmp_path):
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--model", "configs/objectives/planning_tokens.yaml",
                  *TINY_MODEL, "--data", "configs/data/multiplication.yaml", "--data.init_args.digits", "2",
                  "--data.init_args.val_size", "8", "--data.init_args.test_size", "8",
                  "--data.init_args.batch_size", "4", steps=1)
    model = cli.model
    assert cli.trainer.global_step == 1 and model.embed.num_embeddings == model.vocab_size + 10
    batch = next(iter(cli.datamodule.val_dataloader()))
    types = model.plan_types(batch)
    assert all(0 <= t < 10 for row in types for t in row) and len(types[0]) == 2
    # a model that has learnt one question's plan-augmented sequence by heart decodes it with its plan tokens: one
    # opening each step, of the step's type; generate returns the question's own tokens, the plans taken out
    one = {k: v[:1] for k, v in batch.items()}
    row = one["tokens"][0, one["segments"][0] >= 0].tolist()
    raw = list(row)
    for (start, _), kind in reversed(list(zip(step_spans(one["segments"][0].tolist()), types[0]))):
        raw.insert(start, model.plan_base + kind)
    assert train_on_batch(model, one, steps=100, lr=1e-2) < 0.05  # measured 0.0024: greedy decoding is the sequence
    model.eval()
    plen = int(one["prompt_len"][0])
    prompt, budget = one["tokens"][:, :plen], len(raw) - plen + 2
    kept, returned = model.generate(prompt, budget, keep_plans=True)[0], model.generate(prompt, budget)[0]
    assert kept[: len(raw)].tolist() == raw
    assert returned[: len(row)].tolist() == row and (returned[len(row):] == model.eos_id).all()
