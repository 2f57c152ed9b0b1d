"""Speculative decoding: tree drafts, per-row acceptance on ragged batches, cache compaction, exact sampling for
every drafter (the mutations "resample from p instead of the residual" and "keep a rejected tree sibling" fail it),
DeepSeek's module caches; the lean batch-1 loop against the general one for every drafter, prompt lookup's cyclic
extension and the heads' confidence gate."""
from __future__ import annotations

import pytest
import torch

from models import Mamba, Transformer
from objectives import DeepSeekMTP, MultiTokenPrediction, NextTokenPrediction
from objectives.distill import SelfDistillation
from objectives.decoding.draft_trees import DraftTree
from objectives.decoding import speculative
from objectives.decoding.drafters import Drafter, PromptLookup, lookup_drafts
from objectives.decoding.greedy import greedy_token
from objectives.decoding.speculative import speculative_generate

V = 50


def transformer(max_len: int = 128) -> Transformer:
    return Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=max_len)


def sharpened(model):
    """An untrained model made confident, so that its heads agree with it some of the time."""
    with torch.no_grad():
        model.embed.weight.mul_(30)
    return model.eval()


def varied(m):
    """Greedy output that varies (the blocks, scaled up, outweigh the embedding), logits sharp enough for heads of
    spread confidence."""
    with torch.no_grad():
        for weight in (p for p in m.trunk.parameters() if p.dim() == 2):
            weight.mul_(6)
        m.trunk.norm.weight.mul_(20)
        if m.shared_norm is not m.trunk.norm:  # sibling heads share the trunk's, sharpened once
            m.shared_norm.weight.mul_(20)
    return m.eval()


def model(name: str, vocab: int = V, max_len: int = 128):
    torch.manual_seed(0)
    if name == "mtp-block":
        return sharpened(MultiTokenPrediction(transformer(max_len), vocab_size=vocab, n_future=4))
    if name == "mtp-mlp":
        return sharpened(MultiTokenPrediction(transformer(max_len), vocab_size=vocab, n_future=4, head_type="mlp"))
    if name.startswith("varied"):
        kind = name.removeprefix("varied").lstrip("-") or "mlp"
        trunk = Mamba(d_model=32, n_layers=2, d_state=8, max_seq_len=max_len) if kind == "mamba" else transformer(max_len)
        return varied(MultiTokenPrediction(trunk, vocab_size=vocab, n_future=3 if kind == "mamba" else 4,
                                           head_type="mlp" if kind == "mlp" else "block"))
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


# --- the lean batch-1 loop and the drafters --------------------------------------------------------------------------
CHAIN_CASES = [("varied", "heads"), ("varied", "confident heads"), ("varied", "heads+lookup"), ("varied", "lookup"),
               ("varied-block", "heads"), ("varied-block", "heads+lookup"), ("varied-mamba", "heads"),
               ("varied-mamba", "heads+lookup"), ("mtp-mlp", "heads+lookup"), ("ntp", "lookup")]


@pytest.mark.parametrize("name,drafter", CHAIN_CASES)
def test_the_lean_loop_gives_plain_greedy_output_in_the_general_loops_steps(name, drafter, monkeypatch):
    """Batch 1, greedy, chain drafts: the lean loop runs (counted), its output is plain greedy's token for token, and
    it takes exactly the general loop's steps (the same drafts, the same acceptance), up to the trunk's last
    position (40) and with an eos inside the output."""
    calls = []
    lean = speculative.greedy_chain
    monkeypatch.setattr(speculative, "greedy_chain", lambda *a, **k: calls.append(1) or lean(*a, **k))
    m = model(name, max_len=40)
    ids = prompt(1, 9, seed=2)
    for eos in (None, "inside"):
        plain = m.generate(ids, 31)
        if eos:
            m.eos_id = int(plain[0, 25])
            plain = m.generate(ids, 31)
        out = m.generate(ids, 31, speculative=True, drafter=drafter, num_drafts=8)
        steps = m.decode_stats["steps"]
        general, info = speculative_generate(m, ids, 31, m.drafters(8)[drafter], lean=False)
        assert torch.equal(out, plain) and torch.equal(general, plain)
        assert steps == info["steps"] < 30
    assert len(calls) == 2


