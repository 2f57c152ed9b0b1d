"""Hugging Face interop, on models built here (no hub): a project checkpoint exported by export_hf.py gives the
project's logits and greedy tokens in transformers, with the same tokenizer; `models.HFTrunk` over a tiny Llama
and a tiny GPT-2 gives the model's own hidden states, satisfies the trunk contract, and decodes cached, ragged,
cropped, forked and speculative exactly as full forwards and rows alone do; an objective over it takes the model's
embedding and head (tied or its own) and gives its logits, exported heads come back and draft as before, Coconut's
passes give a loop of full forwards' gradients, heads on the frozen model train while the model keeps every bit;
a mask tensor reaches the layers as the model's own 4D mask and gives a loop of prefix forwards (cached, ragged,
over a cache with holes), so that the retrofit trains on a pretrained model and decodes as its greedy; planning
tokens train and generate on it; the CLI gives the data a local folder's tokenizer; benchmarks/hf_lookup.py runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning
import pytest
import torch

from conftest import ROOT
from models import Transformer
from models.contracts import DecodingState, Trunk
from objectives import MultiTokenPrediction, NextTokenPrediction
from objectives.training import metrics as M

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
    """The heads file holds the objective's tensors beyond the trunk and the embedding under the names the same
    objective has over an HFTrunk of the folder (head blocks as HFBlocks' Llama layers), and its class and
    hyperparameters."""
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
    over_hf = MultiTokenPrediction(HFTrunk(pretrained=str(tmp_path / "hf")), vocab_size=ours.vocab_size, n_future=3)
    with safe_open(str(tmp_path / "hf" / export_hf.HEADS_FILE), "pt") as heads:
        names = set(heads.keys())
        assert names == {n for n in over_hf.state_dict() if n.startswith(("heads.", "head_norm."))}
        assert torch.equal(heads.get_tensor("head_norm.weight"), ours.head_norm.weight)
        assert torch.equal(heads.get_tensor("heads.1.0.body.layers.0.mlp.down_proj.weight"),
                           ours.heads[1][0].mlp.out.weight)
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
    assert isinstance(trunk, Trunk) and trunk.supported_masks == ("causal", "tensor")
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
    with pytest.raises(ValueError, match="no 'full' mask"):
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
    with pytest.raises(ValueError, match="chain drafts"):  # a cache of slots holds no keys by position to move
        model.generate(prompt, 16, speculative=True, tree=[2, 2])


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


# --- the pretrained embedding and output head, the exported heads, the families on the trunk -----------------------
def tiny_llama(folder, tokenizer, tied: bool) -> None:
    """A tiny Llama of the tokenizer's vocabulary, its head tied or its own, saved with the tokenizer beside it."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=128, tie_word_embeddings=tied,
        initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_objective_built_by_the_cli_on_a_pretrained_folder_gives_the_models_own_logits(tied, tokenizer,
                                                                                         tmp_path, capsys):
    """The README's command (hf.yaml for the trunk, a local folder, whose tokenizer.json the CLI gives the data:
    the untied case leaves the flag out, the tied one gives it) builds an objective whose embedding and
    unembedding are the model's (its own head where it has one): its logits are the model's before any training,
    and validation runs on it."""
    from conftest import run_cli, tiny_data
    folder = tmp_path / "model"
    tiny_llama(folder, tokenizer, tied)
    corpus = tmp_path / "docs.jsonl"  # small documents: the data's preparation takes no time
    corpus.write_text("".join(json.dumps({"text": f"# {i}\n" + TEXT[i % 4] * 3}) + "\n" for i in range(60)))
    given = ["--data.init_args.tokenizer_path", str(folder / "tokenizer.json")] if tied else []
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *tiny_data([str(corpus)]),
                  "--model.init_args.trunk", "configs/models/hf.yaml",
                  "--model.init_args.trunk.init_args.pretrained", str(folder), *given, "--data.init_args.seq_len", "32",
                  "--trainer.limit_val_batches", "1", "--model.init_args.sample_tokens", "0", subcommand="validate")
    assert cli.datamodule.hparams.tokenizer_path == str(folder / "tokenizer.json")
    assert ("tokenizer_path: " in capsys.readouterr().out) == (not tied)  # said where the CLI filled it in
    model = cli.model.float().eval()
    assert model.vocab_size == tokenizer.get_vocab_size() and model.pretrained_report["finished"]
    assert ("lm_head" in dict(model.named_children())) == (not tied)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(TEXT[1] + TEXT[2]).ids])
    with torch.no_grad():
        close(model.logits(model.hidden(ids)), reference(ids).logits)


