"""Coconut: the multi-pass forward against a plain loop of full forwards, the curriculum's replaced steps, ragged
generation, the optimizer reset at a stage change, one-step fits of every ProsQA config on both trunks, the
ProsQA-style generator and the public file format."""
from __future__ import annotations

import json
import random
from collections import deque

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from datamodules import ReasoningDataModule
from datamodules.prosqa import ProsQAGraphTask
from datamodules.reasoning import SequenceOptions, SpecialIds, build_sequence, collate
from models import Mamba, Transformer
from objectives import Coconut
from objectives.coconut import COCONUT_STAGE, OptimizerReset
from objectives.training.losses import chunked_cross_entropy

V, EOS = 24, 1
IDS = SpecialIds(pad=0, eos=EOS, step=3, ans=4, dummy=5)


def hand_batch() -> dict:
    """Three questions of different lengths with 3, 2 and 4 steps."""
    items = [([6, 7, 8], [[9, 10], [11], [12, 13, 14]], [15, 16]),
             ([6, 7, 8, 9, 10, 11], [[12], [13, 14]], [17]),
             ([7, 7], [[8], [9], [10], [11]], [18, 19])]
    return collate([build_sequence(q, s, a, IDS, SequenceOptions()) for q, s, a in items], IDS.pad)


# hand_batch()'s rows as the batch writes them: answers (<ans> ... <eos>), steps (each ending in <step>), questions
HAND_ANSWERS = [[4, 15, 16, 1], [4, 17, 1], [4, 18, 19, 1]]
HAND_STEPS = [[[9, 10, 3], [11, 3], [12, 13, 14, 3]], [[12, 3], [13, 14, 3]], [[8, 3], [9, 3], [10, 3], [11, 3]]]
HAND_QUESTIONS = [[6, 7, 8], [6, 7, 8, 9, 10, 11], [7, 7]]


def words_at(b: int, stage: int) -> list[int]:
    """What row b keeps in words at a stage (max_latent_stage 3): the steps after the first `stage`, or none beyond
    stage 3, then the answer."""
    skip = len(HAND_STEPS[b]) if stage > 3 else stage
    return [t for s in HAND_STEPS[b][skip:] for t in s] + HAND_ANSWERS[b]


def trunk(kind: str):
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=400)
    return Mamba(d_model=32, n_layers=2)


def model(kind: str, **kw) -> Coconut:
    return Coconut(trunk(kind), vocab_size=V, eos_id=EOS, max_latent_stage=3, **kw)


def test_stage_replaces_exactly_the_first_k_steps():
    m = model("transformer", thoughts_per_step=2)
    bot, eot, lat = V, V + 1, V + 2
    batch = hand_batch()
    questions = HAND_QUESTIONS
    for stage in range(6):
        lb = m.latent_batch(batch, stage)
        for b in range(3):
            n = 2 * min(stage, 3)  # beyond max_latent_stage: padded to 3 stages of 2 thoughts
            words = words_at(b, stage)
            expected = questions[b] + [bot] + [lat] * n + [eot] + words
            L_b = int(lb["lengths"][b])
            assert lb["ids"][b, :L_b].tolist() == expected, (stage, b)
            assert lb["loss_mask"][b, :L_b].tolist() == [0.0] * (len(expected) - len(words)) + [1.0] * len(words)
            assert int(lb["first"][b]) == len(questions[b]) + 1 and int(lb["n_thoughts"][b]) == n
            kept = lb["source"][b, :L_b]
            assert torch.equal(batch["tokens"][b, kept[kept >= 0]], torch.tensor(questions[b] + words))
    unpadded = model("transformer", pad_latent_to_max=False)
    assert unpadded.latent_batch(batch, 5)["n_thoughts"].tolist() == [3, 2, 3]