class Oracle:
    """A batch-1 chain drafter (`ChainDrafter`) that knows plain greedy's output and drafts it with one wrong token
    at a place that moves from step to step (none every fifth step), checking that the loop hands it the row of the
    accepted position."""

    def __init__(self, m, tokens, plain):
        self.m, self.tokens, self.plain, self.step = m, tokens, plain, 0

    def forward(self, ids, state, last=False):
        logits, _ = self.m.decode_forward(ids, state)
        return (logits[0, -1:] if last else logits[0]).argmax(-1, keepdim=True)

    def drafts(self, rows, at, max_drafts):
        assert rows[at][0] == self.tokens[-1]  # the accepted position's argmax is the next certain token
        n, wrong = len(self.tokens), self.step % 5
        self.step += 1
        return [t if i != wrong else (t + 1) % V for i, t in enumerate(self.plain[n : n + min(4, max_drafts)])]


@pytest.mark.parametrize("name", ["varied", "varied-mamba"])
def test_the_lean_loop_keeps_what_it_accepts_and_crops_the_rest(name):
    """On a model whose greedy output varies (a copied or shifted token shows), drafts that are right up to a
    known place: the output is plain greedy's and each step accepts exactly the drafts before the wrong one."""
    m = model(name)
    ids = prompt(1, 9, seed=1)
    plain = m.generate(ids, 40)
    assert len(set(plain[0, 9:].tolist())) > 5
    out, info = speculative.greedy_chain(m, ids, 40, lambda tokens: Oracle(m, tokens, plain[0].tolist()))
    assert torch.equal(out, plain)
    n, steps = 10, 0  # tokens known after the prefill; each step keeps the drafts before the wrong one, plus one
    while n < 49:
        k = min(4, 49 - n - 1)
        n, steps = n + min(steps % 5, k) + 1, steps + 1
    assert info["steps"] == steps


@pytest.mark.parametrize("name,drafter", [("varied", "heads"), ("varied", "heads+lookup"), ("varied", "confident heads"),
                                          ("varied-block", "heads"), ("varied-block", "heads+lookup")])
def test_lean_drafts_equal_the_general_drafters_at_every_accepted_position(name, drafter):
    """After `at` drafts are accepted, the lean loop's drafter drafts what the general one does from the features
    at that position; the history then ends with the model's own token, or with a short lookup match (a b a: the
    text after the earlier a is b a), which the heads extend."""
    m = model(name)
    tokens = prompt(1, 13, seed=5)[0].tolist()
    tokens[4:7] = tokens[9:12]  # an earlier occurrence for lookup to find
    prompt_ids, fed = tokens[:9], tokens[9:]  # the next certain token and 3 drafts
    _, features = m.decode_forward(torch.tensor([tokens]), m.start_decoding(1, "cpu"))
    a, b = sorted(set(range(V)) - set(tokens))[:2]
    for at in range(4):
        for tail in ("model", [a, b, a]):
            history = list(prompt_ids)
            chain = m.drafters(3)[drafter].chain(history)
            state = m.start_decoding(1, "cpu")
            chain.forward(torch.tensor([prompt_ids]), state, last=True)
            history.append(fed[0])
            rows = chain.forward(torch.tensor([fed]), state).tolist()
            history += fed[1 : at + 1] + ([rows[at][0]] if tail == "model" else tail)
            general, _ = m.drafters(3)[drafter](torch.tensor([history]), None, features[:, 9 + at], 0.0, None, 3)
            assert chain.drafts(rows, at, 3) == general[0].tolist(), f"accepted {at}, then {tail}"


@pytest.mark.parametrize("name,drafter", [("varied", "heads"), ("varied", "confident heads"),
                                          ("varied-block", "heads+lookup"), ("varied-mamba", "heads"),
                                          ("varied-mamba", "heads+lookup")])
def test_ragged_batch_of_3_equals_each_row_alone(name, drafter):
    m = model(name)
    lengths = torch.tensor([5, 14, 9])
    ids = prompt(3, 14, seed=11).masked_fill(torch.arange(14) >= lengths[:, None], 0)
    out, info = speculative_generate(m, ids, 20, m.drafters(8)[drafter], prompt_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, : n + 20], m.generate(ids[b : b + 1, :n], 20)[0]), f"row {b} (prompt of {n})"
    assert info["steps"] < 20


