"""The command line: `python train.py fit --config configs/quickstart.yaml [--model ...] [--data ...]`."""
from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from datamodules.text import TextDataModule  # noqa: F401  (importable class paths for the configs)
from objectives.base import Objective
from objectives.runtime import auto_precision

BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.yaml")


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
        Objective, None, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf",
                       **{sub: {"default_config_files": [BASE_CONFIG]} for sub in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args,
    )


if __name__ == "__main__":
    main()
