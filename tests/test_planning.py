"""Planning tokens: plan insertion and removal round trip, rule types from the config, the untyped General plans,
plans of several tokens, k-means types from a chain-of-thought checkpoint, one-step fits."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODEL, run_cli, train_on_batch
from datamodules import ReasoningDataModule
from models import Transformer
from objectives import PlanningTokens
from objectives.planning import (insert_plans, kmeans, multiplication_rule, prosqa_rule, remove_plans,
                                 step_embeddings)
from objectives.training.checkpoints import load_objective
from objectives.training.segments import step_spans


def small_batch(task="multiplication", **kw):
    dm = ReasoningDataModule(task=task, train_size=8, val_size=4, test_size=4, batch_size=4, **kw)
    dm.setup("fit")
    return dm, next(iter(dm.val_dataloader()))


def planner(dm, d_model=32, **options) -> PlanningTokens:
    """A planning-tokens objective built by hand (no trainer, no datamodule), with the data's token strings."""
    model = PlanningTokens(Transformer(d_model=d_model, n_layers=1, n_heads=2, max_seq_len=128),
                           vocab_size=dm.vocab_size, eos_id=dm.eos_id, **options)
    model.words = [dm.tokenizer.id_to_token(i) for i in range(dm.vocab_size)]
    return model


def plans_in(row: torch.Tensor, plan_base: int) -> list[list[int]]:
    """The runs of consecutive plan tokens (ids >= plan_base) in a row, in order."""
    runs, previous = [], False
    for token in row.tolist():
        if token >= plan_base and previous:
            runs[-1].append(token)
        elif token >= plan_base:
            runs.append([token])
        previous = token >= plan_base
    return runs


def test_insert_then_remove_round_trip():
    dm, batch = small_batch(digits=3)
    base = dm.vocab_size
    plans = [[[base + k % 3] for k in range(len(step_spans(row.tolist())))] for row in batch["segments"]]
    out = insert_plans(batch, plans, dm.pad_id)
    for b in range(batch["tokens"].shape[0]):
        n_steps = len(plans[b])
        row, seg = out["tokens"][b], out["segments"][b]
        positions = (row >= base).nonzero().flatten().tolist()
        # each plan token opens its step: its segment is the step's, the next token is the step's first
        assert [int(seg[p]) for p in positions] == [2 + k for k in range(n_steps)]
        assert plans_in(row, base) == plans[b]
    back = remove_plans(out["tokens"], base, dm.pad_id)
    n = batch["tokens"].shape[1]
    assert torch.equal(back[:, :n], batch["tokens"])
    assert (back[:, n:] == dm.pad_id).all()
    assert torch.equal(out["prompt_len"], batch["prompt_len"]) and torch.equal(out["answer"], batch["answer"])


def test_plans_of_several_tokens_open_every_step_and_come_out_again():
    # the released code's layout: general tokens every plan shares, then the type's own (here 2 + 3)
    dm, batch = small_batch(digits=3)
    model = planner(dm, rule="position", num_plan_types=4, general_tokens=2, plan_length=3)
    base = model.plan_base
    assert model.embed.num_embeddings == dm.vocab_size + 2 + 4 * 3
    out = model.augment(batch)
    for b in range(batch["tokens"].shape[0]):
        n_steps = len(step_spans(batch["segments"][b].tolist()))
        general = [base, base + 1]
        assert plans_in(out["tokens"][b], base) == [general + [base + 2 + 3 * k + i for i in range(3)]
                                                    for k in range(n_steps)]
    n = batch["tokens"].shape[1]
    assert torch.equal(remove_plans(out["tokens"], base, dm.pad_id)[:, :n], batch["tokens"])


def test_general_plans_carry_no_type():
    """The paper's "General" control: every step of every row gets the same plan tokens, whatever the rule (here
    the multiplier digit, which differs between steps) would give."""
    dm, batch = small_batch(digits=3)
    typed = planner(dm, plans="rule", rule="multiplication", plan_length=2)
    general = planner(dm, plans="general", rule="multiplication", plan_length=2)
    assert general.embed.num_embeddings == dm.vocab_size + 2  # one plan of two tokens
    typed_plans = [p for row in typed.augment(batch)["tokens"] for p in plans_in(row, typed.plan_base)]
    general_plans = [p for row in general.augment(batch)["tokens"] for p in plans_in(row, general.plan_base)]
    assert len({tuple(p) for p in typed_plans}) > 1  # the rule tells these steps apart ...
    assert len(general_plans) == len(typed_plans) and all(len(p) == 2 for p in general_plans)
    assert {tuple(p) for p in general_plans} == {(general.plan_base, general.plan_base + 1)}  # ... General does not


