"""Future summaries (objectives/summaries.py): the bag-of-words target, tf-idf weights, the reverse-LM alignment,
attachment to every causal family on both trunks, the frozen companion, and the refusal by a denoising family."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_MODEL, run_cli, tiny_data
from models import Mamba, Transformer
from objectives import (BagOfWordsSummary, DeepSeekMTP, MaskedDiffusion, MultiTokenPrediction, NextTokenPrediction,
                        ReverseLMSummary)
from objectives.summaries import reverse_lm_targets

V = 20


def bag(summary, batch, T):
    """The target sets per position, read back from `targets`: {(b, t): sorted token ids} at source positions."""
    ids, first, ok, src = summary.targets(batch, T)
    return {(b, t): sorted(ids[b, t][first[b, t]].tolist())
            for b in range(ids.shape[0]) for t in range(T) if src[b, t]}


def test_bag_of_words_target_by_hand():
    # one row of 8 real tokens then 2 of padding; window 4: the bag of t is x[t+2 .. t+4]
    tokens = torch.tensor([[3, 4, 5, 3, 6, 7, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float)
    got = bag(BagOfWordsSummary(window=4), {"tokens": tokens, "loss_mask": mask}, T=9)
    assert got == {
        (0, 0): [3, 5, 6],      # x2..x4 = 5, 3, 6; x1 = 4 (next-token prediction's) is not in it
        (0, 1): [3, 6, 7],      # x3..x5
        (0, 2): [6, 7, 8],
        (0, 3): [7, 8, 9],
        (0, 4): [8, 9],         # x6, x7; x8 is padding
        (0, 5): [9],
        (0, 6): [],             # x8, x9 are padding: an empty bag
    }                           # t = 7, 8 predict padding: no summary loss there
    # a token that recurs counts once, and x[t+1] counts when it recurs further on
    rep = {"tokens": torch.tensor([[1, 2, 2, 2, 1]]), "loss_mask": torch.ones(1, 5)}
    assert bag(BagOfWordsSummary(window=3), rep, T=4)[(0, 0)] == [2]
    assert bag(BagOfWordsSummary(window=4), rep, T=4)[(0, 0)] == [1, 2]
    # the sequence end: the window is cut, nothing past the row
    assert bag(BagOfWordsSummary(window=16), rep, T=4) == {(0, 0): [1, 2], (0, 1): [1, 2], (0, 2): [1], (0, 3): []}


@pytest.mark.parametrize("weighting", ["none", "tfidf"])
def test_bag_of_words_loss_is_the_dense_binary_cross_entropy(weighting):
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), vocab_size=V,
                                summaries=[BagOfWordsSummary(window=5, weighting=weighting, chunk_size=7)])
    summary = model.summaries[0]
    tokens = torch.randint(0, V, (3, 12))
    mask = torch.ones(3, 12)
    mask[1, 9:] = 0
    batch = {"tokens": tokens, "loss_mask": mask}
    if weighting == "tfidf":
        summary.fit_idf([batch])
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    loss = summary(hidden, batch, model)
    # the same loss with a dense multi-hot (tf-idf: count-weighted) target
    logits = F.linear(summary.proj(hidden), model.unembedding) + summary.bias
    total, n = 0.0, 0
    for b in range(3):
        for t in range(11):
            if mask[b, t + 1] == 0:
                continue
            counts = torch.zeros(V)
            for k in range(2, 6):
                if t + k < 12 and mask[b, t + k] > 0:
                    counts[tokens[b, t + k]] += 1
            target = (counts > 0).float()
            w = torch.ones(V) if weighting == "none" else summary.idf * torch.where(counts > 0, counts, 1.0)
            total = total + F.binary_cross_entropy_with_logits(logits[b, t], target, weight=w, reduction="sum")
            n += 1
    expected = total / (n * 4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(loss, hidden, retain_graph=True)
    expected_grad, = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_sampled_positions_estimate_the_exact_loss_without_bias():
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), vocab_size=V,
                                summaries=[BagOfWordsSummary(window=5, positions=0.25)])
    summary = model.summaries[0]
    batch = {"tokens": torch.randint(0, V, (2, 12)), "loss_mask": torch.ones(2, 12)}
    hidden = torch.randn(2, 11, 16)
    with torch.no_grad():
        summary.eval()
        exact = summary(hidden, batch, model)
        summary.train()
        draws = torch.stack([summary(hidden, batch, model) for _ in range(1000)])
    assert draws.std() > 0.01 * exact  # each draw is an estimate ...
    assert abs(draws.mean() - exact) < 4 * draws.std() / 1000 ** 0.5  # ... of the exact loss (4 standard errors)


def test_tfidf_weights_counted_on_the_train_split_deterministic_and_stored(tmp_path, corpus_files):
    flags = ("--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data(corpus_files),
             "--model.init_args.summaries+=configs/summaries/bow_tfidf.yaml")
    first = run_cli(tmp_path / "a", *flags, steps=1)
    idf = first.model.summaries[0].idf.clone()
    assert idf.any() and torch.isclose(idf.mean(), torch.tensor(1.0))
    # rare tokens weigh more than the most frequent ones
    assert idf.max() > 1.5 * idf.min()
    second = run_cli(tmp_path / "b", *flags, steps=1)
    assert torch.equal(second.model.summaries[0].idf, idf)
    # stored with the run, and a resumed run keeps the stored weights rather than counting again
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    stored = torch.load(ckpt, weights_only=True)["state_dict"]["summaries.0.idf"]
    assert torch.equal(stored, idf)
    fresh = BagOfWordsSummary(weighting="tfidf")
    fresh.attach(first.model)
    fresh.load_state_dict(first.model.summaries[0].state_dict())
    fresh.ensure_idf(object())  # no trainer: would raise if it tried to count again
    assert torch.equal(fresh.idf, idf)


class CumulativeSum(nn.Module):
    """A causal trunk whose output at j is the sum of its inputs 0..j."""

    supported_masks = ("causal",)

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model, self.max_seq_len, self.blocks = d_model, 64, nn.ModuleList()

    def forward(self, x, *, mask="causal", cache=None, **kwargs):
        return x.cumsum(1)


def test_reverse_lm_targets_summarise_exactly_the_future_after_the_next_token():
    # one-hot embeddings and a cumulative-sum trunk: the reverse model's state is the token count of what it has read
    reverse = NextTokenPrediction(CumulativeSum(V), vocab_size=V, reverse=True)
    with torch.no_grad():
        reverse.embed.weight.copy_(torch.eye(V))
    tokens = torch.randint(0, V, (2, 9))
    T = tokens.shape[1] - 1
    targets, has = reverse_lm_targets(reverse, tokens, T)
    assert has.tolist() == [True] * (T - 1) + [False]
    for t in range(T - 1):
        counts = F.one_hot(tokens[:, t + 2 :], V).sum(1).float()   # the bag of x[t+2 ..]
        torch.testing.assert_close(targets[:, t], counts)


def reverse_checkpoint(tmp_path, corpus_files) -> str:
    run_cli(tmp_path / "reverse", "--config", "configs/experiments/reverse_lm_code.yaml", *TINY_MODEL,
            *tiny_data(corpus_files), steps=1)
    return str(next((tmp_path / "reverse").rglob("last.ckpt")))


def test_frozen_reverse_lm_gets_no_gradient_and_is_outside_the_optimizer(tmp_path, corpus_files):
    path = reverse_checkpoint(tmp_path, corpus_files)
    cli = run_cli(tmp_path / "forward", "--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data(corpus_files),
                  "--model.init_args.summaries+=configs/summaries/revlm.yaml",
                  "--model.init_args.summaries.init_args.checkpoint", path, steps=2)
    model, summary = cli.model, cli.model.summaries[0]
    companion = summary.companion.model
    assert not companion.training and all(not p.requires_grad for p in companion.parameters())
    in_optimizer = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in companion.parameters())
    assert all(id(p) in in_optimizer for p in summary.head.parameters())
    # its weights are the checkpoint's after training, and the run's checkpoint does not store them
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in companion.state_dict().items())
    assert not any(k.startswith("summaries.0.companion") for k in model.state_dict())
    assert "val/fsp_rev_loss" in cli.trainer.callback_metrics and "val/ntp_loss" in cli.trainer.callback_metrics


@pytest.mark.parametrize("trunk", ["transformer", "mamba"])
@pytest.mark.parametrize("family", [NextTokenPrediction, MultiTokenPrediction, DeepSeekMTP])
def test_summaries_attach_to_every_causal_family_on_both_trunks(family, trunk):
    torch.manual_seed(0)
    make = (lambda: Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)) if trunk == "transformer" \
        else (lambda: Mamba(d_model=32, n_layers=2, max_seq_len=32))
    model = family(make(), vocab_size=V, summaries=[BagOfWordsSummary(window=4)])
    batch = {"tokens": torch.randint(0, V, (2, 12)), "loss_mask": torch.ones(2, 12)}
    out = model.loss(batch)
    plain = family(make(), vocab_size=V).loss(batch)
    assert torch.isfinite(out["loss"]) and out["ntp_tokens"] == plain["ntp_tokens"]
    out["loss"].backward()
    assert model.summaries[0].proj.weight.grad.abs().sum() > 0  # the summary's loss is part of the objective's


def test_summary_losses_are_logged_under_val_in_validation(tmp_path, corpus_files):
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--model", "configs/objectives/mtp.yaml",
                  *TINY_MODEL, *tiny_data(corpus_files), "--model.init_args.summaries+=configs/summaries/bow.yaml",
                  "--trainer.log_every_n_steps", "1", steps=2)
    logged = cli.trainer.callback_metrics
    assert {"train/fsp_bow_loss", "val/fsp_bow_loss", "val/ntp_loss"} <= set(logged)
    assert float(logged["train/fsp_bow_loss"]) != float(logged["val/fsp_bow_loss"])
    validated = run_cli(tmp_path / "v", "--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data(corpus_files),
                        "--model.init_args.summaries+=configs/summaries/bow.yaml", subcommand="validate")
    assert "val/fsp_bow_loss" in validated.trainer.callback_metrics
    assert not any(k.startswith("train/") for k in validated.trainer.callback_metrics)


class Recorder(nn.Module):
    """A summary that keeps the batch it was given and adds nothing."""

    name, weight = "recorder", 0.0

    def attach(self, objective):
        pass

    def forward(self, hidden, batch, objective):
        self.seen = batch
        return hidden.sum() * 0


def test_a_reversed_model_hands_its_summaries_the_reversed_batch():
    model = NextTokenPrediction(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), vocab_size=V,
                                reverse=True, summaries=[Recorder()])
    tokens = torch.arange(10)[None].repeat(2, 1)
    mask = torch.ones(2, 10)
    mask[:, :3] = 0
    model.loss({"tokens": tokens, "loss_mask": mask, "prompt_len": torch.tensor([3, 3])})
    seen = model.summaries[0].seen
    assert torch.equal(seen["tokens"], tokens.flip(1)) and torch.equal(seen["loss_mask"], mask.flip(1))
    assert torch.equal(seen["prompt_len"], torch.tensor([3, 3]))


def test_a_denoising_family_refuses_a_summary_naming_both():
    trunk = Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.raises(ValueError, match="BagOfWordsSummary cannot attach to MaskedDiffusion"):
        MaskedDiffusion(trunk, vocab_size=V, summaries=[BagOfWordsSummary()])


def test_reverse_lm_summary_without_its_checkpoint_says_how_to_make_one(tmp_path):
    trunk = Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.raises(FileNotFoundError, match="reverse_lm_code.yaml"):
        NextTokenPrediction(trunk, vocab_size=V, summaries=[ReverseLMSummary(str(tmp_path / "none.ckpt"))])
