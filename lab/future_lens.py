"""How far ahead a trunk sees: linear probes from the hidden state at position t to the token at t + k.

Pal et al. 2023, "Future Lens: Anticipating Subsequent Tokens from a Single Hidden State", show that a single
hidden state of a causal language model already encodes tokens beyond the next one. This module measures that for
any causal run of the project. With h_t the frozen trunk's output at t (what the next-token head reads, after the
final norm), it fits one linear probe per offset k = 1 .. max_k,

    p_k(x_{t+k} | h_t) = softmax(W_k h_t + b_k),

by cross-entropy on the hidden states of `train_windows` training windows, and reports the probe's top-1 accuracy
on `val_windows` held-out (val split) windows. k = 1 is the next token; a trunk trained with multi-token
prediction, future summaries or latent reasoning should keep more of x_{t+2}, x_{t+4}, ... in h_t than NTP does.
Beside each k it prints the accuracy of always guessing the most frequent training target (the floor).

`python -m benchmarks.future_lens --ckpt_path ...` prints the table; compare.py probes every causal run of an
experiment (`lab/runner.py`).

The windows come from the run's own datamodule, rebuilt from the settings stored in the checkpoint. Families that
denoise a whole sequence (MDLM, Diffusion-LM) have no causal hidden state and are refused.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from objectives.training.checkpoints import load_checkpoint, load_with_tokenizer


def is_causal(model) -> bool:
    """A family whose trunk reads left to right (its hidden state at t has seen only x_0 .. x_t)."""
    return "full" not in getattr(model, "required_masks", ("causal",))


def windows(loader, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` rows of a dataloader: tokens [N, L] and a mask of real (non-padding) tokens [N, L]."""
    tokens, real = [], []
    for batch in loader:
        t = batch["tokens"]
        tokens.append(t)
        real.append(batch["segments"] >= 0 if "segments" in batch else torch.ones_like(t, dtype=torch.bool))
        if sum(len(x) for x in tokens) >= count:
            break
    if not tokens:
        raise ValueError("the dataloader gave no batches: the future lens needs data windows")
    length = max(x.shape[1] for x in tokens)
    pad = lambda x, value: F.pad(x, (0, length - x.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(x, 0) for x in tokens])[:count], torch.cat([pad(x, False) for x in real])[:count]


@torch.no_grad()
def hidden_states(hidden: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, batch_size: int = 16):
    """The frozen trunk's hidden states [N, L, D] (fp32), computed `batch_size` rows at a time."""
    return torch.cat([hidden(tokens[i:i + batch_size]).float() for i in range(0, len(tokens), batch_size)])


def pairs(states: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor, k: int):
    """(h_t, x_{t+k}) for every position whose own token and target are real: features [M, D], targets [M]."""
    keep = real[:, :-k] & real[:, k:]
    return states[:, :-k][keep], tokens[:, k:][keep]


def fit_probes(train: tuple, held_out: tuple, ks: list[int], vocab_size: int, epochs: int = 8, lr: float = 3e-3,
               batch_size: int = 1024, seed: int = 0) -> dict[int, dict[str, float]]:
    """One linear probe per k, fitted by Adam on the training hidden states; held-out top-1 accuracy per k.

    `train` and `held_out` are (states [N, L, D], tokens [N, L], real [N, L]). Returns, per k, `accuracy` (the
    probe's) and `floor` (always the most frequent training target)."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for k in ks:
        x, y = pairs(*train, k)
        x_val, y_val = pairs(*held_out, k)
        if len(x) == 0 or len(x_val) == 0:
            raise ValueError(f"the windows are too short for a probe at k={k}: give longer windows or a smaller max_k")
        probe = torch.nn.Linear(x.shape[1], vocab_size)
        torch.nn.init.zeros_(probe.weight)
        torch.nn.init.zeros_(probe.bias)
        optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for rows in torch.randperm(len(x), generator=generator).split(batch_size):
                    loss = F.cross_entropy(probe(x[rows]), y[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            predicted = torch.cat([probe(chunk).argmax(-1) for chunk in x_val.split(batch_size)])
        majority = torch.bincount(y, minlength=vocab_size).argmax()
        results[k] = {"accuracy": (predicted == y_val).float().mean().item(),
                      "floor": (y_val == majority).float().mean().item()}
    return results


def load_run(ckpt_path: str):
    """The objective of a project checkpoint (eval mode) and its datamodule, rebuilt from the stored settings."""
    model, _ = load_with_tokenizer(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)  # weights_only, the project allowlist
    settings = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    class_path = settings.pop("_class_path", None)
    if class_path is None:
        raise ValueError(f"{ckpt_path} stores no datamodule settings: it was not written by train.py")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls.__init__).parameters  # recorded facts (e.g. the Python version) are no arguments
    datamodule = cls(**{k: v for k, v in settings.items() if k in accepted})
    datamodule.prepare_data()
    datamodule.setup("fit")
    return model, datamodule


def future_lens(ckpt_path: str, max_k: int = 8, train_windows: int = 64, val_windows: int = 16, epochs: int = 8,
                seed: int = 0) -> dict[int, dict[str, float]]:
    """Held-out probe accuracy per k = 1 .. max_k for the frozen trunk of a causal run's checkpoint."""
    model, datamodule = load_run(ckpt_path)
    if not is_causal(model):
        raise ValueError(f"{type(model).__name__} denoises whole sequences: its hidden state at t has seen the "
                         f"future, so the future lens (a causal probe) does not apply")
    model.float()
    hidden = lambda tokens: model.hidden(tokens[:, : model.trunk.max_seq_len])  # noqa: E731
    torch.manual_seed(seed)
    train_tokens, train_real = windows(datamodule.train_dataloader(), train_windows)
    val_tokens, val_real = windows(datamodule.val_dataloader(), val_windows)
    train_tokens, train_real = train_tokens[:, : model.trunk.max_seq_len], train_real[:, : model.trunk.max_seq_len]
    val_tokens, val_real = val_tokens[:, : model.trunk.max_seq_len], val_real[:, : model.trunk.max_seq_len]
    train = (hidden_states(hidden, train_tokens), train_tokens, train_real)
    held_out = (hidden_states(hidden, val_tokens), val_tokens, val_real)
    return fit_probes(train, held_out, list(range(1, max_k + 1)), model.vocab_size, epochs=epochs, seed=seed)
