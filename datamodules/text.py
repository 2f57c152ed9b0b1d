"""Text corpora for language modelling: the built-in standard-library code corpus, local files or a hub dataset,
a byte-level BPE tokenizer, and a packed token array on disk that the next run reuses.

Pipeline: texts -> train/val/test splits (by a hash, so a file never straddles two splits) -> BPE trained on the
train split (or a given tokenizer.json) -> `datasets.map(batched=True)` tokenization -> one flat token array per
split (a memmap, documents separated by the end-of-text token) in a cache folder keyed by every setting that
changes its content.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

EOT = "<|endoftext|>"
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the cache layout changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("BEYOND_NTP_CACHE", Path.home() / ".cache" / "beyond-ntp"))


def _bucket(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one document by a hash of its key (a file path, or the text itself)."""
    u = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token's piece of source text [V], for a byte-level BPE (each character of a token
    stands for one byte, so a text's tokens add up to its bytes exactly); special tokens cover none (0). None for
    any other tokenizer, whose pieces need not add up to the text (a word-level vocabulary drops the spaces)."""
    from tokenizers import decoders, pre_tokenizers
    if not isinstance(tokenizer.decoder, decoders.ByteLevel) or getattr(tokenizer.pre_tokenizer, "add_prefix_space",
                                                                         False):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if piece in specials:
            continue
        if not set(piece) <= alphabet:
            return None
        lengths[i] = len(piece)
    return lengths


class TokenWindows(Dataset):
    """Windows of `length` tokens from a flat token array: random starts (training) or fixed, back to back
    (evaluation). Item i is a function of (seed, i) only, so distributed samplers split the work. With
    `token_bytes` (bytes per token id) an item also carries each token's UTF-8 bytes, for bits per byte."""

    def __init__(self, path: Path, dtype: str, length: int, random: bool, num_windows: int, seed: int = 0,
                 token_bytes: np.ndarray | None = None):
        self.path, self.dtype, self.length, self.random, self.seed = path, dtype, length, random, seed
        self.token_bytes = None if token_bytes is None else torch.from_numpy(token_bytes)
        self.n_tokens = os.path.getsize(path) // np.dtype(dtype).itemsize
        if self.n_tokens <= length:
            raise ValueError(f"{path.name} holds {self.n_tokens} tokens, fewer than one window of {length}: "
                             f"lower data.init_args.seq_len or give the split more text")
        most = self.n_tokens // length
        self.num_windows = min(num_windows, most) if num_windows > 0 else most
        self._data = None

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._data is None:  # opened lazily: each dataloader worker maps the file itself
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r")
        if self.random:
            start = int(np.random.default_rng([self.seed, i]).integers(0, self.n_tokens - self.length))
        else:
            start = i * self.length
        tokens = torch.from_numpy(self._data[start : start + self.length].astype(np.int64))
        item = {"tokens": tokens, "loss_mask": torch.ones(self.length)}
        if self.token_bytes is not None:
            item["token_bytes"] = self.token_bytes[tokens]
        return item


