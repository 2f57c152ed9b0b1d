"""Speculative decoding: tree drafts, per-row acceptance on ragged batches, cache compaction, exact sampling for
every drafter (the mutations "resample from p instead of the residual" and "keep a rejected tree sibling" fail it),
DeepSeek's module caches."""
from __future__ import annotations

import pytest
import torch

from models import Mamba, Transformer
from objectives import DeepSeekMTP, MultiTokenPrediction, NextTokenPrediction
from objectives.distill import SelfDistillation
from objectives.decoding.draft_trees import DraftTree
from objectives.decoding.drafters import Drafter
from objectives.decoding.speculative import speculative_generate

V = 50


def transformer(max_len: int = 128) -> Transformer:
    return Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=max_len)


def sharpened(model):
    """An untrained model made confident, so that its heads agree with it some of the time."""
    with torch.no_grad():
        model.embed.weight.mul_(30)
    return model.eval()


def model(name: str, vocab: int = V, max_len: int = 128):
    torch.manual_seed(0)
    if name == "mtp-block":
        return sharpened(MultiTokenPrediction(transformer(max_len), vocab_size=vocab, n_future=4))
    if name == "mtp-mlp":
        return sharpened(MultiTokenPrediction(transformer(max_len), vocab_size=vocab, n_future=4, head_type="mlp"))
    if name == "mtp-mamba":
        return sharpened(MultiTokenPrediction(Mamba(d_model=32, n_layers=2, d_state=8, max_seq_len=max_len),
                                              vocab_size=vocab, n_future=3))
    if name == "deepseek":
        return sharpened(DeepSeekMTP(transformer(max_len), vocab_size=vocab, depth=2))
    return sharpened(NextTokenPrediction(transformer(max_len), vocab_size=vocab))


def prompt(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["mtp-block", "mtp-mlp", "deepseek"])
@pytest.mark.parametrize("widths", [[3, 2, 1], [2, 2]])
def test_tree_drafts_give_plain_greedy_output(name, widths):
    m = model(name)
    ids = prompt(1, 9)
    plain = m.generate(ids, 30)
    tree = m.generate(ids, 30, speculative=True, tree=widths)
    assert torch.equal(plain, tree)
    assert m.decode_stats["steps"] < 30  # drafts were accepted


def test_a_sparse_tree_of_rank_paths_and_its_refusals():
    tree = DraftTree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 3] and tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.ancestor[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    m = model("mtp-mlp")
    ids = prompt(1, 9)
    assert torch.equal(m.generate(ids, 20), m.generate(ids, 20, speculative=True, tree=tree.paths[1:]))
    with pytest.raises(ValueError, match="prefixes"):
        DraftTree([(0, 0)])
    with pytest.raises(ValueError, match="ranks its candidates"):
        model("ntp").generate(ids, 5, speculative=True, drafter="lookup", tree=[2, 2])
    with pytest.raises(ValueError, match="chain drafts"):
        model("mtp-mamba").generate(ids, 5, speculative=True, tree=[2, 2])


def test_the_compacted_cache_equals_a_fresh_prefill_of_the_accepted_path():
    m = model("mtp-block")
    ids = prompt(2, 12, seed=3)
    captured = {}
    heads = m.drafters(3)["heads"]

    def propose(tokens, state, features, temperature, top_k, max_drafts, width=0):
        captured["state"], captured["tokens"] = state, tokens
        return heads(tokens, state, features, temperature, top_k, max_drafts, width)

    out, _ = speculative_generate(m, ids, 16, Drafter(propose, ranks_candidates=True), tree=[3, 2, 2])
    state = captured["state"]  # the state after the last step's compaction and crop
    length = int(state.lengths[0])
    assert state.lengths.tolist() == [length, length]
    fresh = m.start_decoding(2, "cpu")
    m.decode_forward(out[:, :length], fresh)
    for rolled, new in zip(state, fresh):
        torch.testing.assert_close(rolled.k[:, :, :length], new.k[:, :, :length], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rolled.v[:, :, :length], new.v[:, :, :length], atol=1e-5, rtol=1e-5)


def test_deepseek_module_cache_equals_its_recompute():
    m = model("deepseek")
    ids = prompt(2, 10, seed=5)
    captured = {}
    modules = m.drafters(2)["modules"]

    def propose(tokens, state, features, temperature, top_k, max_drafts):
        drafts = modules(tokens, state, features, temperature, top_k, max_drafts)
        captured["state"], captured["tokens"] = state, tokens.clone()
        return drafts

    speculative_generate(m, ids, 25, propose)
    state, tokens = captured["state"], captured["tokens"]
    # module k has every position whose token k ahead was certain at its last run, drafts forgotten
    assert 20 <= state.committed[1] < state.committed[0] <= tokens.shape[1] - 1
    with torch.no_grad():  # the modules over the whole sequence at once, no cache
        previous = m.hidden(tokens[:, :-1])
        for k, module in enumerate(m.mtp_modules, start=1):
            count = state.committed[k - 1]
            cache = module.block.make_cache(2)
            previous = module(previous[:, :count], m.embed(tokens[:, k : k + count]), cache=cache)
            layer = state.caches[k - 1]
            assert layer.length == count
            torch.testing.assert_close(layer.k[:, :, :count], cache.k[:, :, :count], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.v[:, :, :count], cache.v[:, :, :count], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,drafter,tree", [("mtp-block", "heads", None), ("mtp-mlp", "heads", [2, 2, 1]),
                                               ("mtp-mlp", "heads+lookup", None), ("ntp", "lookup", None)])