def test_the_data_must_tokenize_with_the_models_tokenizer(tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path / "model"
    tiny_llama(folder, tokenizer, tied=False)
    model = NextTokenPrediction(HFTrunk(pretrained=str(folder)), vocab_size=tokenizer.get_vocab_size())
    other = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "def": 1, "x": 2}, unk_token="x"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()

    class Data:
        def __init__(self, tok):
            self.tok = tok

        def state_dict(self):
            return {"tokenizer": self.tok.to_str()}

    with pytest.raises(ValueError, match="tokenizer_path .*tokenizer.json"):
        model.finish_pretrained_start(Data(other))
    assert model.finish_pretrained_start(Data(tokenizer))["finished"]


@pytest.mark.parametrize("family,per_head_backward", [("gpt2", True), ("llama", False)])
def test_multi_token_heads_on_a_frozen_trunk_train_while_the_model_stays_bit_identical(family, per_head_backward,
                                                                                      saved):
    """Medusa-1: with freeze_trunk the model's body, embedding and output head (tied for GPT-2, its own for the tiny
    Llama) take no gradient; the heads learn (their loss falls) and the model's weights keep every bit."""
    torch.manual_seed(0)
    model = MultiTokenPrediction(HFTrunk(pretrained=saved[family], freeze_trunk=True), vocab_size=97, n_future=3,
                                 head_type="mlp", per_head_backward=per_head_backward)
    assert model.pretrained_report["frozen"] and model.pretrained_report["tied"] == (family == "gpt2")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(("heads.", "head_norm."))}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in [*model.heads.parameters(),
                                                                        *model.head_norm.parameters()]}
    tokens = torch.randint(0, 97, (4, 9)).repeat(1, 3)  # a pattern the heads can learn from the hidden states
    batch = {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)

    def heads_loss():
        with torch.no_grad():  # the plain path: every head's cross-entropy through the model's own unembedding
            figures = model.loss(batch)["metrics"]
        return sum(float(figures[M.head_loss(k)][0]) for k in (2, 3))

    model.train()
    before = heads_loss()
    for _ in range(8):
        optimizer.zero_grad()
        model.loss(batch)["loss"].backward()
        optimizer.step()
    assert heads_loss() < 0.9 * before  # about 0.83 of it after 8 steps
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_data_tokens_the_model_lacks_start_fresh_and_keep_a_frozen_models_embedding_trainable(saved):
    """A tokenizer without the model's end-of-text token gets one from the datamodule: its row is new (fresh init),
    the others are the model's; with the trunk frozen, the embedding still trains (the new row must learn)."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved["gpt2"], dtype=torch.float32)
    model = NextTokenPrediction(HFTrunk(pretrained=saved["gpt2"], freeze_trunk=True), vocab_size=98)
    report = model.pretrained_report
    assert report["new_rows"] == [97] and not report["frozen"] and "rows the model lacks" in report["note"]
    assert torch.equal(model.embed.weight[:97], reference.get_input_embeddings().weight)
    assert model.embed.weight.requires_grad and not any(p.requires_grad for p in model.trunk.parameters())


def test_a_loaded_state_dict_is_not_overwritten_by_the_pretrained_start(saved):
    """Weights loaded into an objective over a pretrained trunk (load_from_checkpoint, a resume) are its trained
    ones: a later setup (trainer.validate on a loaded model) does not reinitialise its special-token rows."""
    from objectives import Coconut
    trained = Coconut(HFTrunk(pretrained=saved["llama"]), vocab_size=24, eos_id=1)
    trained.finish_pretrained_start()
    with torch.no_grad():
        trained.embed.weight[24:].normal_()  # <bot>, <eot>, <latent> as training left them
    loaded = Coconut(HFTrunk(pretrained=saved["llama"]), vocab_size=24, eos_id=1)
    loaded.load_state_dict(trained.state_dict())
    loaded.finish_pretrained_start()
    assert torch.equal(loaded.embed.weight, trained.embed.weight)


EXPORTED_HEADS = {
    "mtp-block": (MultiTokenPrediction, dict(n_future=3), "heads"),
    "mtp-mlp": (MultiTokenPrediction, dict(n_future=3, head_type="mlp"), "heads"),
    "deepseek": ("DeepSeekMTP", dict(depth=2), "modules"),
}


@pytest.mark.parametrize("kind", EXPORTED_HEADS)
def test_exported_heads_come_back_through_the_trunk_and_draft_as_before(kind, tokenizer, tmp_path):
    """An MTP (block or MLP heads) or DeepSeek checkpoint exported to a Llama folder: the same family built over
    HFTrunk(folder) loads the heads file at setup (here by hand), and its heads' logits and speculative decoding
    (drafts, accepted drafts, output) are the original's."""
    import objectives
    cls, options, drafter = EXPORTED_HEADS[kind]
    cls = getattr(objectives, cls) if isinstance(cls, str) else cls
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, qkv_bias=True)
    V = tokenizer.get_vocab_size()
    ours = cls(Transformer(**trunk_args), vocab_size=V, **options).eval()
    varied(ours)
    with torch.no_grad():  # the heads off their init (an MLP head starts as the identity), still near the identity
        for name, p in ours.named_parameters():  # so that their drafts are accepted where greedy decoding loops
            if not name.startswith(("trunk.", "embed.")):
                p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(ours, trunk_args, tokenizer, tmp_path / "heads.ckpt", **options)
    export_hf.export(str(tmp_path / "heads.ckpt"), str(tmp_path / "hf"))

    back = cls(HFTrunk(pretrained=str(tmp_path / "hf")), vocab_size=V, **options).eval()
    report = back.finish_pretrained_start()
    assert report["heads_from"] == f"objectives.{cls.__name__}" and not report["heads_left_out"]
    assert set(report["heads_loaded"]) == {n for n in back.state_dict() if not n.startswith(("trunk.", "embed."))}
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():  # every head's (module's) logits at every position, teacher-forced
        for m in (ours, back):
            hidden = m.hidden(ids)
            if cls is MultiTokenPrediction:
                m.head_logits = [m.logits(m.head_output(k, z)) for k, z in enumerate(m.head_states(hidden))]
            else:
                m.head_logits = [m.logits(module.out_norm(z)) for module, z in
                                 zip(m.mtp_modules, m.module_states(hidden, ids, torch.ones(2, 12)))]
        for a, b in zip(ours.head_logits, back.head_logits, strict=True):
            close(b, a, atol=1e-4)
    prompt = ids[:1, :6]
    outputs = []
    for m in (ours, back):  # the same drafts accepted at the same steps, the same tokens
        outputs.append((m.generate(prompt, 32, speculative=True, drafter=drafter).tolist(), m.decode_stats))
    assert outputs[0] == outputs[1] and outputs[0][0] == ours.generate(prompt, 32).tolist()


