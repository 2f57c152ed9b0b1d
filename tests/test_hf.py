"""Hugging Face interop, on models built here (no hub): a project checkpoint exported by export_hf.py gives the
project's logits and greedy tokens in transformers, with the same tokenizer; `models.HFTrunk` over a tiny Llama
and a tiny GPT-2 gives the model's own hidden states, satisfies the trunk contract, and decodes cached, ragged,
cropped, forked and speculative exactly as full forwards and rows alone do."""
from __future__ import annotations

import json
import subprocess
import sys

import lightning
import pytest
import torch

from conftest import ROOT
from models import Transformer
from models.contracts import DecodingState, Trunk
from objectives import MultiTokenPrediction, NextTokenPrediction

transformers = pytest.importorskip("transformers", reason='the Hugging Face extra: pip install -e ".[hf]"')
from models.hf import HFTrunk  # noqa: E402  (after the skip: models.hf builds nothing without transformers)

import export_hf  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.getcwd())\n"] * 4


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- export: a project checkpoint as a Llama folder -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with the end-of-text token, as datamodules/text.py trains them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return tok


def save_checkpoint(model, trunk_args: dict, tokenizer, path, **hparams) -> None:
    """What train.py writes, less the optimizer: the weights, the CLI's hyperparameters, the datamodule's tokenizer."""
    hyper_parameters = {"_class_path": f"objectives.{type(model).__name__}",
                        "_instantiator": "lightning.pytorch.cli.instantiate_module",
                        "trunk": {"class_path": "models.Transformer", "init_args": trunk_args},
                        "vocab_size": model.vocab_size, "eos_id": model.eos_id, **hparams}
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": hyper_parameters, "TextDataModule": {"tokenizer": tokenizer.to_str()}}, path)