def test_ragged_speculative_greedy_equals_each_row_alone(name, drafter, tree):
    """Batch 5 of prompt lengths 3..40, each row advancing by its own accepted length."""
    m = model(name)
    lengths = torch.tensor([3, 40, 17, 9, 26])
    ids = prompt(5, 40, seed=7)
    ids = ids.masked_fill(torch.arange(40) >= lengths[:, None], 0)
    out, info = speculative_generate(m, ids, 24, m.drafters(3)[drafter], tree=tree, prompt_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = m.generate(ids[b : b + 1, :n], 24)
        assert torch.equal(out[b, : n + 24], alone[0]), f"row {b} (prompt of {n})"
    assert info["steps"] < 24


def test_speculative_greedy_on_the_mamba_trunk_and_a_batch_that_stops_at_eos():
    m = model("mtp-mamba")
    ids = prompt(3, 8)
    plain = m.generate(ids, 20)
    assert torch.equal(plain, m.generate(ids, 20, speculative=True))
    m.eos_id = int(plain[1, 12])
    assert torch.equal(m.generate(ids, 20), m.generate(ids, 20, speculative=True))


# --- exact sampling: the joint of the drafted tokens and the bonus token ---------------------------------------------
def spread(name: str):
    """A V=5 model whose next-token distributions are spread (entropy about 1 nat of ln 5 = 1.61: the default
    embedding scaled by 3), so that a draft is accepted about half the time, rejections happen at every index and
    a wrong residual shows in many cells, not one."""
    torch.manual_seed(0)
    trunk = Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    if name == "ntp":
        m = NextTokenPrediction(trunk, vocab_size=5)
    elif name == "deepseek":
        m = DeepSeekMTP(trunk, vocab_size=5, depth=2)
    elif name == "retrofit":
        m = SelfDistillation(trunk, vocab_size=5, k=3)
    else:
        m = MultiTokenPrediction(trunk, vocab_size=5, n_future=4, head_type=name.removeprefix("mtp-"))
    with torch.no_grad():
        m.embed.weight.mul_(3)
    return m.eval()


def exact_joint(m, ids: torch.Tensor, new: int) -> torch.Tensor:
    """p(x_1, ..., x_new | prompt) of plain sampling at temperature 1, by enumerating every continuation: [5] * new."""
    V = 5
    joint = torch.ones(1)
    for i in range(new):
        prefixes = (torch.cartesian_prod(*[torch.arange(V)] * i).view(-1, i) if i
                    else torch.zeros(1, 0, dtype=torch.long))
        seqs = torch.cat([ids.expand(prefixes.shape[0], -1), prefixes], 1)
        with torch.no_grad():
            logits, _ = m.decode_forward(seqs, m.start_decoding(seqs.shape[0], "cpu"))
        joint = (joint[:, None] * logits[:, -1].float().softmax(-1)).flatten()
    return joint.view(*[V] * new)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square distribution's upper 0.001 point (z = 3.09), by the Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


SAMPLING_CASES = [("mtp-block", "heads", None), ("mtp-mlp", "heads", None), ("mtp-block", "heads", [2, 2]),
                  ("mtp-mlp", "heads", [3, 2]), ("mtp-mlp", "heads+lookup", None), ("ntp", "lookup", None),
                  ("deepseek", "modules", None), ("deepseek", "modules", [2, 2]), ("retrofit", "masks", None)]


@pytest.mark.parametrize("name,drafter,tree", SAMPLING_CASES)
def test_speculative_sampling_keeps_the_joint_distribution(name, drafter, tree):
    """Chi-square test of the joint of new tokens 2-4 against plain sampling's exact joint (125 cells), over 4000
    rows decoded as one batch (every row an independent draw). Token 1 comes from the prefill; tokens 2 and 3 are
    drafted and verified in one step (sampled drafts with min(1, p/q), deterministic ones and a tree's ranked
    candidates by recursive rejection), and token 4 is the step's own token: the residual's sample after a
    rejection, or the bonus token after two acceptances. The test checks that all three outcomes occur."""
    m = spread(name)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    n = 4000
    propose = m.drafters(2)[drafter]
    seen = []
    if tree is None:
        def recording(tokens, state, features, temperature, top_k, max_drafts, **options):
            drafts, q = propose(tokens, state, features, temperature, top_k, max_drafts, **options)
            seen.append(drafts.clone())
            return drafts, q
        recording = Drafter(recording, reads_tokens=propose.reads_tokens)
    else:
        recording = propose
    torch.manual_seed(1)
    out, _ = speculative_generate(m, ids.expand(n, -1), 4, recording, temperature=1.0, tree=tree)
    new = out[:, 5:9]
    if tree is None:  # the first verify step drafted tokens 2 and 3 for every row
        assert seen[0].shape == (n, 2)
        kept = (new[:, 1:3] == seen[0]).long().cumprod(1).sum(1)  # accepted drafts (or a residual equal to them)
        assert all(int((kept == j).sum()) > n / 50 for j in (0, 1, 2)), kept.bincount(minlength=3)  # 4% at the least
    expected = exact_joint(m, ids, 4).sum(0).flatten()  # p(x2, x3, x4)
    counts = torch.bincount(new[:, 1] * 25 + new[:, 2] * 5 + new[:, 3], minlength=125).double()
    keep = expected * n >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    wanted = n * torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    chi2 = float(((observed - wanted) ** 2 / wanted.clamp(min=1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < chi2_critical(dof), f"chi2 {chi2:.1f} over {dof + 1} cells (0.001 point {chi2_critical(dof):.1f})"
