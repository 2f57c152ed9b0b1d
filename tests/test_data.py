"""The text datamodule: sources, tokenizer, the on-disk cache, windows."""
from __future__ import annotations

import json
import sys

import pytest

from datamodules.text import TextDataModule, _bucket


def make(files, tmp_path, **kwargs) -> TextDataModule:
    args = dict(source="files", data_files=files, bpe_vocab_size=400, seq_len=32, batch_size=2, val_fraction=0.1,
                cache_dir=str(tmp_path))
    return TextDataModule(**{**args, **kwargs})


def test_tokenizer_round_trips_code(corpus_files, tmp_path):
    dm = make(corpus_files, tmp_path)
    text = 'def f(x):\n    return {"ü": x ** 2}  # ñ\t\n'
    ids = dm.encode(text)
    assert max(ids) < dm.vocab_size and dm.decode(ids) == text
    assert dm.vocab_size == 400
    assert 1.0 < dm.bytes_per_token < 8.0


def test_second_run_reuses_the_cache_without_tokenizing(corpus_files, tmp_path, monkeypatch):
    first = make(corpus_files, tmp_path)
    meta = first.meta
    monkeypatch.setattr(TextDataModule, "_build", lambda self, out: pytest.fail("re-tokenized"))
    second = make(corpus_files, tmp_path)
    assert second.meta == meta and second.cache_path == first.cache_path
    # a different tokenizer setting is a different cache entry
    assert make(corpus_files, tmp_path, bpe_vocab_size=300).cache_path != first.cache_path


def test_windows_random_for_training_fixed_for_validation(corpus_files, tmp_path):
    dm = make(corpus_files, tmp_path)
    train = dm.train_dataloader().dataset
    val = dm.val_dataloader().dataset
    assert train[0]["tokens"].shape == (33,) and train[0]["loss_mask"].sum() == 33
    assert (train[0]["tokens"] == train[0]["tokens"]).all() and not (train[0]["tokens"] == train[1]["tokens"]).all()
    assert (val[1]["tokens"] == val[1]["tokens"]).all()
    batch = next(iter(dm.val_dataloader()))
    assert batch["tokens"].shape == (2, 33)


def test_txt_and_parquet_files_load(tmp_path, corpus_files):
    import datasets
    records = [json.loads(line) for line in open(corpus_files[0])]
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(r["text"] for r in records))
    assert make([str(txt)], tmp_path / "c1").vocab_size == 400
    parquet = tmp_path / "b.parquet"
    datasets.Dataset.from_list([{"body": r["text"]} for r in records]).to_parquet(str(parquet))
    dm = make([str(parquet)], tmp_path / "c2", text_field="body")
    assert dm.decode(dm.encode("import os")) == "import os"
    with pytest.raises(ValueError, match="no 'text' column"):
        make([str(parquet)], tmp_path / "c3").meta


def test_hub_dataset_offline_says_to_pass_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = TextDataModule(source="hub", hub_dataset="nobody/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="data_files"):
        dm.meta


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="source 'web'"):
        TextDataModule(source="web")
    with pytest.raises(ValueError, match="data_files is empty"):
        TextDataModule(source="files")


def test_stdlib_split_is_by_file_and_python_version_is_recorded():
    dm = TextDataModule()
    files = dm._source_files()
    assert len(files) > 500 and all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert dm.hparams.python_version == sys.version.split()[0]
    buckets = [_bucket(f"mod{i}.py", 0.02, 0.02) for i in range(5000)]
    assert 0.01 < buckets.count("val") / 5000 < 0.03 and buckets == [_bucket(f"mod{i}.py", 0.02, 0.02) for i in range(5000)]