def test_heads_of_another_shape_are_refused_with_the_files_settings(tokenizer, tmp_path):
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    V = tokenizer.get_vocab_size()
    ours = MultiTokenPrediction(Transformer(**trunk_args), vocab_size=V, n_future=3, head_type="mlp")
    save_checkpoint(ours, trunk_args, tokenizer, tmp_path / "mtp.ckpt", n_future=3, head_type="mlp")
    export_hf.export(str(tmp_path / "mtp.ckpt"), str(tmp_path / "hf"))
    more = MultiTokenPrediction(HFTrunk(pretrained=str(tmp_path / "hf")), vocab_size=V, n_future=4, head_type="mlp")
    report = more.finish_pretrained_start()  # heads 2 and 3 load, head 4 keeps its init
    assert {n.split(".")[1] for n in report["heads_loaded"] if n.startswith("heads.")} == {"0", "1"}
    ntp = NextTokenPrediction(HFTrunk(pretrained=str(tmp_path / "hf")), vocab_size=V)
    assert ntp.finish_pretrained_start()["heads_left_out"]  # another family: nothing of it loads


@pytest.mark.parametrize("family,passes", [("llama", "cache"), ("llama", "recompute"), ("gpt2", "cache")])
def test_coconuts_multi_pass_gradients_on_the_trunk_equal_a_loop_of_full_forwards(family, passes, saved):
    """tests/test_coconut.py's check on a pretrained model's body: the multi-pass forward (one shared cache, or
    recomputed prefixes) gives the loss and every gradient of a loop of full forwards, thought by thought."""
    from test_coconut import EOS, V, hand_batch, reference_loss

    from objectives import Coconut
    from objectives.training.losses import chunked_cross_entropy
    torch.manual_seed(0)
    m = Coconut(HFTrunk(pretrained=saved[family]), vocab_size=V, eos_id=EOS, max_latent_stage=3, passes=passes)
    m.finish_pretrained_start()  # <bot>, <eot>, <latent> start as the end-of-text token, in the head too
    assert all(torch.equal(m.unembedding[V + i], m.unembedding[EOS]) for i in range(3))
    lb = m.latent_batch(hand_batch(), 3)
    params = [p for p in m.parameters() if p.requires_grad]
    ref, ref_embeds = reference_loss(m, lb)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    hidden, targets, weights, embeds = m.thought_forward(lb)
    nll, count, _ = chunked_cross_entropy(hidden, m.unembedding, targets, weights)
    grads = torch.autograd.grad(nll, params, allow_unused=True)
    assert int(count) == int(lb["loss_mask"][:, 1:].sum())
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    compared = 0
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
            continue
        assert float((g - r).norm() / r.norm().clamp(min=1e-12)) < 1e-4
        compared += 1
    assert compared > 10 and float(ref_grads[0].norm()) > 0  # the body's weights, and the embedding of the thoughts


