"""Multi-token heads trained on the model's own greedy continuation (head_targets "self", Medusa-2's
self-distillation): the targets are the continuation, only whole generated paths count, only the heads learn."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import Transformer
from objectives import MultiTokenPrediction
from objectives.decoding.greedy import left_to_right
from objectives.training import metrics as M

VOCAB, PREFIX = 50, 4


def self_heads(head_type: str = "mlp", topology: str = "parallel") -> MultiTokenPrediction:
    """A tiny model whose weights are drawn wide (std 0.5), so that its greedy continuation wanders over the
    vocabulary rather than repeating one token (at the usual init it does), and heads that start away from the
    zero init."""
    torch.manual_seed(0)
    model = MultiTokenPrediction(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=VOCAB,
                                 n_future=3, head_type=head_type, topology=topology, head_targets="self",
                                 self_prefix=PREFIX)
    heads = {id(p) for p in model.heads.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1 if id(p) in heads else 0.5)
    return model.train()


def batch(rows: int = 3, length: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, VOCAB, (rows, length), generator=g),
            "loss_mask": (torch.rand(rows, length, generator=g) > 0.2).float()}


def test_the_heads_targets_are_the_models_own_continuation_past_the_prompt():
    model, b = self_heads(), batch()
    tokens, L = b["tokens"], b["tokens"].shape[1]
    own, masks = model.own_continuation(tokens)
    assert torch.equal(own, left_to_right(model, tokens[:, :PREFIX], L - PREFIX))
    assert torch.equal(own[:, :PREFIX], tokens[:, :PREFIX]) and not torch.equal(own, tokens)
    for k, mask in enumerate(masks, start=1):  # target j counts iff its position j - k is the prompt's last or later
        assert mask.shape == tokens.shape
        assert all(row.nonzero()[:, 0].tolist() == list(range(PREFIX - 1 + k, L)) for row in mask)

    out = model.loss(b)
    with torch.no_grad():  # by hand: head k at positions t >= PREFIX - 1 against own[t + k]
        states = model.head_states(model.hidden(own[:, :-1]))
        for k, state in enumerate(states, start=1):
            positions = torch.arange(PREFIX - 1, L - k)
            logits = model.logits(model.head_output(k - 1, state[:, positions]))
            targets = own[:, positions + k]
            loss, count = out["metrics"][M.head_loss(k)]
            torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
            assert count == targets.numel()
            accuracy = (logits.argmax(-1) == targets).float().mean()
            torch.testing.assert_close(out["metrics"][M.head_acc(k)][0], accuracy)
    # head 1 is the model itself: on its own greedy continuation it is right at every counted position
    assert float(out["metrics"][M.head_acc(1)][0]) == 1.0


def test_validation_keeps_the_datas_tokens():
    model, b = self_heads(), batch()
    data = MultiTokenPrediction(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=VOCAB,
                                n_future=3, head_type="mlp")
    data.load_state_dict(model.state_dict())
    model.eval(), data.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.loss(b)["loss"], data.loss(b)["loss"])
    model.train()
    with torch.no_grad():  # a no-grad forward in training mode (a progress figure) reads the data too
        torch.testing.assert_close(model.loss(b)["loss"], data.loss(b)["loss"])


@pytest.mark.parametrize("topology,head_type", [("parallel", "mlp"), ("causal", "block")])
def test_only_the_heads_learn_and_the_per_head_backward_gives_the_plain_gradients(topology, head_type):
    model, b = self_heads(head_type, topology), batch()
    heads = {n for n, _ in model.named_parameters() if n.startswith(("heads.", "head_norm."))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == heads
    assert not model.trunk.training  # frozen, and in eval mode (no dropout) while the heads train

    def gradients(per_head: bool) -> dict[str, torch.Tensor]:
        model.per_head_backward = per_head
        model.zero_grad(set_to_none=True)
        model.loss(b)["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(grads[n] is None for n in grads if n not in heads), "the frozen model took a gradient"
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in heads), "a head took no gradient"
        return {n: grads[n].clone() for n in heads}

    efficient, plain = gradients(True), gradients(False)
    for name in heads:
        torch.testing.assert_close(efficient[name], plain[name], rtol=1e-5, atol=1e-7)


def test_training_on_the_own_continuation_raises_the_heads_agreement_with_it():
    model, b = self_heads(), batch(rows=8, length=24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)

    def agreement(k: int) -> float:  # head k's accuracy against the greedy continuation, in training mode
        return float(model.loss(b)["metrics"][M.head_acc(k)][0])

    before = [agreement(2), agreement(3)]
    for _ in range(40):
        optimizer.zero_grad()
        model.loss(b)["loss"].backward()
        optimizer.step()
    after = [agreement(2), agreement(3)]
    assert after[0] > before[0] + 0.3 and after[1] > before[1] + 0.2, (before, after)


def test_refusals_name_the_way_out():
    def build(**options):
        options = {"n_future": 3, "head_targets": "self", **options}
        return MultiTokenPrediction(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=VOCAB,
                                    **options)

    with pytest.raises(ValueError, match="use 'data' .* or 'self'"):
        build(head_targets="teacher")
    with pytest.raises(ValueError, match="n_future 1 has none: raise n_future"):
        build(n_future=1)
    with pytest.raises(ValueError, match="use topology 'parallel' or 'causal'"):
        build(topology="siblings")
    with pytest.raises(ValueError, match="self_prefix .* at least 1"):
        build(self_prefix=0)
    model = build(self_prefix=PREFIX).train()
    with pytest.raises(ValueError, match=f"self_prefix={PREFIX} .*lower self_prefix below 4 or raise the data's "
                                         f"seq_len"):
        model.loss(batch(length=PREFIX + 1))
    model.loss(batch(length=PREFIX + 2))  # one generated target for head 2: enough
    teacherless = {**batch(), "inputs": batch(seed=1)["tokens"]}
    with pytest.raises(ValueError, match="teacherless.*use head_targets 'data'"):
        model.loss(teacherless)
