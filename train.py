"""The command line: `python train.py fit --config configs/quickstart.yaml [--model ...] [--data ...]`."""
from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

import datamodules
import models
import objectives

from objectives.base import Objective
from objectives.runtime import auto_precision

BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.yaml")


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


class BeyondNTPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for name in ("vocab_size", "bytes_per_token", "eos_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if config.trainer.precision is None:
            config.trainer.precision = auto_precision()

    def after_fit(self) -> None:
        """Print the final next-token loss beside the loss of a context-free (unigram) model of the val split."""
        metrics = self.trainer.callback_metrics
        unigram = getattr(self.datamodule, "unigram_entropy", None)
        for name in ("val/ntp_loss", "val/nll_bound"):
            if name in metrics and unigram is not None and self.trainer.is_global_zero:
                print(f"final {name} {float(metrics[name]):.4f} nats/token; "
                      f"unigram entropy of the val split {unigram:.4f} nats/token")


def main(args=None) -> BeyondNTPCLI:
    return BeyondNTPCLI(
        Objective, None, subclass_mode_model=True, subclass_mode_data=True, parser_class=ArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf",
                       **{sub: {"default_config_files": [BASE_CONFIG]} for sub in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args,
    )


if __name__ == "__main__":
    main()