def test_match_params_on_a_pretrained_trunk_fails_naming_the_option(saved):
    with pytest.raises(AttributeError, match="match_params false"):
        MultiTokenPrediction(HFTrunk(pretrained=saved["llama"]), vocab_size=97, n_future=3, match_params=True)
    assert getattr(HFTrunk(pretrained=saved["llama"]), "blocks", None) is None  # getattr with a default still works
    # transformers runs the model whole: nothing hands out the input of its last layer for sibling heads
    with pytest.raises(ValueError, match="HFTrunk cannot: use topology 'parallel'"):
        MultiTokenPrediction(HFTrunk(pretrained=saved["llama"]), vocab_size=97, n_future=3, topology="siblings")


def test_the_per_head_backward_uses_an_untied_head(saved):
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 13))
    batch = {"tokens": tokens, "loss_mask": torch.ones(2, 13)}
    losses = []
    for per_head in (True, False):
        torch.manual_seed(0)
        model = MultiTokenPrediction(HFTrunk(pretrained=saved["llama"]), vocab_size=97, n_future=2,
                                     per_head_backward=per_head)
        loss = model.loss(batch)["loss"]
        loss.backward()
        losses.append((loss.detach(), model.lm_head.weight.grad))
    close(losses[0][0], losses[1][0])
    assert losses[0][1] is not None
    close(losses[0][1], losses[1][1])