def test_the_rule_comes_from_the_config_not_the_data():
    # built by hand, with no trainer and so no datamodule to read a task name from: rule= alone picks the rule
    dm, batch = small_batch(digits=3, reverse_digits=True)
    types = planner(dm, rule="multiplication").plan_types(batch)
    words = [[dm.tokenizer.id_to_token(i) for i in row] for row in batch["tokens"].tolist()]
    # step k of a * b is a * b_k * 10**k: its type is b's k-th digit, least significant first after the "*"
    multipliers = [[int(w) for w in row[row.index("*") + 1:][:3]] for row in words]
    assert types == multipliers
    assert types != planner(dm, rule="position").plan_types(batch)  # the digits are not the steps' positions
    with pytest.raises(ValueError, match="set rule to one of.*multiplication"):
        planner(dm, plans="rule")


def test_kmeans_without_a_checkpoint_is_refused():
    dm, _ = small_batch()
    with pytest.raises(ValueError, match="kmeans_from"):
        planner(dm, plans="kmeans")
    with pytest.raises(ValueError, match="kmeans_from is read only by plans: kmeans"):
        planner(dm, plans="rule", rule="position", kmeans_from="cot.ckpt")


def test_kmeans_clusters_the_step_states_of_the_chain_of_thought_checkpoint(tmp_path):
    # the chain-of-thought run: next-token prediction on the same data, one step (its states need not be good ones)
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL,
                  "--data", "configs/data/multiplication.yaml", "--data.init_args.digits", "2",
                  "--data.init_args.train_size", "64", "--data.init_args.val_size", "8",
                  "--data.init_args.test_size", "8", "--data.init_args.batch_size", "8", steps=1)
    checkpoint = str(next(tmp_path.rglob("last.ckpt")))
    dm = cli.datamodule
    # a narrower network than the checkpoint's: centroids of its own states would have the wrong width
    model = planner(dm, d_model=16, plans="kmeans", kmeans_from=checkpoint, num_plan_types=3, kmeans_examples=16)
    batches = list(dm.train_dataloader())
    centroids = model.fit_plan_clusters(iter(batches))
    cot = load_objective(checkpoint)
    states = [v for batch in batches[:1] for row in step_embeddings(cot, batch) for v in row]
    assert len(states) >= 16 and torch.equal(centroids, kmeans(torch.stack(states), 3, seed=0))
    types = model.plan_types(batches[0])
    assert all(0 <= t < 3 for row in types for t in row) and len(types[0]) == 2
    assert "kmeans_embedder" not in {name.split(".")[0] for name in model.state_dict()}  # frozen, kept by path


def test_rules_read_the_step_text():
    # 123 * 45 reversed: a = 3 2 1, b = 5 4; partial products 615 (d=5) and 4920 (d=4), reversed, zero padded
    question = ["3", "2", "1", "*", "5", "4"]
    assert multiplication_rule(question, 0, list("5160"), 2) == 5
    assert multiplication_rule(question, 1, list("02940"), 2) == 4
    steps = [["Tom", "is"], ["Every", "x"], ["Every", "y"]]
    assert [prosqa_rule([], k, step, 3) for k, step in enumerate(steps)] == [0, 1, 2]


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
                  *TINY_MODEL, "--model.init_args.rule", "multiplication",
                  "--data", "configs/data/multiplication.yaml", "--data.init_args.digits", "2",
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
        raw[start:start] = model.plan_tokens(kind)
    assert train_on_batch(model, one, steps=100, lr=1e-2) < 0.05  # measured 0.0024: greedy decoding is the sequence
    model.eval()
    plen = int(one["prompt_len"][0])
    prompt, budget = one["tokens"][:, :plen], len(raw) - plen + 2
    kept, returned = model.generate(prompt, budget, keep_plans=True)[0], model.generate(prompt, budget)[0]
    assert kept[: len(raw)].tolist() == raw
    assert returned[: len(row)].tolist() == row and (returned[len(row):] == model.eos_id).all()