def test_cropping_a_transformer_cache_to_an_int_is_checked():
    """Rows alike: the crop to an int is checked on the host (no sync) and keeps the per-row lengths in step."""
    trunk = transformer()
    cache = trunk.make_cache(2)
    trunk(torch.randn(2, 5, 32), cache=cache)
    cache.crop(3)
    assert cache.length == 3 and cache.lengths.tolist() == [3, 3]
    for bad in (4, -1):
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(bad)
    cache.crop(torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="cannot crop"):  # ragged rows: every row is checked
        cache.crop(2)


def test_prompt_lookup_extends_a_loop_past_its_period():
    loop = [4, 9] + [1, 2, 3] * 3  # period 3, repeated: drafted as deep as asked, copied on from the drafts
    assert PromptLookup(loop)(8) == [1, 2, 3, 1, 2, 3, 1, 2]
    assert PromptLookup([7, 7])(4) == [7, 7, 7, 7]
    # a match that is no loop offers only the text after it: [3, 4] recurs, [2, 3, 4] does not
    assert PromptLookup([1, 2, 3, 4, 9, 3, 4])(5) == [9, 3, 4]
    assert PromptLookup([1, 2, 3])(3) == []
    # the latest occurrence of the longest n-gram wins; left padding (-1) matches nothing
    drafts, counts = lookup_drafts(torch.tensor([[5, 6, 7, 8, 1, 5, 6, 7, 9, 5, 6, 7], [-1] * 7 + [3, 5, 3, 5, 3]]),
                                   4, counts=True)
    assert drafts.tolist() == [[9, 5, 6, 7], [5, 3, 5, 3]] and counts.tolist() == [4, 4]
    tokens = loop[:5]  # the index follows a list that grows (the lean loop's)
    lookup = PromptLookup(tokens)
    assert lookup(4) == []
    tokens += loop[5:]
    assert lookup(8) == [1, 2, 3, 1, 2, 3, 1, 2]


