"""Reading the project's checkpoints safely, starting a run from another run's weights, and frozen companions.

- `load_checkpoint(path)`: `torch.load(weights_only=True)` with an allowlist of the few plain types a project
  checkpoint carries (the optimizer and schedule classes a hand-built objective records in its hyperparameters,
  `functools.partial`, paths, Lightning's `AttributeDict`). A checkpoint that would need anything else, an object
  whose unpickling could run code, is refused with `UnsafeCheckpointError` before any of it is built.
- `load_objective(path)`: the objective a checkpoint was trained as (its class from `_class_path`), in eval mode.
- `warm_start(model, path)`: copy a checkpoint's weights into a new objective (what `init_from` does): tensors of
  the same name and shape load; embedding rows for the new objective's own special tokens (`extra_tokens`) are
  initialised from an existing token's row or as usual (`Objective.extra_token_sources`); modules the new
  objective adds keep their fresh init. It returns the report of what loaded, what was added, what was left out.
- `start_from_pretrained(model)` and `finish_pretrained_start(model, datamodule)`: the warm start from a trunk that
  brings a pretrained model (`models.HFTrunk`): its embedding and output head go to the objective when it is built,
  and at setup of a new run the data's tokenizer is checked against the model's, the objective's extra-token rows
  are initialised, and the heads export_hf.py wrote beside the model load.
- `FrozenCompanion`: a frozen network built from a project checkpoint (a teacher, a reverse LM) that an objective
  holds as a submodule: always in eval mode, `requires_grad=False` (so outside the optimizer and outside DDP's
  gradient buckets, while DDP still broadcasts it and `.to()` moves it), and absent from the owner's state dict:
  a checkpoint stores its path and the SHA-256 of its weights (`companion_records`), and loading a checkpoint
  whose companion no longer hashes the same is an error (`check_companions`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import pathlib
import pickle
import re
import sys

import torch
from torch import nn


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the plain types the project's checkpoints are made of."""


def _allowlist() -> list:
    from lightning.fabric.utilities.data import AttributeDict

    from objectives.training.optim import WarmupCosine

    def classes(module, base):
        return [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, base)]

    return [functools.partial, pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath, AttributeDict, WarmupCosine,
            *classes(torch.optim, torch.optim.Optimizer),
            *classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)]


