"""The student-forced objective of objectives/distill.py (Kirchenbauer et al. 2026): the labels are the teacher's
argmax after the prefix and the student's own earlier proposals (not after the teacher's rollout), the loss is the
student's cross-entropy on them, the whole student trains while the teacher stays frozen, and a step runs through
the CLI."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import quickstart, run_cli
from models import Transformer
from ntp_checkpoint import ntp_checkpoint
from objectives.distill import FrozenStart, SelfDistillation, mask_layout
from objectives.training.checkpoints import FrozenCompanion, load_checkpoint
from objectives.training.optim import decay_groups
from test_distill import batch_of

MASK_TOKENS = [7, 8, 9]  # what the three masks propose in the copying network


def copying_retrofit() -> SelfDistillation:
    """k = 4 over a network scaled until each position predicts the token it reads (the residual stream outweighs
    attention), student and teacher alike; the masks' embeddings are those of MASK_TOKENS, so mask s proposes
    MASK_TOKENS[s-1]. Then the teacher's rollout after x_t is x_t x_t x_t x_t, the student proposes
    x_t 7 8 9, and the teacher, reading x_t 7 8 in the masks' places, labels the four positions x_t x_t 7 8."""
    torch.manual_seed(0)
    model = SelfDistillation(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=50, k=4,
                             objective="student_forced").eval()
    with torch.no_grad():
        for network in (model, model.teacher):
            network.embed.weight.mul_(30)
        model.mask_embed.weight.copy_(model.embed.weight[MASK_TOKENS])
    return model


def test_labels_are_the_teachers_argmax_after_the_students_proposals_and_the_loss_their_cross_entropy(monkeypatch):
    model = copying_retrofit()
    tokens = torch.arange(10, 30).repeat(2, 1)  # distinct tokens, so that each anchor's x_t is its own
    anchors = torch.tensor([[4, 13], [9, 17]])
    counted = torch.tensor([[[True, True, True], [True, True, False]],  # k_r = 4, 3
                            [[True, False, False], [True, True, True]]])  # k_r = 2, 4
    monkeypatch.setattr(model, "sample_regions", lambda batch: (anchors, counted))
    last = tokens.gather(1, anchors)  # x_t per region [B, R]
    layout = mask_layout(torch.full((2,), 20), 20, anchors, 3)
    proposals = torch.stack([last, *(torch.full_like(last, m) for m in MASK_TOKENS)], 2)
    labels, _ = model.teacher_scores(tokens, proposals, anchors, layout)
    by_hand = torch.stack([last, last, *(torch.full_like(last, m) for m in MASK_TOKENS[:2])], 2)
    assert labels.tolist() == by_hand.tolist()
    rollout, _ = model.teacher_rollouts(tokens, anchors, model.k)
    assert rollout.tolist() == last[..., None].expand(-1, -1, 4).tolist()  # the teacher copies: x_t x_t x_t x_t
    assert (labels != rollout).any()  # the case tells the two targets apart

    # the student's k distributions per region, from plain causal forwards of x_<=t and the masks (gate on at them);
    # the teacher's from plain causal forwards of x_<=t and the proposals (for target "kl", the soft teacher)
    expected, rollout_loss, expected_kl, weights = 0.0, 0.0, 0.0, 0.0
    for b in range(2):
        for r, t in enumerate(anchors[b].tolist()):
            x = torch.cat([model.embed(tokens[b : b + 1, : t + 1]), model.mask_embed.weight[None]], 1)
            with torch.no_grad(), model.gated(t + 1):  # the adapters on at the masks
                q = model.logits(model.trunk(x))[0, t:].float()  # [k, V]: the next token, then masks 1..3
            assert q.argmax(-1).tolist() == proposals[b, r].tolist()
            read = torch.cat([tokens[b, : t + 1], proposals[b, r, :3]])[None]
            with torch.no_grad():
                p = model.teacher.logits(model.teacher.hidden(read))[0, t:].float()
            weight = torch.cat([counted[b, r, :1], counted[b, r]]).float()
            expected += (F.cross_entropy(q, by_hand[b, r], reduction="none") * weight).sum()
            kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            expected_kl += (kl * weight).sum()
            rollout_loss += (F.cross_entropy(q, rollout[b, r], reduction="none") * weight).sum()
            weights += weight.sum()
    batch = {"tokens": tokens, "loss_mask": torch.ones(2, 20)}
    with torch.no_grad():
        loss = model.loss(batch)["loss"]
    torch.testing.assert_close(loss, expected / weights, rtol=1e-5, atol=1e-5)
    # scored on the teacher's rollout instead, the loss would be another, far outside the tolerance
    assert abs(float(rollout_loss - expected) / float(weights)) > 0.1
    model.target = "kl"
    with torch.no_grad():
        torch.testing.assert_close(model.loss(batch)["loss"], expected_kl / weights, rtol=1e-5, atol=1e-5)