def varied(model) -> None:
    """Weights far from their init (norm gains, biases, matrices large enough that a tied random model does not
    just repeat a token), so that a misplaced tensor changes the logits and greedy decoding varies."""
    torch.nn.init.normal_(model.embed.weight)
    with torch.no_grad():
        for name, p in model.trunk.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.3)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_an_exported_checkpoint_gives_the_projects_logits_tokens_and_tokenizer(qkv_bias, tokenizer, tmp_path):
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=128, rope_base=500.0, norm_eps=1e-3,
                      qkv_bias=qkv_bias)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ours = NextTokenPrediction(Transformer(**trunk_args), vocab_size=tokenizer.get_vocab_size(), eos_id=eos).eval()
    varied(ours)
    save_checkpoint(ours, trunk_args, tokenizer, tmp_path / "ntp.ckpt")
    export_hf.main(["--ckpt_path", str(tmp_path / "ntp.ckpt"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf" / export_hf.HEADS_FILE).exists()  # nothing but a trunk to export

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def scale(p, k):\n    return Point(p.x * k, p.y * k)\n"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text).ids and hf_tokenizer.eos_token_id == eos
    assert isinstance(hf_tokenizer, transformers.PreTrainedTokenizerFast)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        ours_logits, hf_logits = ours.logits(ours.hidden(prompt)), hf(prompt).logits
    close(hf_logits, ours_logits, atol=1e-4)
    mine = ours.generate(prompt[:, :12], 16)[0, 12:]
    theirs = hf.generate(prompt[:, :12], max_new_tokens=16, do_sample=False)[0, 12:]
    assert len(set(mine.tolist())) > 3  # a varied continuation, not one token repeated
    assert theirs.tolist() == mine[: len(theirs)].tolist() and (len(theirs) == 16 or theirs[-1] == eos)


def test_multi_token_heads_go_to_a_file_beside_the_llama_folder(tokenizer, tmp_path):
    from safetensors import safe_open
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    ours = MultiTokenPrediction(Transformer(**trunk_args), vocab_size=tokenizer.get_vocab_size(), n_future=3,
                                eos_id=0).eval()
    varied(ours)
    save_checkpoint(ours, trunk_args, tokenizer, tmp_path / "mtp.ckpt", n_future=3)
    export_hf.export(str(tmp_path / "mtp.ckpt"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.vocab_size, (2, 20))
    with torch.no_grad():
        close(hf(ids).logits, ours.logits(ours.hidden(ids)), atol=1e-4)  # head 1 is the trunk
    with safe_open(str(tmp_path / "hf" / export_hf.HEADS_FILE), "pt") as heads:
        state = ours.state_dict()
        names = set(heads.keys())
        assert names == {n for n in state if n.startswith(("heads.", "head_norm."))}
        for name in names:
            assert torch.equal(heads.get_tensor(name), state[name])
        meta = heads.metadata()
    assert meta["class_path"] == "objectives.MultiTokenPrediction"
    assert json.loads(meta["hyper_parameters"])["n_future"] == 3


def test_export_refuses_a_checkpoint_it_cannot_express(tokenizer, tmp_path):
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    reverse = NextTokenPrediction(Transformer(**trunk_args), vocab_size=tokenizer.get_vocab_size(), reverse=True)
    save_checkpoint(reverse, trunk_args, tokenizer, tmp_path / "reverse.ckpt", reverse=True)
    with pytest.raises(ValueError, match="right to left"):
        export_hf.export(str(tmp_path / "reverse.ckpt"), str(tmp_path / "hf"))


# --- HFTrunk: a transformers causal LM as a trunk -------------------------------------------------------------------
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=128, bos_token_id=0, eos_token_id=1)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Each family's tiny causal LM, saved as save_pretrained writes it: a folder a hub id would download."""
    folders = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        folders[name] = str(tmp_path_factory.mktemp(name))
        build().save_pretrained(folders[name])
    return folders


def trunk_of(saved, family: str, **options) -> HFTrunk:
    return HFTrunk(pretrained=saved[family], **options).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trunk_gives_the_models_own_hidden_states_and_satisfies_the_contracts(family, saved):
    trunk = trunk_of(saved, family)
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved[family], dtype=torch.float32).eval()
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        close(trunk(x, mask="causal"), reference.base_model(inputs_embeds=x).last_hidden_state)
    assert isinstance(trunk, Trunk) and trunk.supported_masks == ("causal",)
    assert (trunk.d_model, trunk.n_layers, trunk.max_seq_len) == (64, 2, 128)
    assert not any("embed" in n or "wte" in n for n, _ in trunk.named_parameters())  # the objective owns it
    cache = trunk.make_cache(2)
    assert isinstance(cache, DecodingState)
    with torch.no_grad():
        trunk(x[:, :5], cache=cache, padding_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    assert cache.lengths.tolist() == [5, 3] and cache.length == 5
    forked = cache.fork(torch.tensor([1, 1, 0]))
    assert forked.lengths.tolist() == [3, 3, 5]
    cache.crop(2)
    assert cache.lengths.tolist() == [2, 2] and forked.lengths.tolist() == [3, 3, 5]
    assert len(list(cache)) == 2  # one (keys, values) per layer
    with pytest.raises(ValueError, match="causal mask only"):
        trunk(x, mask="full")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_ragged_and_cropped_decoding_equal_full_forwards(family, saved):
    trunk = trunk_of(saved, family)
    x = torch.randn(3, 12, 64)
    nxt = torch.randn(3, 3, 64)
    with torch.no_grad():
        full = trunk(x)
        cache = trunk.make_cache(3)
        steps = [trunk(x[:, :5], cache=cache)] + [trunk(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
        close(torch.cat(steps, 1), full)

        lengths = [4, 12, 7]  # right-padded rows: each continues from its own end
        cache = trunk.make_cache(3)
        prefill = trunk(x, cache=cache, padding_mask=torch.arange(12) < torch.tensor(lengths)[:, None])
        after = trunk(nxt, cache=cache)
        assert cache.lengths.tolist() == [n + 3 for n in lengths]
        for b, n in enumerate(lengths):
            alone = trunk(torch.cat([x[b : b + 1, :n], nxt[b : b + 1]], 1))[0]
            close(prefill[b, :n], alone[:n])
            close(after[b], alone[n:])

        keep = [3, 13, 10]  # a per-row crop, then the next tokens at each row's own end
        cache.crop(torch.tensor(keep))
        out = trunk(nxt[:, :2], cache=cache)
        for b, n in enumerate(keep):
            history = torch.cat([x[b : b + 1, : lengths[b]], nxt[b : b + 1]], 1)[:, :n]
            close(out[b], trunk(torch.cat([history, nxt[b : b + 1, :2]], 1))[0, n:])

        cache = trunk.make_cache(2)
        trunk(x[:2, :6], cache=cache)
        forked = cache.fork([1, 0, 1])  # rows copied, one of them twice
        close(trunk(nxt, cache=forked), trunk(torch.cat([x[[1, 0, 1], :6], nxt], 1))[:, 6:])

        real = torch.arange(12)[None] >= 12 - torch.tensor(lengths)[:, None]  # left padding, no cache
        out = trunk(x, padding_mask=real)
        assert torch.isfinite(out).all()
        for b, n in enumerate(lengths):
            close(out[b, 12 - n :], trunk(x[b : b + 1, 12 - n :])[0])


def test_crops_that_leave_holes_compact_the_cache_and_decode_the_same(saved):
    """Rows that take turns keeping all of their drafts or one leave unused slots inside the cache, the longest
    row's included: they are gathered away, and every row still decodes as a fresh prefill of its own tokens."""
    trunk = trunk_of(saved, "llama")
    torch.manual_seed(1)
    with torch.no_grad():
        cache = trunk.make_cache(2)
        history = [torch.randn(4, 64), torch.randn(4, 64)]
        trunk(torch.stack(history), cache=cache)
        for step in range(12):
            drafts = torch.randn(2, 8, 64)
            trunk(drafts, cache=cache)
            kept = [8, 1] if step % 2 == 0 else [1, 8]
            cache.crop(torch.tensor([len(h) + k for h, k in zip(history, kept)]))
            history = [torch.cat([h, d[:k]]) for h, d, k in zip(history, drafts, kept)]
        assert cache.slots.shape[1] < 4 + 12 * 8 - 32  # compacted: not every slot ever written
        nxt = torch.randn(2, 2, 64)
        out = trunk(nxt, cache=cache)
        for b, h in enumerate(history):
            close(out[b], trunk(torch.cat([h, nxt[b]])[None])[0, len(h):])


def test_a_frozen_trunk_has_no_trainable_weight_and_keeps_dropout_off(saved):
    trunk = HFTrunk(pretrained=saved["gpt2"], freeze_trunk=True)
    assert all(not p.requires_grad for p in trunk.parameters())
    trunk.train()
    assert not any(m.training for m in trunk.body.modules())
    free = HFTrunk(pretrained=saved["gpt2"], gradient_checkpointing=True)
    assert all(p.requires_grad for p in free.parameters())
    x = torch.randn(2, 6, 64, requires_grad=True)
    free.train()(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in free.parameters())


def test_next_token_prediction_on_a_pretrained_llama_decodes_speculatively_and_ragged_as_greedy(saved):
    torch.manual_seed(0)
    model = NextTokenPrediction(HFTrunk(pretrained=saved["llama"]), vocab_size=97).eval()
    torch.nn.init.normal_(model.embed.weight)  # varied outputs from untrained weights: larger than their init
    with torch.no_grad():
        for p in model.trunk.parameters():
            if p.dim() == 2:
                p.normal_(std=0.2)
    prompts = torch.randint(0, 97, (3, 14))
    prompts[:, 7:] = prompts[:, :7]  # repeats, so that prompt lookup finds drafts
    greedy = model.generate(prompts, 20)
    assert torch.equal(model.generate(prompts, 20, speculative=True), greedy)
    assert model.decode_stats["steps"] < 20 and len(set(greedy[0, 14:].tolist())) > 3
    lengths = torch.tensor([5, 14, 9])
    for speculative in (False, True):
        out = model.generate(prompts, 12, prompt_lengths=lengths, speculative=speculative)
        for b, n in enumerate(lengths.tolist()):
            assert out[b, : n + 12].tolist() == model.generate(prompts[b : b + 1, :n], 12)[0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_token_heads_made_by_the_trunk_train_and_draft_losslessly(family, saved):
    torch.manual_seed(0)
    model = MultiTokenPrediction(HFTrunk(pretrained=saved[family]), vocab_size=97, n_future=3)
    head = model.heads[0][0]
    assert type(head.body) is type(model.trunk.body) and head.body.config.num_hidden_layers == 1
    if family == "llama":  # a residual layer without the model's final norm: with its output projections at zero,
        x = torch.randn(2, 5, 64)  # it passes its input through unchanged
        silenced = model.trunk.make_block()
        with torch.no_grad():
            for name, p in silenced.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.zero_()
            close(silenced(x), x)
    batch = {"tokens": torch.randint(0, 97, (2, 17)), "loss_mask": torch.ones(2, 17)}
    model.loss(batch)["loss"].backward()
    assert all(p.grad is not None for p in model.heads.parameters() if p.requires_grad)
    model.eval()
    torch.nn.init.normal_(model.embed.weight)
    prompt = torch.randint(0, 97, (2, 8))
    assert torch.equal(model.generate(prompt, 16, speculative=True), model.generate(prompt, 16))


def test_the_core_install_imports_models_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"  # as if it were not installed
            "import models\n"
            "try:\n    models.HFTrunk(pretrained='gpt2')\n"
            "except ImportError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'pip install -e ".[hf]"' in done.stdout


def test_the_shipped_config_builds_the_trunk_once_pretrained_is_given(saved):
    """configs/models/hf.yaml with its placeholder replaced, as `--model.init_args.trunk.init_args.pretrained`
    replaces it on the command line: every other setting of the file is a valid HFTrunk argument."""
    import yaml

    from conftest import ROOT
    spec = yaml.safe_load(open(ROOT / "configs" / "models" / "hf.yaml"))
    assert spec["class_path"] == "models.HFTrunk"
    trunk = HFTrunk(**{**spec["init_args"], "pretrained": saved["llama"]})
    assert (trunk.d_model, trunk.n_layers) == (64, 2)
    assert all(p.requires_grad for p in trunk.parameters())  # freeze_trunk: false, as the file says