class TextDataModule(L.LightningDataModule):
    """Language-modelling data for every objective.

    Args:
        source: "stdlib-code" (the running Python's standard library .py files), "files" (see data_files) or
            "hub" (see hub_dataset; needs a network).
        data_files: local .txt, .jsonl/.json (with a `text_field`) or .parquet files or globs, for source "files".
        hub_dataset: a dataset name on the hub, for source "hub".
        text_field: the column that holds the text in json, parquet and hub datasets.
        tokenizer_path: a `tokenizers` tokenizer.json to use instead of training a BPE.
        bpe_vocab_size: vocabulary size of the byte-level BPE trained on the train split.
        seq_len: tokens per training window (the model sees seq_len inputs and predicts seq_len targets).
        batch_size: windows per batch (per device).
        train_windows: random windows per training epoch (0: as many as the train split has back to back).
        val_windows: fixed validation windows (0: all of the val split).
        val_fraction, test_fraction: shares of documents in the val and test splits.
        cache_dir: where tokenized corpora live (default $BEYOND_NTP_CACHE or ~/.cache/beyond-ntp).
        num_workers: dataloader worker processes.
        seed: seed of the training windows.
    """

    def __init__(self, source: str = "stdlib-code", data_files: list[str] | None = None,
                 hub_dataset: str | None = None, text_field: str = "text", tokenizer_path: str | None = None,
                 bpe_vocab_size: int = 4096, seq_len: int = 256, batch_size: int = 16, train_windows: int = 0,
                 val_windows: int = 0, val_fraction: float = 0.02, test_fraction: float = 0.02,
                 cache_dir: str | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if source not in ("stdlib-code", "files", "hub"):
            raise ValueError(f"data.init_args.source {source!r} is unknown: use 'stdlib-code', 'files' or 'hub'")
        if source == "files" and not data_files:
            raise ValueError("data.init_args.source is 'files' but data.init_args.data_files is empty: list the files")
        if source == "hub" and not hub_dataset:
            raise ValueError("data.init_args.source is 'hub' but data.init_args.hub_dataset is not set")
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave a train split")
        self.save_hyperparameters()
        if source == "stdlib-code":
            self.hparams["python_version"] = sys.version.split()[0]
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self._meta: dict | None = None
        self._tokenizer = None

    # --- what the model is linked to ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the whole val split (a property of the corpus and tokenizer). `val/bpb` does not
        use it: each batch carries its own tokens' bytes (`token_bytes`)."""
        return self.meta["bytes_per_token"]["val"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats) of the val split's token frequencies: the loss of a model that ignores context."""
        return self.meta["unigram_entropy"]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer
            self.prepare_data()
            self._tokenizer = Tokenizer.from_file(str(self.cache_path / "tokenizer.json"))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # --- the cache --------------------------------------------------------------------------------------------
    def _source_files(self) -> list[str]:
        if self.hparams.source == "stdlib-code":
            root = sysconfig.get_paths()["stdlib"]
            return sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                          if "site-packages" not in p)
        files = []
        for pattern in self.hparams.data_files:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise FileNotFoundError(f"data file {pattern!r} does not exist: fix data.init_args.data_files")
            for path in matches:
                if os.path.getsize(path) == 0:
                    raise ValueError(f"data file {path!r} is empty: give data.init_args.data_files files with text")
            files += matches
        return files

    @property
    def cache_key(self) -> str:
        h = self.hparams
        key = {"format": CACHE_FORMAT, "source": h.source, "text_field": h.text_field,
               "split": [h.val_fraction, h.test_fraction], "hub": h.hub_dataset}
        if h.source == "stdlib-code":
            key["python"] = sys.version
        elif h.source == "files":
            key["files"] = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in self._source_files()]
        if h.tokenizer_path:
            key["tokenizer"] = hashlib.sha1(Path(h.tokenizer_path).read_bytes()).hexdigest()
        else:
            key["bpe_vocab_size"] = h.bpe_vocab_size
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return f"{h.source}-{digest}"

    @property
    def cache_path(self) -> Path:
        return self.cache_root / self.cache_key

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = self._load_or_build()
        return self._meta

    def prepare_data(self) -> None:
        self.meta  # noqa: B018  (builds the cache on the first call)

    def _load_or_build(self) -> dict:
        path = self.cache_path
        if not (path / "meta.json").exists():
            self.cache_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.cache_root, prefix=".building-"))
            try:
                self._build(tmp)
                try:
                    os.rename(tmp, path)  # atomic: a concurrent builder's finished cache wins
                except OSError:
                    if not (path / "meta.json").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((path / "meta.json").read_text())

    def _load_texts(self):
        """A DatasetDict with a `text` column per split."""
        import datasets
        h = self.hparams
        if h.source == "stdlib-code":
            root = sysconfig.get_paths()["stdlib"]
            rows = {s: [] for s in SPLITS}
            for p in self._source_files():
                rel = os.path.relpath(p, root)
                rows[_bucket(rel, h.val_fraction, h.test_fraction)].append(
                    Path(p).read_text(encoding="utf-8", errors="replace"))
            return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": rows[s]}) for s in SPLITS})
        if h.source == "files":
            files = self._source_files()
            kinds = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
            ext = {Path(f).suffix for f in files}
            if len(ext) != 1 or next(iter(ext)) not in kinds:
                raise ValueError(f"data files {files} must share one extension among {sorted(kinds)}")
            ds = datasets.load_dataset(kinds[ext.pop()], data_files=files, split="train")
        else:
            try:
                ds = datasets.load_dataset(h.hub_dataset, split="train")
            except Exception as err:
                raise RuntimeError(
                    f"could not load hub dataset {h.hub_dataset!r} ({type(err).__name__}: {err}); without a network, "
                    f"download it elsewhere and pass local files: --data.init_args.source files "
                    f"--data.init_args.data_files [path/to/*.jsonl]") from err
        field = "text" if h.source == "files" and Path(files[0]).suffix == ".txt" else h.text_field
        if field not in ds.column_names:
            raise ValueError(f"the data has no {field!r} column (it has {ds.column_names}): set data.init_args.text_field")
        ds = ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])
        split = ds.map(lambda b: {"split": [_bucket(t, h.val_fraction, h.test_fraction) for t in b["text"]]},
                       batched=True)
        return datasets.DatasetDict({s: split.filter(lambda b: [x == s for x in b["split"]], batched=True)
                                     .remove_columns("split") for s in SPLITS})

    def _train_tokenizer(self, texts):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=self.hparams.bpe_vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator((texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000)), trainer)
        return tok

    def _build(self, out: Path) -> None:
        import datasets
        from tokenizers import Tokenizer
        datasets.disable_progress_bars()
        texts = self._load_texts()
        for s in ("train", "val"):
            if len(texts[s]) == 0:
                raise ValueError(f"the {s} split is empty: give more documents or change val_fraction/test_fraction")
        if self.hparams.tokenizer_path:
            tok = Tokenizer.from_file(self.hparams.tokenizer_path)
        else:
            tok = self._train_tokenizer(texts["train"])
        tok.save(str(out / "tokenizer.json"))
        eos_id = tok.token_to_id(EOT)
        if eos_id is None:
            tok.add_special_tokens([EOT])
            eos_id = tok.token_to_id(EOT)
            tok.save(str(out / "tokenizer.json"))
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"

        def tokenize(batch):
            encoded = tok.encode_batch(batch["text"])
            return {"ids": [e.ids + [eos_id] for e in encoded], "n_bytes": [len(t.encode()) for t in batch["text"]]}

        meta = {"vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype, "bytes_per_token": {}, "tokens": {}}
        for s in SPLITS:
            if len(texts[s]) == 0:
                continue
            ids = texts[s].map(tokenize, batched=True, batch_size=256, remove_columns=["text"])
            flat = np.fromiter((i for row in ids["ids"] for i in row), dtype=dtype)
            flat.tofile(out / f"{s}.bin")
            meta["tokens"][s] = int(flat.size)
            meta["bytes_per_token"][s] = sum(ids["n_bytes"]) / flat.size
            if s == "val":
                counts = np.bincount(flat, minlength=vocab_size)
                p = counts[counts > 0] / flat.size
                meta["unigram_entropy"] = float(-(p * np.log(p)).sum())
        (out / "meta.json").write_text(json.dumps(meta, indent=1))

    # --- loaders ------------------------------------------------------------------------------------------------
    def _windows(self, split: str, random: bool, count: int) -> TokenWindows:
        if split not in self.meta["tokens"]:
            raise ValueError(f"the {split} split is empty: raise data.init_args.{split}_fraction")
        return TokenWindows(self.cache_path / f"{split}.bin", self.meta["dtype"], self.hparams.seq_len + 1,
                            random, count, self.hparams.seed, token_byte_lengths(self.tokenizer))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._windows("train", True, self.hparams.train_windows), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._windows("val", False, self.hparams.val_windows), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._windows("test", False, 0), shuffle=False)

    # the tokenizer travels inside every checkpoint, so generate.py needs nothing else
    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state: dict) -> None:
        pass
