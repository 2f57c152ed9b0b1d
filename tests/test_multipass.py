"""Several passes through one decoding cache train: feeding the last hidden state back as the next input
embedding (Coconut's continuous thoughts) has the gradients of full forwards over the same embeddings."""
from __future__ import annotations

import pytest
import torch

from models import Mamba, Transformer

TRUNKS = {"transformer": lambda: Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
          "mamba": lambda: Mamba(d_model=32, n_layers=2, d_state=8)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gradients(trunk, x0, weights, cached: bool):
    """Three passes (the embeddings, then twice the last hidden state fed back); the weighted sum of every
    pass's outputs; gradients of the trunk's parameters and of x0."""
    trunk.zero_grad()
    x0 = x0.detach().requires_grad_()
    if cached:
        cache = trunk.make_cache(x0.shape[0])
        outs = [trunk(x0, cache=cache)]
        for _ in range(2):
            outs.append(trunk(outs[-1][:, -1:], cache=cache))
        out = torch.cat(outs, 1)
    else:  # the reference: each pass a full forward over all embeddings so far
        seq = x0
        for _ in range(2):
            seq = torch.cat([seq, trunk(seq)[:, -1:]], 1)
        out = trunk(seq)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in trunk.parameters()] + [x0.grad.clone()]


@pytest.mark.parametrize("kind", TRUNKS)
def test_three_pass_hidden_state_feedback_has_the_gradients_of_full_forwards(kind):
    torch.manual_seed(0)
    trunk = TRUNKS[kind]()
    x0, weights = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    out, cached = gradients(trunk, x0, weights, cached=True)
    ref_out, full = gradients(trunk, x0, weights, cached=False)
    assert rel_err(out, ref_out) < 1e-5
    assert len(cached) == len(full) and all(g.abs().sum() > 0 for g in full)
    worst = max(rel_err(a, b) for a, b in zip(cached, full))
    assert worst < 1e-5, f"relative gradient error {worst:.2e}"


@pytest.mark.parametrize("kind", TRUNKS)
def test_a_trained_pass_after_an_untrained_prefill_and_back(kind):
    """No-grad decoding and trained passes share a cache: the trained pass builds new tensors, and a later
    no-grad step writes into the cache's own buffers, never into what the trained pass saved."""
    torch.manual_seed(0)
    trunk = TRUNKS[kind]()
    x = torch.randn(2, 8, 32)
    cache = trunk.make_cache(2)
    with torch.no_grad():
        trunk(x[:, :5], cache=cache)
    out = trunk(x[:, 5:7], cache=cache)  # trained
    with torch.no_grad():
        trunk(x[:, 7:], cache=cache)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trunk.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out, trunk(x)[:, 5:7], atol=1e-5, rtol=1e-5)