SAFE_GLOBALS = _allowlist()
# Lightning's own loads (resume with --ckpt_path, validate/test --ckpt_path) use torch's weights_only default, which
# is True: register the same allowlist for them
torch.serialization.add_safe_globals(SAFE_GLOBALS)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint's dict, unpickled with `weights_only=True` and the project's allowlist; anything else is
    refused with `UnsafeCheckpointError` naming what it would have had to build."""
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: give the path of a .ckpt file train.py wrote "
                                f"(runs/<name>/.../checkpoints/last.ckpt)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = set(re.findall(r"GLOBAL ([\w.]+)", str(error)))
        try:  # every global the file names (read from the pickle's opcodes, nothing built), less the allowed
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
            found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except Exception:
            pass
        what = f" ({', '.join(sorted(found))})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} was refused: it holds objects outside the plain types of the project's checkpoints{what}, and "
            f"unpickling them could run code. Nothing in it was built. Load only checkpoints written by train.py; "
            f"if you wrote this file yourself and trust it, save its state dict and hyperparameters as plain "
            f"tensors, numbers and strings.") from None
    except Exception as error:  # torch's words for a truncated or corrupted file ("internal miniz error") are cryptic
        raise ValueError(f"checkpoint {path} cannot be read: it is truncated, corrupted or not a checkpoint "
                         f"({type(error).__name__}: {error}). Use another checkpoint of the run") from None


def checkpoint_class(checkpoint: dict, path="the checkpoint") -> type:
    """The objective class a checkpoint was trained as (train.py records it as `_class_path`)."""
    from lightning import LightningModule
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path", "objectives.training.base.Objective")
    module, _, name = class_path.rpartition(".")
    # the class is looked up in the project's objectives, or in a module the running program has already imported
    # (a user's or a test's objective): a checkpoint never makes the loader import anything else
    known = module.split(".")[0] == "objectives" or module in sys.modules
    cls = getattr(importlib.import_module(module), name, None) if known else None
    # an objective by what it offers (this module sits below objectives/training/base.py and does not import it)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule) and all(
            callable(getattr(cls, method, None)) for method in ("loss", "generate", "start_decoding"))):
        raise ValueError(f"{path} names {class_path}, which is not an objective of this project")
    return cls


def load_objective(path, map_location="cpu", checkpoint: dict | None = None):
    """The objective stored in a project checkpoint, weights loaded, in eval mode (the checkpoint read safely)."""
    checkpoint = load_checkpoint(path, map_location) if checkpoint is None else checkpoint
    cls = checkpoint_class(checkpoint, path)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return model.eval()


def checkpoint_tokenizer(checkpoint: dict) -> str | None:
    """The serialised tokenizer a project datamodule stores in its checkpoint state, if any."""
    return next((state["tokenizer"] for state in checkpoint.values()
                 if isinstance(state, dict) and isinstance(state.get("tokenizer"), str)), None)


# --- warm start ---------------------------------------------------------------------------------------------------
def warm_start(model, path, datamodule=None) -> dict:
    """Load the weights of the project checkpoint `path` into `model` (an `Objective`) for a new run.

    The data vocabulary must be the checkpoint's (same size; same tokenizer where the datamodule keeps one). The
    embedding's first `vocab_size` rows load; rows for the model's `extra_tokens` are copied from the token named
    by `model.extra_token_sources()` or keep their fresh init; the checkpoint's own extra rows carry over only into
    an objective of the same class. Every other tensor of the same name and shape loads; tensors only the model has
    keep their init ("added"); tensors only the checkpoint has are "left out". A tensor of the same name and another
    shape is an error (a different trunk). Optimizer, schedule and step are not read: the run starts fresh.
    Returns the report (also printed by `format_report`).
    """
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} has no state_dict: it is not a checkpoint written by the Lightning Trainer")
    hparams = checkpoint.get("hyper_parameters", {})
    own = model.state_dict()
    report = {"path": str(path), "class_path": hparams.get("_class_path", "?"), "step": checkpoint.get("global_step"),
              "loaded": [], "added": [], "left_out": [], "new_rows": []}

    saved_vocab = int(hparams.get("vocab_size", saved["embed.weight"].shape[0]))
    if saved_vocab != model.vocab_size:
        raise ValueError(
            f"init_from {path}: the checkpoint's vocabulary has {saved_vocab} tokens but this model's has "
            f"{model.vocab_size}: warm-start with the data and tokenizer the checkpoint was trained with")
    tokenizer = checkpoint_tokenizer(checkpoint)
    current = (datamodule.state_dict() or {}).get("tokenizer") if hasattr(datamodule, "state_dict") else None
    if tokenizer is not None and isinstance(current, str) and current != tokenizer:
        raise ValueError(f"init_from {path}: the checkpoint's tokenizer differs from this run's datamodule's "
                         f"(same size, other tokens): warm-start with the data the checkpoint was trained with")

    same_class = report["class_path"].rsplit(".", 1)[-1] == type(model).__name__
    mismatched = []
    with torch.no_grad():
        for name, tensor in own.items():
            if name == "embed.weight":
                continue
            if name not in saved:
                report["added"].append(name)
            elif saved[name].shape != tensor.shape:
                mismatched.append(f"{name}: checkpoint {tuple(saved[name].shape)}, model {tuple(tensor.shape)}")
            else:
                tensor.copy_(saved[name])
                report["loaded"].append(name)
        if mismatched:
            raise ValueError(f"init_from {path}: tensors of another shape (a different trunk or head size?): "
                             f"{'; '.join(mismatched[:5])}: warm-start into the checkpoint's trunk configuration")
        report["left_out"] = [n for n in saved if n not in own]
        embed, saved_embed = own["embed.weight"], saved["embed.weight"].to(own["embed.weight"].dtype)
        V = model.vocab_size
        embed[:V].copy_(saved_embed[:V])
        report["loaded"].append(f"embed.weight[:{V}]")
        carried = min(saved_embed.shape[0], embed.shape[0]) - V if same_class else 0
        if carried > 0:
            embed[V:V + carried].copy_(saved_embed[V:V + carried])
            report["loaded"].append(f"embed.weight[{V}:{V + carried}]")
        if saved_embed.shape[0] - V > max(carried, 0):
            report["left_out"].append(f"embed.weight[{V + max(carried, 0)}:{saved_embed.shape[0]}] "
                                      f"({report['class_path']}'s own special tokens)")
        sources = list(model.extra_token_sources())
        if len(sources) != model.extra_tokens:
            raise ValueError(f"{type(model).__name__}.extra_token_sources() gives {len(sources)} sources for "
                             f"{model.extra_tokens} extra tokens: give one per extra token (None: the usual init)")
        for i, source in enumerate(sources[max(carried, 0):], start=max(carried, 0)):
            if source is not None:
                if not 0 <= source < V:
                    raise ValueError(f"extra token {i} is to be initialised from token {source}, which is not in the "
                                     f"vocabulary of {V} tokens")
                embed[V + i].copy_(embed[source])
            report["new_rows"].append((V + i, source))
    return report


def format_report(report: dict) -> str:
    def names(items):  # grouped by top-level module: "heads.* (19 tensors), sampler.weight"
        groups: dict[str, list[str]] = {}
        for item in items:
            groups.setdefault(item.split(".")[0], []).append(item)
        return ", ".join(g[0] if len(g) == 1 else f"{k}.* ({len(g)} tensors)" for k, g in groups.items()) or "none"

    lines = [f"warm start from {report['path']} ({report['class_path']}, trained {report['step']} steps); "
             f"optimizer, schedule and step start fresh",
             f"  loaded: {len(report['loaded'])} tensors",
             f"  added (fresh init): {names(report['added'])}"]
    if report["new_rows"]:
        rows = [f"row {row} " + ("copied from token " + str(src) if src is not None else "usual init")
                for row, src in report["new_rows"]]
        lines.append(f"  new special-token embedding rows: {', '.join(rows)}")
    lines.append(f"  left out (in the checkpoint, not in this model): {names(report['left_out'])}")
    return "\n".join(lines)


# --- a pretrained trunk's embedding, output head and heads ----------------------------------------------------------
def start_from_pretrained(model) -> dict | None:
    """The first half of a pretrained warm start, run by `Objective.__init__`: where the trunk brings a pretrained
    model (`take_pretrained_embeddings()`, `models.HFTrunk`), its input embedding goes into `model.embed` and its
    output head into the untied unembedding `model.lm_head` (made by the objective where the trunk says
    `tied_embeddings` is false; a tied model's head is its embedding). Returns the report, None for other trunks.

    Rows: the first min(rows, model's rows) load, the data's vocabulary and then the family's extra tokens (the
    model's rows past its tokenizer, or a family's exported special tokens; `finish_pretrained_start` initialises
    the extra ones afresh at setup). Data tokens past the model's rows (an end-of-text token the datamodule adds
    to a tokenizer without one) keep their fresh init. With the trunk frozen (`freeze_trunk`) the embedding and
    head freeze too, unless the objective has rows the model lacks (then they train, and the report says so).
    """
    take = getattr(model.trunk, "take_pretrained_embeddings", None)
    handed = take() if callable(take) else None
    if handed is None:
        return None
    embedding, head = handed
    name = type(model).__name__
    own = [("embed.weight", model.embed.weight)]
    lm_head = model._modules.get("lm_head")
    if (head is None) != (lm_head is None):
        raise ValueError(f"{name}: the model's output head is {'tied to' if head is None else 'separate from'} its "
                         f"embedding but the objective's unembedding is {'not ' if head is None else ''}tied")
    if lm_head is not None:
        own.append(("lm_head.weight", lm_head.weight))
    width = model.embed.weight.shape[1]
    if embedding.shape[1] != width:
        raise ValueError(f"{name} embeds tokens at width {width}, the pretrained model at {embedding.shape[1]}: its "
                         f"embedding cannot be loaded (a family that embeds at its own width cannot start from it)")
    rows, available = model.embed.weight.shape[0], embedding.shape[0]
    n = min(rows, available)
    report = {"path": str(getattr(model.trunk, "pretrained", "?")), "loaded": [], "new_rows": [], "frozen": False,
              "tied": head is None, "model_rows": available, "finished": False}
    with torch.no_grad():
        for (label, target), source in zip(own, (embedding, head)):
            target[:n].copy_(source[:n])
            report["loaded"].append(f"{label}[:{n}]")
    report["new_rows"] = list(range(n, model.vocab_size))  # data tokens the model has no row for: fresh init
    if getattr(model.trunk, "freeze_trunk", False):
        if model.vocab_size <= available and not model.extra_tokens:
            for _, target in own:
                target.requires_grad_(False)
            report["frozen"] = True
        else:
            report["note"] = (f"the trunk is frozen but the embedding and unembedding train: the objective has "
                              f"{model.vocab_size + model.extra_tokens - min(model.vocab_size, available)} rows "
                              f"the model lacks (new tokens), which must learn")
    return report


def finish_pretrained_start(model, datamodule=None) -> dict | None:
    """The second half of a pretrained warm start (`start_from_pretrained`), once, at setup of a new run (or by
    hand before training): the data's tokenizer must give the model's tokens the model's ids (where the model has
    a `tokenizer.json` and the datamodule keeps a tokenizer); the family's extra-token rows are initialised from
    `extra_token_sources()`, unless the heads file says the model was exported from this very family (its rows are
    then that family's trained tokens); and the tensors of the heads file export_hf.py wrote beside the model
    (`pretrained_heads()`) load by name: a tensor of the same name and another shape is an error, tensors only the
    file has are left out, the objective's own (heads of a family the file does not hold) keep their init.
    Returns the report (`model.pretrained_report`, completed), None for other trunks."""
    report = getattr(model, "pretrained_report", None)
    if report is None or report["finished"]:
        return report
    trunk, name = model.trunk, type(model).__name__
    tokenizer = (datamodule.state_dict() or {}).get("tokenizer") if hasattr(datamodule, "state_dict") else None
    vocab = trunk.tokenizer_vocab() if isinstance(tokenizer, str) and hasattr(trunk, "tokenizer_vocab") else None
    if vocab is not None:
        from tokenizers import Tokenizer
        data = Tokenizer.from_str(tokenizer).get_vocab(with_added_tokens=True)
        wrong = sorted((i, t) for t, i in vocab.items() if i < model.vocab_size and data.get(t) != i)
        if wrong:
            shown = ", ".join(f"{t!r} is {i} in the model, {data.get(t)} in the data" for i, t in wrong[:3])
            raise ValueError(f"the data's tokenizer is not the pretrained model's ({len(wrong)} of its tokens have "
                             f"other ids: {shown}): give the data the model's own, --data.init_args.tokenizer_path "
                             f"{report['path']}/tokenizer.json (for a hub id, the tokenizer.json of its repository)")
    loaded = trunk.pretrained_heads() if hasattr(trunk, "pretrained_heads") else None
    tensors, metadata = loaded if loaded is not None else ({}, {})
    same_family = metadata.get("class_path", "").rsplit(".", 1)[-1] == name
    V = model.vocab_size
    carried = max(min(report["model_rows"], V + model.extra_tokens) - V, 0) if same_family else 0
    sources = list(model.extra_token_sources())
    if len(sources) != model.extra_tokens:
        raise ValueError(f"{name}.extra_token_sources() gives {len(sources)} sources for {model.extra_tokens} extra "
                         f"tokens: give one per extra token (None: the usual init)")
    matrices = [model.embed.weight] + ([model.lm_head.weight] if "lm_head" in model._modules else [])
    own = model.state_dict()
    mismatched, report["heads_loaded"], report["heads_left_out"] = [], [], []
    with torch.no_grad():
        for i, source in enumerate(sources[carried:], start=carried):
            if source is not None and not 0 <= source < V:
                raise ValueError(f"extra token {i} is to be initialised from token {source}, which is not in the "
                                 f"vocabulary of {V} tokens")
            for matrix in matrices:
                if source is not None:
                    matrix[V + i].copy_(matrix[source])
                else:
                    nn.init.normal_(matrix[V + i], std=0.02)
            report["new_rows"].append(V + i)
        for key, tensor in tensors.items():
            if key not in own or key.startswith("trunk.") or key in ("embed.weight", "lm_head.weight"):
                report["heads_left_out"].append(key)
            elif own[key].shape != tensor.shape:
                mismatched.append(f"{key}: file {tuple(tensor.shape)}, objective {tuple(own[key].shape)}")
            else:
                own[key].copy_(tensor)
                report["heads_loaded"].append(key)
    if mismatched:
        raise ValueError(f"the heads beside {report['path']} ({metadata.get('class_path', '?')}) do not fit {name}: "
                         f"{'; '.join(mismatched[:5])}: build the objective with the exported one's settings "
                         f"(its hyperparameters are in the file's metadata)")
    report["heads_from"] = metadata.get("class_path") if tensors else None
    report["finished"] = True
    return report


def format_pretrained_report(report: dict) -> str:
    rows = report["new_rows"]
    lines = [f"pretrained start from {report['path']}: embedding and "
             f"{'tied unembedding' if report['tied'] else 'untied output head'} loaded ({report['loaded'][0]}"
             f"{', frozen' if report['frozen'] else ''})",
             f"  new rows (not in the model): {', '.join(map(str, rows)) if rows else 'none'}"]
    if report.get("note"):
        lines.append(f"  {report['note']}")
    if report.get("heads_from"):
        lines.append(f"  heads from {report['heads_from']}: {len(report['heads_loaded'])} tensors loaded, "
                     f"{len(report['heads_left_out'])} left out (not in this objective)")
    return "\n".join(lines)


# --- frozen companions --------------------------------------------------------------------------------------------
def weights_sha256(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


class FrozenCompanion(nn.Module):
    """A frozen network an objective holds beside the one it trains: `self.teacher = FrozenCompanion(path)`.

    `.model` is the objective stored at `path` (its own class, weights and `generate`). It stays in eval mode when
    the owner is put in train mode, its parameters do not require gradients (so no optimizer and no DDP gradient
    bucket sees them; DDP still broadcasts them, `.to()` moves them), and the owner's state dict leaves it out: the
    owner's checkpoint records `path` and `sha256` instead (see `Objective.on_save_checkpoint`).
    """

    def __init__(self, path: str):
        super().__init__()
        checkpoint = load_checkpoint(path)
        self.path = str(path)
        self.model = load_objective(path, checkpoint=checkpoint)
        self.sha256 = weights_sha256(self.model.state_dict())
        self.model.requires_grad_(False)
        super().train(False)
        self.register_state_dict_post_hook(_drop_own_entries)
        self.register_load_state_dict_pre_hook(_fill_own_entries)

    def train(self, mode: bool = True) -> "FrozenCompanion":
        return super().train(False)

    def forward(self, *args, **kwargs):
        raise TypeError("a FrozenCompanion is not called directly: use its .model (an objective) and its methods")


def _drop_own_entries(module: FrozenCompanion, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in [n for n in state_dict if n.startswith(prefix)]:
        del state_dict[name]


def _fill_own_entries(module: FrozenCompanion, state_dict: dict, prefix: str, *args) -> None:
    # the owner's checkpoint has no companion tensors: load the companion's own, so strict loading finds them
    for name, tensor in module.model.state_dict().items():
        state_dict[prefix + "model." + name] = tensor


def companions(model: nn.Module) -> dict[str, FrozenCompanion]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FrozenCompanion)}


def companion_records(model: nn.Module) -> dict[str, dict]:
    """What a checkpoint stores of each companion: {module name: {"path", "sha256"}}."""
    return {name: {"path": m.path, "sha256": m.sha256} for name, m in companions(model).items()}


def check_companions(model: nn.Module, records: dict[str, dict]) -> None:
    """A checkpoint's companion records against the companions the model has built: a different hash is an error."""
    for name, companion in companions(model).items():
        saved = records.get(name)
        if saved is not None and saved["sha256"] != companion.sha256:
            raise ValueError(
                f"the companion {name!r} built from {companion.path} hashes to {companion.sha256[:12]}..., but the "
                f"checkpoint was trained with weights hashing to {saved['sha256'][:12]}... (from {saved['path']}): "
                f"the file changed since; give the original companion checkpoint")


def load_with_tokenizer(ckpt_path: str):
    """(the objective stored in a checkpoint, in eval mode with its own class and hyperparameters, and its
    `tokenizers.Tokenizer`): what generate.py and the future lens load."""
    from tokenizers import Tokenizer
    checkpoint = load_checkpoint(ckpt_path)
    tokenizer = checkpoint_tokenizer(checkpoint)
    if tokenizer is None:
        raise ValueError(f"{ckpt_path} carries no tokenizer: it was not written by train.py's datamodules")
    return load_objective(ckpt_path, checkpoint=checkpoint), Tokenizer.from_str(tokenizer)
