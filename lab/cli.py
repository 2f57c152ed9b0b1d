"""The project's Lightning CLI, which `train.py` runs: `python train.py fit --config configs/quickstart.yaml
[--model ...] [--data ...]`. It links what the objective needs from the data, names the run after what it is,
picks the precision the hardware computes natively, checks a config before any data is prepared, gives the data
the tokenizer of a pretrained model's local folder where none is given, and prints the final figures of a fit.

A user's mistake (a bad flag or class path, a missing file, a sequence longer than the trunk, an unreadable
checkpoint) prints its message alone; `BEYOND_NTP_TRACEBACK=1` prints the usage text and the traceback too."""
from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

import datamodules
import models
import objectives
from objectives.training import metrics as M
from objectives.training.base import Objective
from objectives.training.callbacks import auto_precision
from objectives.training.checkpoints import UnsafeCheckpointError, load_checkpoint

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.yaml")
SHOW_TRACEBACK = "BEYOND_NTP_TRACEBACK"
# the logger names of base.yaml and quickstart.yaml, which every swapped piece shares: a run under one of them is
# named after what it is (quickstart/path_star-MultiTokenPrediction-Mamba); an experiment config's own name stays
GENERIC_RUN_NAMES = ("default", "quickstart")
HEADLINE = (M.VAL_LOSS, M.VAL_NTP_LOSS, M.VAL_NLL_BOUND, M.VAL_BPB, M.VAL_ACCURACY)
# what a user's mistake raises (the project's messages name the fix); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, UnsafeCheckpointError)


def known_classes() -> str:
    """The class paths a config can name, for error messages."""
    def exported(package, base):
        return [f"{package.__name__}.{n}" for n in package.__all__
                if isinstance(getattr(package, n), type) and issubclass(getattr(package, n), base)]
    return (f"objectives (--model): {', '.join(exported(objectives, Objective))}; "
            f"trunks (--model.trunk): {', '.join(exported(models, nn.Module))}; "
            f"data (--data): {', '.join(exported(datamodules, L.LightningDataModule))}")


class ArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        if "class_path" in message or "import path" in message:
            message += f"\nKnown classes: {known_classes()}"
        super().error(message, ex)

    def print_usage(self, file=None) -> None:
        """The usage text (dozens of lines) only on request: an error prints its message and a --help tip."""
        if os.environ.get(SHOW_TRACEBACK):
            super().print_usage(file)


def run_name(config) -> str:
    """What a run is, for its log folder: data-objective-trunk (e.g. path_star-MultiTokenPrediction-Mamba)."""
    def short(class_path) -> str:
        return str(class_path or "none").rsplit(".", 1)[-1]
    data = config.data.init_args if config.get("data") else {}
    what = data.get("task") or data.get("source") or short(config.data.class_path if config.get("data") else None)
    trunk = config.model.init_args.get("trunk")
    return f"{what}-{short(config.model.class_path)}-{short(trunk.class_path if trunk else None)}"


class BeyondNTPCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        # a logger named on the command line keeps its name; otherwise the run is named after what it is
        self.logger_named = not isinstance(given, list) or any(
            str(a).split("=")[0] in ("--trainer.logger", "--trainer.logger.init_args.name",
                                     "--trainer.logger.init_args.version") for a in given)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("vocab_size", "bytes_per_token", "eos_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        # where the data has them: the ids of its special tokens (LaDiR's <step> and <ans>, the padding) and the
        # task's own answer check (Countdown's), so that no objective reads them off trainer.datamodule
        parser.link_arguments("data", "model.init_args.special_ids", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "special_ids", None))
        parser.link_arguments("data", "model.init_args.answer_check", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "check_answer", None))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if config.trainer.precision is None:
            config.trainer.precision = auto_precision()
        logger = config.trainer.get("logger")
        if self.subcommand == "fit" and not self.logger_named and logger and hasattr(logger, "init_args"):
            if logger.init_args.get("name") in GENERIC_RUN_NAMES and logger.init_args.get("version") is None:
                logger.init_args.name = f"{logger.init_args.name}/{run_name(config)}"
        check_fits_the_trunk(config)
        filled = tokenizer_from_pretrained(config)
        if filled:
            rank_zero_only(print)(f"data.init_args.tokenizer_path: {filled} (the tokenizer of the pretrained model's "
                                  f"folder, model.init_args.trunk.init_args.pretrained)")
        strategy = str(config.trainer.get("strategy") or "")
        if "fsdp" in strategy.lower() and config.trainer.get("accelerator") in ("cpu", "auto"):
            import torch
            if not torch.cuda.is_available():
                raise ValueError("FSDP runs on GPUs only (Lightning has no CPU FSDP): on CPUs scale out with "
                                 "--trainer.strategy ddp, or drop --trainer.strategy")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads --ckpt_path's hyperparameters here, with torch's raw errors for a missing or corrupted
        file: `load_checkpoint` names the file and the problem first."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        """Validate once more where training went on after the last validation (or none ran), then print the
        headline figures, the next-token loss beside that of a context-free (unigram) model of the val split."""
        trainer, model = self.trainer, self.model
        if (trainer.limit_val_batches and trainer.global_step > 0 and not trainer.interrupted
                and getattr(model, "validated_at_step", None) != trainer.global_step):
            training_figures = dict(trainer.callback_metrics)  # validate() starts from an empty dict
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
            for name, value in training_figures.items():
                trainer.callback_metrics.setdefault(name, value)
        metrics = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        shown = [f"{name} {float(metrics[name]):.4f}" for name in HEADLINE if name in metrics]
        line = f"final (step {trainer.global_step}): " + (", ".join(shown) or "no validation figures")
        unigram = getattr(self.datamodule, "unigram_entropy", None)
        if unigram is not None and any(name in metrics for name in (M.VAL_NTP_LOSS, M.VAL_NLL_BOUND)):
            line += f"; unigram entropy of the val split {unigram:.4f} nats/token"
        print(line)


def check_fits_the_trunk(config) -> None:
    """A text window longer than the trunk's positions fails here, before any data is prepared."""
    data = config.data.init_args if config.get("data") else {}
    trunk = config.model.init_args.get("trunk") if config.get("model") else None
    limit = trunk.init_args.get("max_seq_len") if trunk is not None and hasattr(trunk, "init_args") else None
    length = data.get("seq_len")
    if isinstance(length, int) and isinstance(limit, int) and length > limit:
        raise ValueError(f"data.init_args.seq_len {length} is longer than the trunk's max_seq_len {limit}: raise "
                         f"model.init_args.trunk.init_args.max_seq_len or lower data.init_args.seq_len")


def tokenizer_from_pretrained(config) -> str | None:
    """Where the trunk is a pretrained model in a local folder that holds a `tokenizer.json` (a save_pretrained or
    export_hf.py folder) and the data takes a `tokenizer_path` that was not given, set it to that file: the data must
    tokenize as the model does. Returns the path set, else None. A hub id is left alone (nothing is downloaded
    here): its tokenizer.json is given with --data.init_args.tokenizer_path."""
    trunk = config.model.init_args.get("trunk") if config.get("model") else None
    data = config.data.init_args if config.get("data") else None
    pretrained = trunk.init_args.get("pretrained") if trunk is not None and hasattr(trunk, "init_args") else None
    if not pretrained or data is None or "tokenizer_path" not in data or data.get("tokenizer_path"):
        return None
    if data.get("task") not in (None, "file"):  # a generated reasoning task: its own word-level vocabulary
        return None
    path = os.path.join(str(pretrained), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    data.tokenizer_path = path
    return path


def main(args=None) -> BeyondNTPCLI:
    return BeyondNTPCLI(
        Objective, None, subclass_mode_model=True, subclass_mode_data=True, parser_class=ArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf",
                       **{sub: {"default_config_files": [BASE_CONFIG]} for sub in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args,
    )


def run_from_the_shell(command=lambda: main()) -> None:
    """Run a command-line entry point; a user's mistake prints its message alone (the first of the project's own
    errors in the chain: jsonargparse wraps an error raised while building a class in its own text)."""
    try:
        command()
    except USER_ERRORS as error:
        if os.environ.get(SHOW_TRACEBACK):
            raise
        while error.__cause__ is not None and isinstance(error.__cause__, USER_ERRORS):
            error = error.__cause__
        sys.stderr.write(f"error: {error}\n({SHOW_TRACEBACK}=1 shows the traceback)\n")
        sys.exit(1)