def reference_loss(m: Coconut, lb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Coconut by definition: for each thought a full forward over the whole sequence, then the thought's input
    is the hidden state one position before it; the loss from one more full forward."""
    embeds = m.embed(lb["ids"])
    for i in range(int(lb["n_thoughts"].max())):
        hidden = m.trunk(embeds)
        rows = []
        for b in range(embeds.shape[0]):
            p = int(lb["first"][b]) + i
            row = embeds[b]
            if i < int(lb["n_thoughts"][b]):
                row = torch.cat([row[:p], hidden[b, p - 1 : p], row[p + 1 :]])
            rows.append(row)
        embeds = torch.stack(rows)
    logits = m.logits(m.trunk(embeds))[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), lb["ids"][:, 1:], reduction="none")
    return (nll * lb["loss_mask"][:, 1:]).sum(), embeds


PASSES = [("transformer", "cache"), ("transformer", "recompute"), ("mamba", "auto"), ("mamba", "recompute")]


@pytest.mark.parametrize("kind,passes", PASSES)
def test_multi_pass_forward_and_gradients_equal_one_forward_over_the_thoughts(kind, passes):
    m = model(kind, passes=passes)
    lb = m.latent_batch(hand_batch(), 3)
    ref, ref_embeds = reference_loss(m, lb)
    ref_grads = torch.autograd.grad(ref, list(m.parameters()), allow_unused=True)
    hidden, targets, weights, embeds = m.thought_forward(lb)
    nll, count, _ = chunked_cross_entropy(hidden, m.unembedding, targets, weights)
    grads = torch.autograd.grad(nll, list(m.parameters()), allow_unused=True)
    assert int(count) == int(lb["loss_mask"][:, 1:].sum())
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
            continue
        assert float((g - r).norm() / r.norm().clamp(min=1e-12)) < 1e-5
    # the thoughts are live: the loss depends on them through every pass
    assert ref_grads[0] is not None and float(ref_grads[0].norm()) > 0
    # one forward given the same thoughts as input embeddings gives the same hidden states
    one = m.trunk(embeds)
    rows = torch.arange(3)[:, None]
    positions = targets.new_zeros(targets.shape)
    if hidden.shape[1] != one.shape[1] - 1:  # the cached path returns each row's tail from its last thought on
        start = lb["first"] + lb["n_thoughts"] - 1
        positions = (start[:, None] + torch.arange(hidden.shape[1])).clamp(max=one.shape[1] - 1)
        real = weights > 0
        torch.testing.assert_close(hidden[real], one[rows.expand_as(positions), positions][real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(hidden, one[:, :-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "mamba"])
@pytest.mark.parametrize("thought", ["continuous", "pause"])
def test_ragged_generation_at_batch_3_equals_each_row_alone(kind, thought):
    m = model(kind, thought=thought).eval()
    m.stage = 2
    torch.manual_seed(1)
    prompts = [torch.randint(6, V, (n,)) for n in (5, 11, 3)]
    padded = torch.zeros(3, 11, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    lengths = torch.tensor([len(p) for p in prompts])
    together = m.generate(padded, 10, prompt_lengths=lengths)
    for b, p in enumerate(prompts):
        alone = m.generate(p[None], 10)[0]
        assert together[b, : len(p) + 10].tolist() == alone.tolist()
        assert alone[len(p) : len(p) + 4].tolist() == [V, V + 2, V + 2, V + 1]  # <bot>, 2 thoughts, <eot>
        assert (alone[len(p) + 4 :] < V).all()  # then words of the data's vocabulary only


@pytest.mark.parametrize("kind", ["transformer", "mamba"])
def test_cached_passes_and_ragged_generation_run_under_bf16_autocast(kind):
    # the bf16-mixed default of CPUs with bf16: the cache takes autocast's dtype, not the weights'
    m = model(kind, start_stage=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.loss(hand_batch())["loss"].backward()
        m.eval()
        out = m.generate(torch.tensor([[6, 7, 8, 9], [6, 7, 0, 0]]), 8, prompt_lengths=torch.tensor([4, 2]))
    assert out[0, 4:9].tolist() == [V] + [V + 2] * 3 + [V + 1] and out[1, 2:7].tolist() == [V] + [V + 2] * 3 + [V + 1]


def tiny_prosqa(**kw) -> ReasoningDataModule:
    return ReasoningDataModule(task="prosqa_alg1", num_nodes=18, train_size=64, val_size=4, test_size=4,
                               batch_size=4, **kw)


class RecordOptimizer(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.steps.append(max((int(s["step"]) for s in state.values()), default=0))


def test_optimizer_state_is_cleared_at_each_stage_change():
    data = tiny_prosqa()
    m = Coconut(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=400), vocab_size=data.vocab_size,
                eos_id=data.eos_id, stage_every=2, max_latent_stage=6)
    record = RecordOptimizer()
    trainer = L.Trainer(max_steps=5, callbacks=[record], limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, datamodule=data)
    reset = next(c for c in trainer.callbacks if isinstance(c, OptimizerReset))
    # RecordOptimizer runs before OptimizerReset: Adam's step count restarts after the stage changes at steps
    # 2 and 4 (without the reset: 0, 1, 2, 3, 4)
    assert record.steps == [0, 1, 2, 1, 2]
    assert reset.resets == 2 and m.stage == 2
    assert float(trainer.callback_metrics[COCONUT_STAGE]) == 2.0
    kept = Coconut(trunk("transformer"), vocab_size=V, eos_id=EOS, stage_every=2, reset_optimizer=False)
    assert kept.configure_callbacks() == []


CONFIGS = ["prosqa_cot", "prosqa_no_cot", "prosqa_coconut", "prosqa_pause", "prosqa_coconut_no_curriculum",
           "prosqa_coconut_mamba"]
SMALL = ["--model.init_args.trunk.init_args.d_model", "32", "--model.init_args.trunk.init_args.n_layers", "1",
         "--data.init_args.num_nodes", "18", "--data.init_args.val_size", "2", "--data.init_args.test_size", "2",
         "--data.init_args.train_size", "8", "--data.init_args.batch_size", "2", "--model.init_args.eval_examples", "2",
         "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_prosqa_config_fits_a_step_on_the_other_trunk(config, tmp_path):
    """Smoke test: each ProsQA experiment fits a step on the other trunk and scores its two val questions, none of
    which a model one step from random init answers."""
    # tests/test_configs.py fits every experiment on its own trunk; here each one fits on the other trunk
    other = "transformer" if config.endswith("mamba") else "mamba"
    swap = (["--model.init_args.trunk", "configs/models/mamba-tiny.yaml"] if other == "mamba"
            else ["--model.init_args.trunk", "configs/models/transformer-tiny.yaml",
                  "--model.init_args.trunk.init_args.max_seq_len", "400"])
    cli = run_cli(tmp_path, "--config", f"configs/experiments/{config}.yaml", *swap, *SMALL, steps=1)
    assert cli.trainer.global_step == 1
    assert type(cli.model.trunk).__name__ == {"transformer": "Transformer", "mamba": "Mamba"}[other]
    assert cli.model.scorer.scored == 2 and float(cli.trainer.callback_metrics["val/accuracy"]) == 0.0
    if isinstance(cli.model, Coconut):
        assert COCONUT_STAGE in cli.trainer.callback_metrics


def reachable(edges: dict, start: str) -> dict:
    dist, todo = {start: 0}, deque([start])
    while todo:
        u = todo.popleft()
        for v in edges.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
    return dist


def test_prosqa_generator_follows_algorithm_1():
    task = ProsQAGraphTask(num_nodes=23)
    counts, entities = {}, []
    for i in range(60):
        ex = task.sample(random.Random(i))
        facts = " ".join(ex.question).split(" . ")
        ask = facts.pop().split()
        assert ask[0] == "Is" and ask[4] == "or" and ask[-1] == "?"
        entity, options = ask[1], (ask[3], ask[5])
        edges, names = {}, set()
        for f in facts:
            w = f.split()
            child = w[1] if w[0] == "Every" else w[0]
            if w[0] != "Every":
                names.add(child)
            edges.setdefault(child, set()).add(w[-1])
        dist = reachable(edges, entity)
        target = ex.answer[3]
        assert ex.answer == [entity, "is", "a", target, "."] and target in options
        assert [o in dist for o in options].count(True) == 1  # the true target is reachable, the false one not
        assert len(ex.steps) == dist[target] and 3 <= len(ex.steps) <= 6
        counts[len(ex.steps)] = counts.get(len(ex.steps), 0) + 1
        entities.append(len(names))
    assert len(counts) >= 3 and max(entities) >= 3 and min(entities) >= 1  # several named entities


def test_public_file_format_loads_and_trains(tmp_path):
    task = ProsQAGraphTask(num_nodes=18)
    records = []
    for i in range(12):  # the public file's shape: text fields with punctuation attached, plus graph fields
        ex = task.sample(random.Random(i)).to_record()
        records.append({"question": ex["question"].replace(" .", ".").replace(" ?", "?"),
                        "steps": [s.replace(" .", ".") for s in ex["steps"]],
                        "answer": ex["answer"].replace(" .", "."), "idx_to_symbol": ["Tom"], "edges": [[0, 1]],
                        "root": 0, "target": 1, "neg_target": 2})
    path = tmp_path / "prosqa_valid.json"
    path.write_text(json.dumps(records))
    data = ReasoningDataModule(task="file", train_file=str(path), val_size=2, test_size=2, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    m = Coconut(trunk("transformer"), vocab_size=data.vocab_size, eos_id=data.eos_id, max_latent_stage=6)
    lb = m.latent_batch(batch, 1)
    assert (lb["n_thoughts"] == 1).all()
    assert bool(torch.isfinite(m.loss(batch)["loss"]))


def test_without_thoughts_the_curriculum_removes_exactly_k_steps_and_inserts_no_latent():
    """thoughts_per_step=0, the paper's "w/o thought" control: stage k drops the first k steps and nothing but
    <bot> <eot> takes their place."""
    m = model("transformer", thoughts_per_step=0)
    bot, eot, lat = V, V + 1, V + 2
    batch = hand_batch()
    for stage in range(5):
        lb = m.latent_batch(batch, stage)
        assert lb["n_thoughts"].tolist() == [0, 0, 0] and not bool((lb["ids"] == lat).any())
        for b in range(3):
            L_b = int(lb["lengths"][b])
            assert lb["ids"][b, :L_b].tolist() == HAND_QUESTIONS[b] + [bot, eot] + words_at(b, stage), (stage, b)
    loss = m.loss(batch)["loss"]
    assert torch.isfinite(loss)
    out = m.generate(torch.tensor([HAND_QUESTIONS[0]]), 6)
    assert out[0, 3:5].tolist() == [bot, eot]  # no thought between the markers


def test_a_longer_first_stage_delays_every_later_stage():
    m = model("transformer", stage_every=10, first_stage=25)
    assert [m.stage_at(s, 0) for s in (0, 24, 25, 34, 35, 45)] == [0, 0, 1, 1, 2, 3]
    plain = model("transformer", stage_every=10)
    assert [plain.stage_at(s, 0) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