@pytest.mark.parametrize("name", ["mtp-mlp", "mtp-block"])
def test_heads_draft_at_the_accepted_position_when_a_lookup_run_ends(name):
    """heads+lookup at batch 1: while lookup drafts a whole loop the verify forward leaves the heads out; when the
    next lookup finds nothing, the heads draft from the accepted position in a pass of their own."""
    m = model(name)
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    chain = m.drafters(8)["heads+lookup"].chain(tokens)
    state = m.start_decoding(1, "cpu")
    rows = chain.forward(torch.tensor([tokens]), state, last=True).tolist()
    tokens.append(3)  # as if the model had said 3: lookup continues the loop past its period
    assert chain.drafts(rows, 0, 8) == [1, 2, 3, 1, 2, 3, 1, 2]
    rows = chain.forward(torch.tensor([[3, 1, 2, 3, 1, 2, 3, 1, 2]]), state).tolist()
    assert [len(r) for r in rows] == [1] * 9  # the argmax alone
    state.crop(len(tokens) + 1)
    tokens += [1, 49]  # one draft accepted, then a token never seen: lookup finds nothing
    drafts = chain.drafts(rows, 1, 8)
    fresh = m.start_decoding(1, "cpu")
    _, features = m.decode_forward(torch.tensor([tokens[:-1]]), fresh)
    assert drafts == m.draft_logits(features[:, -1], 3).argmax(-1)[0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_heads_draft_after_the_verify_forward_and_bf16_heads_inside_it(dtype):
    """The heads alone at batch 1: in fp32 on a CPU the verify forward unembeds the fed positions' next tokens only
    and the heads draft at the accepted position in a pass of their own (fewer rows, each product cheaper there);
    in bf16 one product carries every head's rows. The drafts are the heads' at the accepted position either way."""
    m = model("mtp-mlp").to(dtype)
    tokens = prompt(1, 12)[0].tolist()
    chain = m.drafters(3)["heads"].chain(tokens)
    state = m.start_decoding(1, "cpu")
    chain.forward(torch.tensor([tokens]), state, last=True)
    fed = [5, 6, 7, 8]
    rows = chain.forward(torch.tensor([fed]), state).tolist()
    assert [len(r) for r in rows] == ([1] * 4 if dtype == torch.float32 else [4] * 4)
    drafts = chain.drafts(rows, 2, 3)
    assert len(drafts) == 3
    if dtype == torch.float32:  # bf16 rows of a prefill need not carry a cached step's bits
        fresh = m.start_decoding(1, "cpu")
        _, features = m.decode_forward(torch.tensor([tokens + fed[:3]]), fresh)
        assert drafts == greedy_token(m.draft_logits(features[:, -1], 3))[0].tolist()


def test_confident_heads_stop_at_the_first_unsure_head():
    m = model("varied")
    ids = prompt(1, 9)
    features = torch.randn(2, 32)
    top = m.draft_logits(features, 3).softmax(-1).amax(-1)  # [2, 3]: each head's top probability
    cuts = sorted(set(top.flatten().tolist()))
    for threshold in [(a + b) / 2 for a, b in zip([0.0] + cuts, cuts + [1.0])]:  # between the heads' values
        leading = (top >= threshold).long().cumprod(1).sum(1)  # per row, heads before the first unsure one
        drafts, _ = m.drafters(3, min_confidence=threshold)["confident heads"](None, None, features, 0.0, None, 3)
        assert drafts.shape[1] == int(leading.max())  # a batch carries its most confident row's count
    ids = prompt(1, 9, seed=1)
    plain = m.generate(ids, 40)
    steps = []
    for threshold in (0.0, 0.3, 0.6, 0.9, 1.5):  # the lean loop gates as the general loop does
        options = {"min_confidence": threshold}
        lean = m.generate(ids, 40, speculative=True, drafter="confident heads", drafter_options=options)
        steps.append(m.decode_stats["steps"])
        general, info = speculative_generate(m, ids, 40, m.drafters(4, **options)["confident heads"], lean=False)
        assert torch.equal(lean, plain) and torch.equal(general, plain) and steps[-1] == info["steps"]
    assert steps[0] < steps[1] < steps[2] < steps[-1] == 39  # a higher bar carries fewer drafts; 1.5: none
    with pytest.raises(TypeError):
        m.generate(ids, 5, speculative=True, drafter_options={"min_confidenc": 0.5})


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
                  ("mtp-mlp", "confident heads", None),
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


def test_the_benchmark_splits_speedup_into_accepted_tokens_and_step_cost_without_the_prefill():
    """benchmarks/speculative.py's figures from hand-made timings: a plain decode of 11 tokens (1 s, 0.1 s of it the
    prefill, 10 steps) against a drafter's (0.5 s, the same prefill, 4 steps of up to 3 drafts)."""
    from benchmarks.speculative import rows_of
    out = [torch.zeros(1, 3)]
    results = {"plain greedy": {"seconds": [1.0], "prefill": [0.1], "steps": 10, "outputs": out},
               "drafter": {"seconds": [0.5], "prefill": [0.1], "steps": 4, "outputs": out, "drafts": 3}}
    plain, drafted = rows_of(results, 1, 11, "m")
    assert plain["step cost (plain steps)"] == 1.0 and plain["ceiling"] == 1.0
    assert drafted["speedup"] == 2.0 and drafted["accepted/step"] == 2.5  # 10 tokens past the prefill's in 4 steps
    assert abs(drafted["step cost (plain steps)"] - 0.1 / 0.09) < 1e-9  # 0.4 s over 4 steps against 0.9 s over 10
    assert abs(drafted["ceiling"] - 4 / (0.1 / 0.09)) < 1e-9 and drafted["identical"]


def test_the_benchmark_screens_prompts_whose_plain_output_does_not_loop():
    """--low_repeat: the prompts kept are those whose plain greedy continuation repeats under 40% of its 4-grams,
    in order, and screening stops once enough are found."""
    from benchmarks.speculative import low_repeat_prompts, repeated_4gram_share

    class Scripted:  # continues a prompt starting with 0 by a loop of period 2, anything else by fresh tokens
        def generate(self, ids, new):
            loop = ids[0, 0].item() == 0
            tail = torch.tensor([[i % 2 if loop else 100 + i for i in range(new)]])
            return torch.cat([ids, tail], 1)

    assert repeated_4gram_share([1, 2] * 10) > 0.8 and repeated_4gram_share(list(range(20))) == 0
    candidates = [[0, 5], [1, 5], [0, 6], [2, 5, 7], [3, 5], [4, 5]]
    assert low_repeat_prompts(Scripted(), candidates, 2, 12) == ([[1, 5], [2, 5, 7]], 4)
    assert low_repeat_prompts(Scripted(), candidates[:3], 5, 12) == ([[1, 5]], 3)


def test_the_benchmark_decodes_each_case_on_its_own_dtype_copy():
    """benchmarks/speculative.py --dtype: a bfloat16 copy's cases are labelled apart, run on the copy (its outputs
    equal the copy's own plain greedy and are checked against it), and the float32 model is left as it was."""
    from benchmarks.speculative import in_dtype, measure
    m = model("mtp-mlp")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    groups = {d: in_dtype(m, d, 2, [], 4) for d in ("float32", "bfloat16")}
    fp32, bf16 = groups["float32"], groups["bfloat16"]
    assert fp32[0][0] == "plain greedy" and bf16[0][0] == "plain greedy [bfloat16]"
    assert [label + " [bfloat16]" for label, _ in fp32] == [label for label, _ in bf16]
    assert bf16[0][1]["model"].embed.weight.dtype == torch.bfloat16 and fp32[0][1]["model"] is m
    copy, calls = bf16[0][1]["model"], []
    generate = copy.generate
    copy.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)  # which model decodes the bf16 cases
    results = measure(m, [prompt(1, 6)], fp32 + bf16, 5)
    assert len(calls) == 3 * len(bf16)  # each bf16 case: its warm-up, its prefill and its timed decode, on the copy
    plain_bf16 = generate(prompt(1, 6), 5)
    assert torch.equal(results["plain greedy [bfloat16]"]["outputs"][0], plain_bf16)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_a_low_precision_step_after_the_cache_attends_query_by_query_as_one_query_steps_do():
    """In bf16 a verify step's attention rows carry the same bits as the one-token steps of plain decoding: each
    query runs in fp32 over exactly the keys a one-query step sees (one masked SDPA of 4 queries rounds a row in
    a few dozen differently on an AVX-512 bf16 CPU, in bf16 and, after the cast back, in fp32 too, which can
    change a greedy choice). Training (with gradients), validation (no cache) and fp32 keep the single masked
    call."""
    from models.transformer import Attention, KVCache, attention_inputs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    for cached in range(20, 300, 5):
        q = torch.randn(1, 8, 4, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 8, cached + 4, 64, generator=g).bfloat16() for _ in range(2))
        cache = KVCache(1, 8, 64, 512, None, torch.bfloat16)
        cache.append(k[:, :, :cached], v[:, :, :cached])
        inputs = attention_inputs("causal", 4, cache)  # a step of 4 queries after the cached positions
        assert inputs.causal_after_cache and inputs.mask is not None
        one_at_a_time = torch.cat([sdpa(q[:, :, i : i + 1].float(), k[:, :, : cached + 1 + i].float(),
                                        v[:, :, : cached + 1 + i].float()) for i in range(4)], 2).bfloat16()
        plain_step = attention_inputs("causal", 1, cache)
        with torch.no_grad():
            assert torch.equal(Attention.attend(q, k, v, inputs, decoding=True), one_at_a_time), cached
            # the one-query step of plain decoding gives the same bits as the verify step's first row
            assert torch.equal(Attention.attend(q[:, :, :1], k[:, :, : cached + 1], v[:, :, : cached + 1],
                                                plain_step, decoding=True), one_at_a_time[:, :, :1])
            assert torch.equal(Attention.attend(q, k, v, inputs), sdpa(q, k, v, attn_mask=inputs.mask))
        with torch.enable_grad():
            assert torch.equal(Attention.attend(q, k, v, inputs, decoding=True), sdpa(q, k, v, attn_mask=inputs.mask))
        assert not attention_inputs("causal", 1, cache).causal_after_cache  # one query: a single call anyway