def test_labels_equal_plain_teacher_forwards_of_the_prefix_and_the_proposals():
    """With a teacher that reads attention and positions (the copying one above reads neither), the packed forward
    labels what a plain causal forward of x_<=t followed by y_<j gives, for every region at once."""
    torch.manual_seed(0)
    model = SelfDistillation(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=50, k=4,
                             objective="student_forced")
    with torch.no_grad():  # outputs that depend on context: matrices larger than their init (not the embedding
        for p in model.teacher.parameters():  # alone, which would make the residual stream copy its token)
            if p.dim() == 2:
                p.normal_(std=0.3)
    tokens = batch_of(model, B=2, L=20, seed=5)["tokens"]
    anchors = torch.tensor([[2, 11, 19], [7, 8, 15]])
    proposals = torch.randint(1, 50, (2, 3, 4), generator=torch.Generator().manual_seed(6))
    labels, _ = model.teacher_scores(tokens, proposals, anchors, mask_layout(torch.full((2,), 20), 20, anchors, 3))
    teacher = model.teacher
    for b in range(2):
        for r, t in enumerate(anchors[b].tolist()):
            read = torch.cat([tokens[b, : t + 1], proposals[b, r, :3]])[None]
            assert labels[b, r].tolist() == teacher.logits(teacher.hidden(read))[0, t:].argmax(-1).tolist(), (b, t)
    assert (labels[..., 1:] != proposals[..., :3]).float().mean() > 0.5  # not a teacher that copies what it reads


def test_the_whole_student_trains_and_the_teacher_stays_frozen():
    """Every parameter of the student (network, mask embeddings, adapters) gets a gradient; the teacher, a frozen
    copy of the network as it started (no checkpoint given), gets none, is left out of the optimizer, and keeps its
    weights through a step that moves the student's."""
    torch.manual_seed(0)
    model = SelfDistillation(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=128), vocab_size=60, k=4,
                             regions=5, objective="student_forced").train()
    assert isinstance(model.teacher, FrozenStart) and not model.teacher.training
    with torch.no_grad():  # adapters away from zero, so that their A matrices get a gradient too
        for adapter in model.adapters.values():
            adapter.b.normal_(std=0.1)
    student = {n: p for n, p in model.named_parameters() if not n.startswith("teacher.")}
    teacher = dict(model.teacher.named_parameters())
    assert teacher and not any(p.requires_grad for p in teacher.values())
    model.loss(batch_of(model))["loss"].backward()
    assert all(p.requires_grad for p in student.values())
    no_gradient = [n for n, p in student.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_gradient, no_gradient
    assert all(p.grad is None for p in teacher.values())
    optimized = {id(p) for group in decay_groups(model) for p in group["params"]}
    assert optimized == {id(p) for p in student.values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(decay_groups(model), lr=0.1).step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("teacher."))
    assert all(not torch.equal(p, before[n]) for n, p in student.items())
    # the frozen-network objective, for contrast: only adapters and mask embeddings train
    rollout_model = SelfDistillation(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=128),
                                     vocab_size=60, k=4)
    assert rollout_model.teacher is None and not any(p.requires_grad for p in rollout_model.trunk.parameters())


def test_a_student_forced_retrofit_trains_a_step_through_the_cli(tmp_path, corpus_files):
    """The shipped config, warm-started from an NTP checkpoint that is also its teacher: after one step the
    student's network has moved away from the teacher's weights and the teacher has kept the checkpoint's."""
    ckpt = ntp_checkpoint(tuple(corpus_files))
    cli = run_cli(tmp_path, *quickstart(corpus_files, "--model", "configs/objectives/distill_student_forced.yaml",
                                        "--model.init_args.init_from", str(ckpt),
                                        "--model.init_args.regions", "6"), steps=1)
    model = cli.model
    assert cli.trainer.global_step == 1 and model.hparams.objective == "student_forced"
    assert isinstance(model.teacher, FrozenCompanion) and not model.adapters  # lora_rank 0: the paper's form
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    saved = load_checkpoint(ckpt)["state_dict"]
    assert all(torch.equal(p, saved[n]) for n, p in model.teacher.model.state_dict().items())
    network = {n: p for n, p in model.state_dict().items() if n.startswith(("trunk.", "embed."))}
    unchanged = [n for n, p in network.items() if torch.equal(p, saved[n])]
    assert network and not unchanged, unchanged


def test_the_sampler_head_and_unknown_objectives_are_refused():
    trunk = Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    with pytest.raises(ValueError, match="sampler_head"):
        SelfDistillation(trunk, vocab_size=50, objective="student_forced", sampler_head=True)
    with pytest.raises(ValueError, match="student_forced"):
        SelfDistillation(trunk, vocab_size=50, objective="student")
