"""The retrofit of an NTP model into a multi-token predictor (objectives/distill.py): the next-token path stays the
teacher's bit for bit, the adapters learn only from mask positions, the rollouts are the teacher's greedy ones, the
masks sit at the continuation's positions, and both decodings behave as promised."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import Transformer
from conftest import quickstart, run_cli
from ntp_checkpoint import ntp_checkpoint
from objectives.training.checkpoints import load_checkpoint
from objectives.decoding.speculative import speculative_generate
from objectives.distill import Gate, GatedLoRA, MaskChain, SelfDistillation, mask_layout


@pytest.fixture(scope="module")
def retrofit(tmp_path_factory, corpus_files):
    """(the NTP checkpoint, the SelfDistillation run warm-started from it and trained 3 steps through the CLI)."""
    tmp = tmp_path_factory.mktemp("distill")
    ckpt = ntp_checkpoint(tuple(corpus_files))
    cli = run_cli(tmp / "retrofit", *quickstart(corpus_files, "--model", "configs/objectives/distill.yaml",
                                                "--model.init_args.init_from", str(ckpt),
                                                "--model.init_args.regions", "6",
                                                "--model.init_args.optimizer.init_args.lr", "0.01"), steps=3)
    return ckpt, cli


def batch_of(model, B=2, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.vocab_size, (B, L), generator=g)
    return {"tokens": tokens, "loss_mask": torch.ones(B, L)}


def test_retrofit_trains_adapters_and_keeps_the_teacher_out_of_its_checkpoint(retrofit):
    ckpt, cli = retrofit
    model = cli.model
    assert cli.trainer.global_step == 3 and model.teacher is not None
    from lab.runner import own_parameters  # the report counts the student, not the teacher it holds
    borrowed = sum(p.numel() for p in model.teacher.parameters())
    assert borrowed > 0 and own_parameters(model) == sum(p.numel() for p in model.parameters()) - borrowed
    assert any(a.b.abs().sum() > 0 for a in model.adapters.values())  # B starts at zero: the adapters trained
    saved = load_checkpoint(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert not [k for k in saved["state_dict"] if k.startswith("teacher.")]
    assert saved["companions"]["teacher"]["path"] == str(ckpt)
    teacher = load_checkpoint(ckpt)["state_dict"]
    for name, value in teacher.items():  # the student's network is the teacher's, frozen
        assert torch.equal(saved["state_dict"][name], value), name


def test_gate_closed_logits_equal_the_teacher_exactly(retrofit):
    _, cli = retrofit
    model = cli.model.eval()
    teacher = model.teacher.model
    tokens = batch_of(model)["tokens"]
    with torch.no_grad():
        assert torch.equal(model.logits(model.hidden(tokens)), teacher.logits(teacher.hidden(tokens)))


def test_gated_adapter_adds_its_low_rank_delta_at_mask_rows_only():
    """At mask positions (from the gate's first on) the layer gives the merged weight's product (W + alpha/r B A) x;
    before them W x, bit for bit; with gradients too."""
    torch.manual_seed(0)
    gate, linear = Gate(), torch.nn.Linear(16, 12)
    adapter = GatedLoRA(linear, rank=4, alpha=8.0, gate=gate)
    torch.nn.init.normal_(adapter.b)
    for batch in (1, 2):  # one row is added in place as a matrix, several as a batch of them
        x = torch.randn(batch, 7, 16, requires_grad=True)
        plain = linear(x)
        gate.open = 5
        adapted = linear(x)
        gate.open = None
        merged = torch.nn.functional.linear(x, linear.weight + adapter.scale * adapter.b @ adapter.a, linear.bias)
        assert torch.equal(adapted[:, :5], plain[:, :5])
        torch.testing.assert_close(adapted[:, 5:], merged[:, 5:])
        assert (adapted[:, 5:] - plain[:, 5:]).abs().max() > 0.1
        weights = torch.randn(batch, 7, 12)
        grads = torch.autograd.grad((adapted * weights).sum(), [x, adapter.a, adapter.b])
        expected = torch.autograd.grad((torch.cat([plain[:, :5], merged[:, 5:]], 1) * weights).sum(),
                                       [x, adapter.a, adapter.b])
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)


def test_adapters_get_gradients_only_from_mask_positions(retrofit):
    _, cli = retrofit
    model = cli.model.train()
    tokens = batch_of(model)["tokens"]
    B, L = tokens.shape
    layout = mask_layout(torch.full((B,), L), L, torch.tensor([[5, 20], [11, 30]]), model.k - 1)
    adapters = [p for a in model.adapters.values() for p in (a.a, a.b)]

    def grads(select):
        for p in adapters:
            p.grad = None
        model.masked_hidden(tokens, layout)[:, select].pow(2).sum().backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in adapters]

    assert all(g.abs().sum() == 0 for g in grads(slice(0, L)))  # real positions: nothing reaches the adapters
    assert sum(g.abs().sum() for g in grads(slice(L, None))) > 0
    for p in adapters:
        p.grad = None


def test_training_rollouts_are_the_teachers_greedy_continuations(retrofit):
    _, cli = retrofit
    model = cli.model.eval()
    teacher = model.teacher.model
    tokens = batch_of(model, B=2, L=30, seed=1)["tokens"]
    anchors = torch.tensor([[3, 17, 29], [0, 9, 22]])
    rollout, _ = model.teacher_rollouts(tokens, anchors, model.k)
    for b in range(2):
        for r, t in enumerate(anchors[b].tolist()):
            greedy = teacher.generate(tokens[b : b + 1, : t + 1], model.k)[0, t + 1 :]
            assert rollout[b, r].tolist() == greedy.tolist(), (b, t)


def test_masks_keep_the_continuations_positions(retrofit):
    """A region's masks in the training layout read what masks appended right after that prefix read."""
    _, cli = retrofit
    model = cli.model.eval()
    tokens = batch_of(model, B=1, L=32, seed=2)["tokens"]
    slots, anchors = model.k - 1, torch.tensor([[6, 19]])
    layout = mask_layout(torch.tensor([32]), 32, anchors, slots)
    assert layout.positions[0, 32:].tolist() == [t + s for t in (6, 19) for s in range(1, slots + 1)]
    with torch.no_grad():
        packed = model.masked_hidden(tokens, layout)[:, 32:].view(1, 2, slots, -1)
        for r, t in enumerate(anchors[0].tolist()):
            alone = mask_layout(torch.tensor([t + 1]), t + 1, torch.tensor([[t]]), slots)  # prefix, then the masks
            plain = model.masked_hidden(tokens[:, : t + 1], alone)[:, t + 1 :]
            torch.testing.assert_close(packed[:, r], plain, rtol=1e-5, atol=1e-5)


def test_verify_decodes_the_teachers_greedy_output_batch_1_and_ragged_3(retrofit):
    _, cli = retrofit
    model = cli.model.eval()
    teacher = model.teacher.model
    prompts = batch_of(model, B=3, L=12, seed=3)["tokens"]
    alone = teacher.generate(prompts[:1], 24)
    assert torch.equal(model.generate(prompts[:1], 24, decoding="verify"), alone)
    lengths = torch.tensor([12, 5, 9])
    ragged = model.generate(prompts, 16, decoding="verify", prompt_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert ragged[b, : n + 16].tolist() == teacher.generate(prompts[b : b + 1, :n], 16)[0].tolist(), b


def test_confidence_at_tau_1_is_greedy_one_token_per_forward(retrofit):
    _, cli = retrofit
    model = cli.model.eval()
    teacher = model.teacher.model
    prompts = batch_of(model, B=3, L=10, seed=4)["tokens"]
    lengths = torch.tensor([10, 4, 7])
    out = model.generate(prompts, 12, decoding="confidence", tau=1.0, prompt_lengths=lengths)
    assert model.decode_stats["steps"] == 11  # the prompt's forward gives the first token, then one per forward
    for b, n in enumerate(lengths.tolist()):
        assert out[b, : n + 12].tolist() == teacher.generate(prompts[b : b + 1, :n], 12)[0].tolist(), b
    model.generate(prompts[:1], 12, decoding="confidence", tau=0.0)  # every draft kept: k tokens per forward
    assert model.decode_stats["steps"] == -(-12 // model.k) - 1
    with pytest.raises(ValueError, match="tau"):
        model.generate(prompts[:1], 4, decoding="confidence", tau=1.5)


def test_generate_py_decodes_a_retrofit_by_confidence(retrofit, capsys):
    import generate
    _, cli = retrofit
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    generate.main(["--ckpt_path", str(ckpt), "--prompt", "def f(x):", "--max_new_tokens", "8",
                   "--options", '{"decoding": "confidence", "tau": 0.0}'])
    out = capsys.readouterr()
    assert out.out.startswith("def f(x):") and "tokens per forward" in out.err


def test_a_trunk_without_tensor_masks_is_refused():
    from models import Mamba
    with pytest.raises(ValueError, match="tensor"):
        SelfDistillation(Mamba(d_model=32, n_layers=1), vocab_size=50)


@pytest.mark.parametrize("mask_tokens,steps,ends_steps", [((5, 5, 5), 10, 10), ((6, 6, 6), 39, 39),
                                                          ((5, 5, 6), 13, 19)])
def test_verify_accepts_every_mask_draft_that_agrees_with_the_model(mask_tokens, steps, ends_steps):
    """A network scaled until it copies its last token decodes a constant prompt as that token repeated; with each
    mask embedding set to a token's embedding, that mask drafts the token. Masks of the prompt's token are all kept:
    39 tokens after the prefill's in ceil(39 / 4) = 10 verify steps; masks of another token are all rejected, one
    token a step; two right and one wrong keep two drafts a step, 3 tokens a step. The lean batch-1 loop
    (`MaskChain`) and the general loop give the same tokens in the same steps. With groups after the ends only, a
    step that keeps 2 of 3 drafts has none for the next, which gives one token: 4 tokens in 2 steps."""
    torch.manual_seed(0)
    model = SelfDistillation(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=50, k=4).eval()
    with torch.no_grad():
        model.embed.weight.mul_(30)
        model.mask_embed.weight.copy_(model.embed.weight[list(mask_tokens)])
    prompt = torch.full((1, 7), 5)
    out = model.generate(prompt, 40, decoding="verify")
    assert (out[0, 7:] == 5).all()  # plain greedy decoding of this network
    assert model.decode_stats["steps"] == steps
    general, stats = speculative_generate(model, prompt, 40, model.drafters(model.k)["masks"], lean=False)
    assert torch.equal(general, out) and stats["steps"] == steps
    assert torch.equal(model.generate(prompt, 40, decoding="verify", groups="ends"), out)
    assert model.decode_stats["steps"] == ends_steps
    # prompt lookup first: the constant prompt repeats, so 7 lookup drafts a step are kept, whatever the masks say
    assert torch.equal(model.generate(prompt, 40, decoding="verify", groups="ends", lookup=7), out)
    assert model.decode_stats["steps"] == 5  # ceil(39 / 8)


@pytest.mark.parametrize("sampler", [False, True])
def test_the_lean_step_drafts_from_the_group_after_the_last_accepted_token(sampler):
    """`MaskChain`'s verify forward counts the accepted drafts itself and unembeds that group alone: fed the next
    token then j of the model's own greedy tokens (then wrong ones), its row j holds the model's argmax there and
    the drafts the general loop's forward makes from the group after it, for every j; the groups differ, so a
    wrong choice shows. Then both loops decode alike."""
    torch.manual_seed(0)
    model = SelfDistillation(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=128), vocab_size=50, k=4,
                             sampler_head=sampler).eval()
    with torch.no_grad():
        for adapter in model.adapters.values():
            torch.nn.init.normal_(adapter.b, std=0.3)
        if sampler:
            torch.nn.init.normal_(model.sampler.down.weight, std=0.3)
    prompt = torch.randint(0, 50, (1, 9))
    greedy = model.generate(prompt, 4, decoding="greedy")[0, 9:].tolist()

    def prefilled():
        state = model.start_decoding(1, "cpu")
        model.decode_forward(prompt, state)
        return state

    groups = set()
    for j in range(4):
        fed = torch.tensor([greedy[: j + 1] + [(greedy[j + 1] + 1) % 50 if j < 3 else 0] * (3 - j)])
        logits, features = model.decode_forward(fed, prefilled())
        rows = MaskChain(model, 3).forward(fed, prefilled())
        assert rows[j].tolist() == [int(logits[0, j].argmax())] + features[0, j].tolist(), j
        groups.update(tuple(f) for f in features[0].tolist())
    assert len(groups) > 1
    drafter = model.drafters(model.k)["masks"]
    lean, lean_stats = speculative_generate(model, prompt, 30, drafter)
    general, stats = speculative_generate(model, prompt, 30, drafter, lean=False)
    assert torch.equal(lean, general) and lean_stats == stats
    # groups after the ends only: the ends' drafts, none where a step stops in between; plain greedy output
    fed = torch.tensor([greedy[:2] + [(greedy[2] + 1) % 50] * 2])  # one draft kept of three
    _, features = model.decode_forward(fed, prefilled())
    ends = MaskChain(model, 3, "ends")
    rows = ends.forward(fed, prefilled()).tolist()
    assert rows[1][1:] == [-1] * 3 and ends.drafts(rows, 1, 3) == []
    for j in (0, 3):
        fed = torch.tensor([greedy[: j + 1] + [(greedy[j + 1] + 1) % 50 if j < 3 else 0] * (3 - j)])
        _, features = model.decode_forward(fed, prefilled())
        assert ends.forward(fed, prefilled())[j, 1:].tolist() == features[0, j].tolist(), j
    assert torch.equal(model.generate(prompt, 30, decoding="verify", groups="ends"), lean)
    assert torch.equal(model.generate(prompt, 30, decoding="verify", groups="ends", lookup=5), lean)
    with pytest.raises(ValueError, match="groups 'ends'.*one row"):
        model.generate(prompt.expand(2, -1), 4, decoding="verify", groups="ends")
    with pytest.raises(ValueError, match="lookup 5.*'verify'"):  # not dropped silently by plain decoding
        model.generate(prompt, 4, decoding="greedy", lookup=5)