def test_the_prompt_lookup_benchmark_runs_both_libraries_and_checks_them_against_greedy(tokenizer, tmp_path):
    """benchmarks/hf_lookup.py on a tiny checkpoint: its four decodings run and every output is greedy's (the
    figures themselves are for BENCHMARKS.md)."""
    from benchmarks import hf_lookup
    torch.manual_seed(0)
    trunk_args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
    ours = NextTokenPrediction(Transformer(**trunk_args), vocab_size=tokenizer.get_vocab_size()).eval()
    varied(ours)
    save_checkpoint(ours, trunk_args, tokenizer, tmp_path / "ntp.ckpt")
    rows = hf_lookup.main(["--ckpt_path", str(tmp_path / "ntp.ckpt"), "--prompts", "2", "--prompt_tokens", "24",
                           "--max_new_tokens", "12", "--num_drafts", "4", "--json", str(tmp_path / "out.json")])
    assert [r["decoding"] for r in rows] == list(hf_lookup.CASES)
    assert all(r["equal to own greedy"] and r["equal to beyond-ntp greedy"] and r["tokens/s"] > 0 for r in rows)
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == json.loads(json.dumps(rows))


@pytest.mark.parametrize("family", ["deepseek", "bag_of_words", "tfidf_on_mtp"])
def test_the_other_causal_families_take_a_step_on_a_pretrained_trunk(family, saved):
    """DeepSeek's modules and the future summaries (on NTP and on MTP) train on a tiny Llama: a finite loss whose
    gradients reach what the family adds."""
    from objectives import BagOfWordsSummary, DeepSeekMTP
    torch.manual_seed(0)
    trunk = HFTrunk(pretrained=saved["llama"])
    model = {"deepseek": lambda: DeepSeekMTP(trunk, vocab_size=97, depth=2),
             "bag_of_words": lambda: NextTokenPrediction(trunk, vocab_size=97,
                                                         summaries=[BagOfWordsSummary(window=4)]),
             "tfidf_on_mtp": lambda: MultiTokenPrediction(trunk, vocab_size=97, n_future=2, summaries=[
                 BagOfWordsSummary(window=4, weighting="tfidf")])}[family]()
    batch = {"tokens": torch.randint(0, 97, (2, 17)), "loss_mask": torch.ones(2, 17)}
    if family == "tfidf_on_mtp":
        model.summaries[0].fit_idf([batch])
    loss = model.loss(batch)["loss"]
    loss.backward()
    added = model.mtp_modules if family == "deepseek" else model.summaries
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0
                                        for p in added.parameters() if p.requires_grad)


# --- mask tensors, the retrofit and planning tokens on a pretrained model -----------------------------------------
def tiny_config(config_class, **extra):
    return config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, **extra)


