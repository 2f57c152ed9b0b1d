"""Regression tests of defects found on review: weight decay of Mamba's A_log and D, Diffusion-LM's clamp,
bits per byte over exactly the counted tokens, the reasoning vocabulary built from the train split only, small
held-out files with the default sizes, and the public-file case end to end."""
from __future__ import annotations

import json

import pytest
import torch

from models import Mamba, Transformer
from objectives import DiffusionLM, NextTokenPrediction
from objectives.training.optim import decay_groups


def test_weight_decay_leaves_mambas_a_log_and_d_alone():
    model = NextTokenPrediction(Mamba(d_model=16, n_layers=1), vocab_size=11)
    block = next(m for m in model.modules() if hasattr(m, "A_log"))
    optimizer = torch.optim.AdamW(decay_groups(model), lr=0.1, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    optimizer.step()
    after = dict(model.named_parameters())
    a_log = next(n for n, p in after.items() if p is block.A_log)
    d = next(n for n, p in after.items() if p is block.D)
    assert torch.equal(after[a_log], before[a_log]) and torch.equal(after[d], before[d])
    assert not torch.equal(after["embed.weight"], before["embed.weight"])  # matrices are still decayed


def test_diffusion_lm_clamps_to_the_nearest_embedding_in_l2_not_the_largest_dot_product():
    torch.manual_seed(0)
    model = DiffusionLM(Transformer(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), vocab_size=3,
                        diffusion_steps=10, sampling_steps=1).eval()
    with torch.no_grad():  # a small-norm word at x0's place and a large-norm word in the same direction
        model.embed.weight.zero_()
        model.embed.weight[1, 0], model.embed.weight[2, 0] = 1.0, 10.0
    x0 = torch.zeros(1, 4, 16)
    x0[..., 0] = 1.2
    model.predict_x0 = lambda xt, t: torch.cat([torch.zeros(1, 2, 16), x0], 1)  # every prediction is x0
    assert model.round(x0).unique().tolist() == [2]  # the rounding softmax still prefers the large dot product
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 4)
    assert out[0, 2:].tolist() == [1, 1, 1, 1]


def mixed_corpus(tmp_path, corpus_files) -> list[str]:
    """Code documents and 3-bytes-a-character documents, ordered so that the val split opens with code: its first
    windows then have other bytes per token than the split as a whole."""
    import random

    from datamodules.text import _bucket
    code = [json.loads(line)["text"] for line in open(corpus_files[0])]
    cjk = ["".join(chr(random.Random(i).randint(0x4E00, 0x4E00 + 200)) for _ in range(2000)) for i in range(30)]
    split = lambda t: _bucket(t, 0.3, 0.0)  # noqa: E731  (the split the datamodule will give each document)
    docs = [t for t in code + cjk if split(t) == "train"]
    docs += [t for t in code if split(t) == "val"] + [t for t in cjk if split(t) == "val"]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return [str(path)]


