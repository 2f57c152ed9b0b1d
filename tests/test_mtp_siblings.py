"""Multi-token heads as siblings of the trunk's last layer (Meta's released wiring): the loss and its per-head
backward against a forward written out by hand from the trunk's modules, head 1 as the trunk's last layer, and
speculative decoding with the sibling heads as drafters giving plain greedy output."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_mtp import batch, trunk
from test_speculative import prompt, transformer, varied
from test_trunk_contract import TRUNKS
from objectives import MultiTokenPrediction, NextTokenPrediction


def siblings(layers: int = 3, n_future: int = 3, **options) -> MultiTokenPrediction:
    torch.manual_seed(0)
    return MultiTokenPrediction(trunk(layers), vocab_size=50, n_future=n_future, topology="siblings", **options)


def by_hand(model: MultiTokenPrediction, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each head's logits [B, T, V] from the modules themselves: the trunk's blocks but its last head_layers give
    z; head 1 is those last blocks, head k its own; every head then the trunk's final norm and the unembedding."""
    m, blocks = model.head_layers, list(model.trunk.blocks)
    z = model.embed(tokens)
    for block in blocks[:-m]:
        z = block(z)
    heads = [blocks[-m:], *model.heads]
    outputs = []
    for layers in heads:
        x = z
        for block in layers:
            x = block(x)
        outputs.append(F.linear(model.trunk.norm(x), model.embed.weight))
    return outputs


def naive_loss(model: MultiTokenPrediction, b: dict, reduction: str) -> torch.Tensor:
    """sum_k w_k CE_k, head k's CE the mean over its targets t+k, w_k = 1 (sum) or 1/n (mean)."""
    tokens, mask = b["tokens"], b["loss_mask"]
    losses = []
    for k, logits in enumerate(by_hand(model, tokens[:, :-1]), start=1):
        L = tokens.shape[1] - k  # positions whose token k ahead exists
        nll = F.cross_entropy(logits[:, :L].flatten(0, 1), tokens[:, k:].flatten(), reduction="none")
        losses.append((nll * mask[:, k:].flatten()).sum() / mask[:, k:].sum())
    total = torch.stack(losses).sum()
    return total if reduction == "sum" else total / len(losses)


@pytest.mark.parametrize("reduction,per_head,head_layers", [("sum", True, 1), ("mean", True, 1), ("sum", False, 1),
                                                            ("mean", True, 2)])
def test_sibling_heads_have_the_gradients_of_the_forward_written_by_hand(reduction, per_head, head_layers):
    model = siblings(layers=4, head_reduction=reduction, per_head_backward=per_head, head_layers=head_layers,
                     ce_chunk_size=16 * 50 * 4 / 2**20)  # 16 positions' fp32 logits: several chunks a head
    b = batch(seed=3)
    loss = model.loss(b)["loss"]
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = naive_loss(model, b, reduction)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # every head and the shared norm learn (a head cut off from the loss would have matched with zero gradients)
    assert all(p.grad.abs().sum() > 0 for p in model.heads.parameters())
    assert model.trunk.norm.weight.grad.abs().sum() > 0 and not hasattr(model, "head_norm")


def test_head_one_is_the_trunks_last_layer():
    """The next-token logits, in training, greedy decoding and the decoding forward, are the whole trunk's: its
    blocks up to the last, the last, its final norm; heads 2..n draft what they read beside that last layer."""
    model = siblings().eval()
    b = batch(rows=2, length=13)
    tokens = b["tokens"][:, :-1]
    with torch.no_grad():
        expected = by_hand(model, tokens)
        blocks = model.trunk.blocks
        last_layer = F.linear(model.trunk.norm(blocks[2](blocks[1](blocks[0](model.embed(tokens))))),
                              model.embed.weight)
        torch.testing.assert_close(expected[0], last_layer, rtol=0, atol=0)
        torch.testing.assert_close(model.logits(model.hidden(tokens)), last_layer, rtol=1e-5, atol=1e-6)
        logits, features = model.decode_forward(tokens, model.start_decoding(2, "cpu"))
        torch.testing.assert_close(logits, last_layer, rtol=1e-5, atol=1e-6)
        drafted = torch.stack([model.draft_logits(features[:, t], 2) for t in range(tokens.shape[1])], 1)
        torch.testing.assert_close(drafted, torch.stack(expected[1:], 2), rtol=1e-5, atol=1e-6)
        # the loss's next-token figure is head 1's, the last layer's
        nll = F.cross_entropy(last_layer.flatten(0, 1), b["tokens"][:, 1:].flatten(), reduction="none")
        torch.testing.assert_close(model.loss(b)["ntp_nll"], (nll * b["loss_mask"][:, 1:].flatten()).sum(),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("drafter,tree", [("heads", None), ("confident heads", None), ("heads+lookup", None),
                                          ("heads", [2, 2]), ("heads", [3, 2, 1])])
@pytest.mark.parametrize("rows", [1, 3])
def test_speculative_decoding_with_sibling_heads_gives_plain_greedy_output(drafter, tree, rows):
    """Batch 1 greedy chains go through the lean loop (`HeadsChain`), the rest through the general one."""
    torch.manual_seed(0)
    model = varied(MultiTokenPrediction(transformer(), vocab_size=50, n_future=4, topology="siblings"))
    ids = prompt(rows, 9)
    plain = model.generate(ids, 30)
    assert len(set(plain[0, 9:].tolist())) > 3  # an output a wrong verification would show
    assert torch.equal(model.generate(ids, 30, speculative=True, drafter=drafter, tree=tree), plain)
    assert model.decode_stats["steps"] < 29  # drafts were accepted: the heads drafted


@pytest.mark.parametrize("name", [n for n in TRUNKS if n != "transformer"])
def test_sibling_heads_on_the_recurrent_trunks(name):
    """The per-head backward against autograd through every head, and lossless decoding with the heads' caches."""
    torch.manual_seed(0)
    model = MultiTokenPrediction(TRUNKS[name](), vocab_size=50, n_future=3, topology="siblings")
    b = batch(rows=2, length=17)
    grads = []
    for per_head in (True, False):
        model.per_head_backward = per_head
        model.zero_grad()
        model.loss(b)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for param, expected in grads[1].items():
        torch.testing.assert_close(grads[0][param], expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{param}: {m}")
    model.eval()
    ids = prompt(2, 6)
    assert torch.equal(model.generate(ids, 12), model.generate(ids, 12, speculative=True))


def test_what_sibling_heads_cannot_be_is_refused():
    with pytest.raises(ValueError, match="head_type 'block'"):
        MultiTokenPrediction(trunk(), vocab_size=50, topology="siblings", head_type="mlp")
    with pytest.raises(ValueError, match="after match_params"):
        MultiTokenPrediction(trunk(layers=3), vocab_size=50, n_future=4, topology="siblings", match_params=True)
    with pytest.raises(ValueError, match="head_reduction"):
        MultiTokenPrediction(trunk(), vocab_size=50, head_reduction="max")


def test_match_params_gives_sibling_heads_the_parameters_of_next_token_prediction():
    model = MultiTokenPrediction(trunk(layers=4), vocab_size=50, n_future=4, topology="siblings", match_params=True)
    assert len(model.trunk.blocks) == 1  # n_layers - n + 1, its one block head 1
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(NextTokenPrediction(trunk(layers=4), vocab_size=50))  # no norm of the heads' own