MASK_FAMILIES = {  # the model types that take a mask tensor (models.hf.TENSOR_MASK_MODEL_TYPES), tiny
    **FAMILIES,
    "mistral": lambda: transformers.MistralForCausalLM(tiny_config(transformers.MistralConfig, sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(tiny_config(transformers.Qwen2Config)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(tiny_config(transformers.Qwen3Config, head_dim=16)),
}


@pytest.mark.parametrize("family,attention", [(f, "sdpa") for f in MASK_FAMILIES]
                         + [("llama", "eager"), ("gpt2", "eager")])
def test_a_mask_tensor_reaches_every_layer_as_the_models_own_4d_mask(family, attention, tmp_path):
    """Any pattern (each query sees itself) with any positions: the trunk's hidden states are the model's own
    forward given the same mask as its 4D attention mask (boolean for sdpa, additive for eager), and differ from
    the causal ones (the mask reached the layers)."""
    from models.hf import TENSOR_MASK_MODEL_TYPES
    assert set(MASK_FAMILIES) == set(TENSOR_MASK_MODEL_TYPES)  # every model type said to take one is checked here
    torch.manual_seed(0)
    MASK_FAMILIES[family]().save_pretrained(tmp_path)
    trunk = HFTrunk(pretrained=str(tmp_path)).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for model in (trunk.body, reference):
        model.set_attn_implementation(attention)
    assert trunk.supported_masks == ("causal", "tensor")
    x = torch.randn(2, 9, 64)
    mask = (torch.rand(2, 1, 9, 9) < 0.5) | torch.eye(9, dtype=torch.bool)
    positions = torch.randint(0, 40, (2, 9))
    given = mask if attention == "sdpa" else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = trunk(x, mask=mask, positions=positions)
        own = reference.base_model(inputs_embeds=x, attention_mask=given, position_ids=positions).last_hidden_state
        close(out, own)
        assert not torch.allclose(out, trunk(x, positions=positions), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mask_layout_gives_a_loop_of_prefix_forwards_cached_ragged_and_over_holes(family, saved):
    """The retrofit's layout (groups of mask tokens after anchors, objectives/distill.py's mask_layout): each group's
    states are a plain forward of its anchor's prefix followed by the group, the real tokens' are the causal ones;
    after a ragged cache with holes (per-row crops) each row's step is a fresh forward of that row's history, and
    the cache cropped to the real tokens continues as that history does. A causal mask tensor with left padding
    is the causal forward."""
    from objectives.distill import mask_layout
    trunk = trunk_of(saved, family)
    torch.manual_seed(0)
    with torch.no_grad():
        x, groups = torch.randn(2, 10, 64), torch.randn(2, 3 * 2, 64)  # 3 groups of 2 mask tokens per row
        anchors = torch.tensor([[2, 5, 9], [0, 7, 4]])
        layout = mask_layout(torch.tensor([10, 10]), 10, anchors, 2)
        out = trunk(torch.cat([x, groups], 1), mask=layout.mask, positions=layout.positions)
        close(out[:, :10], trunk(x))
        for b in range(2):
            for g, a in enumerate(anchors[b].tolist()):
                alone = trunk(torch.cat([x[b : b + 1, : a + 1], groups[b : b + 1, 2 * g : 2 * g + 2]], 1))[0]
                close(out[b, 10 + 2 * g : 12 + 2 * g], alone[a + 1 :])

        cache = trunk.make_cache(2)
        history = [torch.randn(6, 64), torch.randn(3, 64)]
        trunk(torch.stack([history[0], torch.cat([history[1], torch.zeros(3, 64)])]), cache=cache,
              padding_mask=torch.tensor([[True] * 6, [True] * 3 + [False] * 3]))
        drafts = torch.randn(2, 4, 64)
        trunk(drafts, cache=cache)
        cache.crop(torch.tensor([6 + 1, 3 + 4]))  # row 0 keeps one draft: slots inside the cache no row uses
        history = [torch.cat([h, d[:k]]) for h, d, k in zip(history, drafts, (1, 4))]
        step, masks, n_real = torch.randn(2, 3, 64), torch.randn(2, 2, 64), torch.tensor([3, 2])  # row 1: padding
        start = cache.lengths.clone()
        layout = mask_layout(n_real, 3, (n_real - 1)[:, None], 2, start)
        out = trunk(torch.cat([step, masks], 1), mask=layout.mask, cache=cache, positions=layout.positions)
        cache.crop(start + n_real)  # as the retrofit's decoding keeps only the real tokens
        nxt = torch.randn(2, 1, 64)
        after = trunk(nxt, cache=cache)
        for b, n in enumerate(n_real.tolist()):
            L = len(history[b])
            alone = trunk(torch.cat([history[b], step[b, :n], masks[b]])[None])[0]
            close(out[b, :n], alone[L : L + n])
            close(out[b, 3:], alone[L + n :])
            close(after[b], trunk(torch.cat([history[b], step[b, :n], nxt[b]])[None])[0, L + n :])

        real = torch.arange(10)[None] >= torch.tensor([[0], [4]])  # left padding, no cache
        causal = torch.ones(10, 10, dtype=torch.bool).tril()
        padded = trunk(x, mask=causal, padding_mask=real)
        assert torch.isfinite(padded).all()  # padding queries see themselves: no row without a key
        close(padded[1, 4:], trunk(x, padding_mask=real)[1, 4:])
        close(padded[0], trunk(x)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_retrofit_trains_on_a_pretrained_model_and_decodes_as_its_greedy(family, saved):
    """SelfDistillation over HFTrunk (the model is its own teacher): adapters on every linear layer of the model
    (GPT-2's Conv1D too) and the mask embeddings are all that trains, their gradients arrive, the loss falls on a
    repeated batch, the model's weights (body, embedding, head) keep every bit and its dropout stays off; after
    training, verified decoding (ragged prompts too) gives the model's greedy tokens."""
    from objectives.distill import SelfDistillation
    torch.manual_seed(0)
    model = SelfDistillation(HFTrunk(pretrained=saved[family]), vocab_size=97, eos_id=None, k=3, regions=6,
                             lora_rank=4)
    with torch.no_grad():  # varied outputs from untrained weights: larger than their init
        for name, p in model.named_parameters():
            if name.startswith(("embed.", "lm_head.")):
                p.normal_(std=0.3)
            elif name.startswith("trunk.") and p.dim() == 2:
                p.normal_(std=0.2)
    assert len(model.adapters) == {"llama": 7, "gpt2": 4}[family] * 2
    added = {n for n, _ in model.named_parameters() if n.startswith(("adapters.", "mask_embed."))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == added
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in added}
    tokens = torch.randint(0, 97, (2, 8)).repeat(1, 3)
    batch = {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    assert not any(m.training for m in model.trunk.modules())
    losses = []
    for step in range(10):
        torch.manual_seed(1)  # the same regions every step
        optimizer.zero_grad()
        loss = model.loss(batch)["loss"]
        loss.backward()
        if step == 0:
            assert all(a.b.grad.abs().sum() > 0 for a in model.adapters.values())  # (B starts at zero, A's grad too)
            assert model.mask_embed.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.6 * losses[0]  # about 0.4 (Llama), 0.2 (GPT-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    prompts = tokens[:, :10]
    greedy = model.generate(prompts, 12, decoding="greedy")
    assert torch.equal(model.generate(prompts, 12, decoding="verify"), greedy) and len(set(greedy[0].tolist())) > 5
    lengths = torch.tensor([6, 10])
    out = model.generate(prompts, 8, decoding="verify", prompt_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert out[b, : n + 8].tolist() == model.generate(prompts[b : b + 1, :n], 8, decoding="greedy")[0].tolist()


def test_planning_tokens_train_and_generate_on_a_pretrained_llama(saved):
    """The plan tokens are rows after the data's vocabulary: the data's rows are the model's, the plans' start
    fresh at the pretrained start (as any family's extra tokens); a step trains them, and generation writes plans
    and returns the text without them."""
    from test_planning import small_batch

    from objectives import PlanningTokens
    from objectives.planning import remove_plans
    dm, batch = small_batch(digits=2)
    V = dm.vocab_size
    model = PlanningTokens(HFTrunk(pretrained=saved["llama"]), vocab_size=V, eos_id=dm.eos_id, rule="multiplication",
                           num_plan_types=4)
    model.words = [dm.tokenizer.id_to_token(i) for i in range(V)]
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved["llama"], dtype=torch.float32)
    assert model.finish_pretrained_start()["new_rows"] == list(range(V, V + 4))
    for matrix, theirs in ((model.embed.weight, reference.get_input_embeddings().weight),
                           (model.lm_head.weight, reference.get_output_embeddings().weight)):
        assert torch.equal(matrix[:V], theirs[:V]) and not torch.equal(matrix[V:], theirs[V : V + 4])
    augmented = model.augment(batch)
    assert (augmented["tokens"] >= V).any()
    loss = model.loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad[V:].abs().sum() > 0
    assert model.lm_head.weight.grad[V:].abs().sum() > 0
    model.eval()
    prompt = batch["tokens"][:2, : int(batch["prompt_len"].min())]
    with torch.no_grad():
        model.lm_head.weight[V:] += 5 * model.lm_head.weight[V:].sign()  # plans likely: generation writes some
    kept = model.generate(prompt, 10, keep_plans=True)
    assert (kept >= V).any() and kept.max() < V + 4
    text = model.generate(prompt, 10)
    assert (text < V).all() and torch.equal(text, remove_plans(kept, V, dm.eos_id))


def test_families_that_need_full_attention_or_a_mask_tensor_the_model_cannot_take_refuse_it_by_name(saved, tmp_path):
    """The denoising families need full attention, which a causal LM does not promise; the retrofit needs a mask
    tensor, which a model with a sliding window (Mistral's default), another model type or flash attention cannot
    take: each refuses at construction, and the trunk says why, naming the model type."""
    from objectives import MaskedDiffusion
    from objectives.distill import SelfDistillation
    from models.hf import tensor_mask_refusal
    with pytest.raises(ValueError, match="MaskedDiffusion needs the full attention mask.*HFTrunk"):
        MaskedDiffusion(HFTrunk(pretrained=saved["llama"]), vocab_size=97)
    transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=128, sliding_window=16)).save_pretrained(tmp_path)
    trunk = HFTrunk(pretrained=str(tmp_path))
    assert trunk.supported_masks == ("causal",) and "sliding window" in trunk.tensor_mask_refusal
    with pytest.raises(ValueError, match="SelfDistillation needs the tensor attention mask.*HFTrunk"):
        SelfDistillation(trunk, vocab_size=97)
    with pytest.raises(ValueError, match="mistral.*sliding window"):
        trunk(torch.randn(1, 4, 64), mask=torch.ones(4, 4, dtype=torch.bool))
    assert "'gpt_neox'" in tensor_mask_refusal(transformers.GPTNeoXConfig())
    flash = transformers.LlamaConfig()
    flash._attn_implementation = "flash_attention_2"
    assert "'flash_attention_2'" in tensor_mask_refusal(flash)


def test_the_cli_takes_a_local_folders_tokenizer_but_leaves_a_hub_id_and_a_given_path_alone(tmp_path):
    """lab/cli.py's tokenizer_from_pretrained on the parsed config: a folder with tokenizer.json fills an unset
    tokenizer_path; a hub id, a folder without one, a path already given or a generated task's data do not."""
    from jsonargparse import Namespace

    from lab.cli import tokenizer_from_pretrained
    (tmp_path / "tokenizer.json").write_text("{}")

    def config(pretrained, **data):
        return Namespace(model=Namespace(class_path="objectives.NextTokenPrediction", init_args=Namespace(
            trunk=Namespace(class_path="models.HFTrunk", init_args=Namespace(pretrained=pretrained)))),
            data=Namespace(class_path="datamodules.TextDataModule", init_args=Namespace(**data)))

    filled = config(str(tmp_path), tokenizer_path=None)
    assert tokenizer_from_pretrained(filled) == str(tmp_path / "tokenizer.json")
    assert filled.data.init_args.tokenizer_path == str(tmp_path / "tokenizer.json")
    for unchanged in (config("gpt2", tokenizer_path=None), config(str(tmp_path / "none"), tokenizer_path=None),
                      config(str(tmp_path), tokenizer_path="mine.json"),
                      config(str(tmp_path), tokenizer_path=None, task="multiplication")):
        before = unchanged.data.init_args.tokenizer_path
        assert tokenizer_from_pretrained(unchanged) is None and unchanged.data.init_args.tokenizer_path == before