def test_bits_per_byte_divides_the_counted_nats_by_the_counted_tokens_bytes(tmp_path, corpus_files):
    import math

    from conftest import quickstart, run_cli, scalars
    from objectives.training import metrics as M
    files = mixed_corpus(tmp_path, corpus_files)
    cli = run_cli(tmp_path, *quickstart(files), "--data.init_args.val_fraction", "0.3",
                  "--data.init_args.test_fraction", "0.0", steps=2)  # validates 2 batches of 4 windows
    tags = scalars(tmp_path)
    dm = cli.datamodule
    n_tokens = n_bytes = 0
    for i, batch in zip(range(2), dm.val_dataloader()):
        for window in batch["tokens"]:
            n_tokens += len(window) - 1  # the targets tokens[1:]
            n_bytes += len(dm.tokenizer.decode(window[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
    assert n_tokens == 512 and abs(n_bytes / n_tokens - dm.bytes_per_token) > 0.1  # the split's mean differs
    expected = tags[M.VAL_NTP_LOSS][-1] * n_tokens / math.log(2) / n_bytes
    assert tags[M.VAL_BPB][-1] == pytest.approx(expected, rel=2e-3)


def test_no_bits_per_byte_on_a_word_level_task_vocabulary(tmp_path):
    from conftest import TINY_MODEL, run_cli
    from objectives.training import metrics as M
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL, "--data",
                  "configs/data/multiplication.yaml", "--data.init_args.digits", "2", "--data.init_args.val_size", "16",
                  "--data.init_args.test_size", "16", "--data.init_args.batch_size", "8",
                  "--model.init_args.eval_examples", "8", steps=2)
    logged = cli.trainer.logged_metrics
    assert M.VAL_NTP_LOSS in logged and M.VAL_BPB not in logged, sorted(logged)


def prosqa_records(n: int, seed: int) -> list[dict]:
    """ProsQA-style records written as the public release writes them (punctuation attached to the words)."""
    import random

    from datamodules.reasoning import ProsQATask
    task = ProsQATask(num_nodes=5, max_len=120)
    join = lambda words: " ".join(words).replace(" .", ".").replace(" ?", "?")  # noqa: E731
    out = []
    for i in range(n):
        ex = task.sample(random.Random(f"{seed}/{i}"))
        out.append({"question": join(ex.question), "steps": [join(s) for s in ex.steps], "answer": join(ex.answer)})
    return out


def test_the_vocabulary_comes_from_the_train_split_and_unknown_held_out_words_are_counted(tmp_path):
    from datamodules.reasoning import ReasoningDataModule
    train = [{"question": f"Is {w} a cat or a dog?", "steps": [f"{w} barks."], "answer": "dog"}
             for w in ("Rex", "Fido", "Max", "Bo")]
    val = [{"question": "Is Zorro a cat or a dog?", "steps": ["Zorro meows."], "answer": "cat"}]
    for split, records in (("train", train), ("val", val), ("test", val)):
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
    d = ReasoningDataModule(task="file", train_file=str(tmp_path / "train.json"), val_file=str(tmp_path / "val.json"),
                            test_file=str(tmp_path / "test.json"))
    vocab = d.tokenizer.get_vocab()
    assert "Rex" in vocab and "barks" in vocab
    assert not {"Zorro", "meows"} & set(vocab)  # "cat" is in the train questions, so it stays known
    tokens = d.val_set[0]["tokens"]
    assert tokens.count(d.unk_id) == 3  # Zorro twice, meows
    assert d.unknown_tokens["val"] == (3, 8 + 3 + 1)  # of the question's, the step's and the answer's tokens


def test_given_held_out_files_are_the_splits_whatever_their_size(tmp_path):
    from datamodules.reasoning import ReasoningDataModule
    paths = {}
    for split, n, seed in (("train", 60, 0), ("val", 30, 1), ("test", 50, 2)):
        paths[split] = tmp_path / f"{split}.json"
        paths[split].write_text(json.dumps(prosqa_records(n, seed)))
    d = ReasoningDataModule(task="file", train_file=str(paths["train"]), val_file=str(paths["val"]))
    assert (len(d.train_set), len(d.val_set), len(d.test_set)) == (60, 30, 0)
    with pytest.raises(ValueError, match="no test split.*test_file"):
        d.test_dataloader()
    d = ReasoningDataModule(task="file", train_file=str(paths["train"]), val_file=str(paths["val"]),
                            test_file=str(paths["test"]))
    assert (len(d.train_set), len(d.val_set), len(d.test_set)) == (60, 30, 50)
    alone = ReasoningDataModule(task="file", train_file=str(paths["train"]))  # a lone file: a tenth held out for val
    assert (len(alone.train_set), len(alone.val_set), len(alone.test_set)) == (54, 6, 0)


def test_a_public_style_json_pair_of_500_and_300_records_trains_with_defaults_and_logs_accuracy(tmp_path):
    from conftest import TINY_MODEL, run_cli, scalars
    from objectives.training import metrics as M
    (tmp_path / "prosqa_train.json").write_text(json.dumps(prosqa_records(500, 0)))
    (tmp_path / "prosqa_valid.json").write_text(json.dumps(prosqa_records(300, 1)))
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL,
                  "--data", "datamodules.ReasoningDataModule", "--data.init_args.task", "file",
                  "--data.init_args.train_file", str(tmp_path / "prosqa_train.json"),
                  "--data.init_args.val_file", str(tmp_path / "prosqa_valid.json"),
                  "--model.init_args.eval_examples", "16", steps=2)
    assert len(cli.datamodule.val_set) == 300 and len(cli.datamodule.train_set) <= 500
    tags = scalars(tmp_path)
    # the validation at step 2 scored its 16 questions; a model two steps from random init answers none of them
    assert cli.model.scorer.scored == 16 and tags[M.VAL_ACCURACY][-1] == 0.0
