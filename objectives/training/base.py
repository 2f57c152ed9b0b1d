"""The base every objective subclasses: embedding and tied unembedding around an injected trunk (untied where a
pretrained model brings an output head of its own), optimizer and schedule, the training and validation steps
with the shared metrics, answer scoring on reasoning data, warm starts and checkpoints. Two tiers build on it:
`CausalObjective` (`objectives/training/causal.py`: summaries, left-to-right and speculative decoding) and
`DenoisingObjective` (`objectives/training/denoising.py`).

A family implements `loss(batch) -> dict` (at least "loss"; causal families also "ntp_nll" and "ntp_tokens", the
summed next-token NLL and its token count; diffusion families "nll_bound" and "bound_tokens", the summed NELBO and
its token count; optionally "ntp_bytes"/"bound_bytes" and "metrics", name -> (value, weight)) and, where it
generates differently from its tier, `generate`.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, TypedDict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from models.layers import linear
from objectives.training import metrics as M
from objectives.decoding.scoring import AnswerScorer
from objectives.training.checkpoints import (check_companions, companion_records, companions, finish_pretrained_start,
                                             format_pretrained_report, format_report, start_from_pretrained,
                                             warm_start)
from objectives.training.losses import CHUNK_MIB, chunk_positions
from objectives.training.optim import WarmupCosine, decay_groups


class LossOutput(TypedDict, total=False):
    """What `Objective.loss(batch)` returns; only `loss` is required. Counts and sums are over the batch."""
    loss: torch.Tensor  # the scalar that is optimised
    ntp_nll: torch.Tensor  # summed next-token NLL (nats) of the positions the tier's likelihood counts
    ntp_tokens: torch.Tensor  # how many tokens that sum covers
    ntp_bytes: int  # their UTF-8 bytes, where the family counts them itself (else from `token_bytes`)
    nll_bound: torch.Tensor  # a diffusion family's summed NELBO (nats), an upper bound on the NLL
    bound_tokens: torch.Tensor
    bound_bytes: int
    metrics: dict[str, tuple[torch.Tensor | float, int]]  # the family's own figures: tag -> (value, weight)


class Objective(L.LightningModule):
    """Base LightningModule of every family.

    Args:
        trunk: the sequence mixer (a `models` class, given by class_path).
        vocab_size: tokens in the vocabulary (linked from the datamodule by train.py).
        bytes_per_token: UTF-8 bytes per token of the val split (linked from the datamodule), kept in the
            hyperparameters; val/bpb counts the bytes of each batch's own counted tokens (`token_bytes`).
        eos_id: the end-of-sequence token (linked from the datamodule): generation of a row stops there.
        optimizer: optimizer factory, given decay and no-decay parameter groups.
        lr_scheduler: schedule factory (stepped every optimizer step).
        summaries: auxiliary losses on the trunk's hidden states (future-summary mixins), causal families only.
        compile: compile the trunk with `torch.compile`.
        ce_chunk_size: MiB of fp32 logits per chunk of the chunked cross-entropy (`objectives/training/losses.py`): a budget
            in bytes, so positions per chunk = ce_chunk_size MiB / (4 bytes x V), the same memory at any vocabulary.
        eval_examples: val examples per validation whose generated answer is scored (reasoning data).
        sample_tokens: tokens of a greedy sample written to TensorBoard each validation (text data).
        check_finite: stop at the first non-finite training loss, naming the step. It raises in the step itself,
            before the optimizer applies it, so every checkpoint holds finite weights; Lightning's
            EarlyStopping(check_finite=True) looks at a monitored metric only at validation or epoch end.
        special_ids: the data's special tokens by role ("pad", "eos", "step", "answer", "dummy"; linked from the
            datamodule by train.py where it has them), for the families that read them (LaDiR).
        answer_check: the task's own verdict on a generated answer, ``check_answer(prompt_ids, generated_ids) ->
            bool | None`` (linked from the datamodule; Countdown's counts any valid solution); else exact match.
        init_from: a project checkpoint whose weights a new fit starts from (optimizer, schedule and step fresh;
            rows for this family's extra tokens initialised by `extra_token_sources`); `--ckpt_path` resumes instead.
    """

    # the family's own figure in compare.py's report, beside the shared ones: (a metric tag, or "hparams.<name>"
    # for a setting, and its label); reasoning runs without one show val/answer_tokens
    headline_metric: tuple[str, str] | None = None

    required_masks: tuple[str, ...] = ("causal",)
    accepts_summaries = False  # future summaries attach to causal families (`CausalObjective`)
    extra_tokens = 0  # embedding rows a family adds after the data's vocabulary (MDLM's mask token)
    # positions beyond a reasoning batch's length that answer scoring lets a family generate: left-to-right
    # decoding may run on; a denoising family fills a canvas of exactly the length it was trained on
    generation_slack = 8
    # what answer scoring may ask of `generate` (capabilities declared, not read off its signature): a batch of
    # right-padded prompts of different lengths (`prompt_lengths`), and max_new_tokens as a [B] tensor of budgets
    generates_ragged = True
    takes_row_budgets = True

    def __init__(self, trunk: nn.Module, vocab_size: int = 0, bytes_per_token: float = 0.0, eos_id: int | None = None,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable = WarmupCosine,
                 summaries: list[nn.Module] | None = None, compile: bool = False, ce_chunk_size: float = CHUNK_MIB,
                 eval_examples: int = 64, sample_tokens: int = 48, check_finite: bool = True,
                 init_from: str | None = None, special_ids: dict[str, int] | None = None,
                 answer_check: Callable | None = None):
        super().__init__()
        with warnings.catch_warnings():  # modules passed by hand live in the state dict, not in the hparams
            warnings.simplefilter("ignore")
            self.save_hyperparameters()
        self.hparams.pop("answer_check", None)  # behaviour, not a setting: the data links it again
        for name in ("trunk", "summaries"):  # through the CLI these are config dicts and stay
            value = self.hparams.get(name)
            if isinstance(value, nn.Module) or (isinstance(value, list) and any(isinstance(v, nn.Module) for v in value)):
                del self.hparams[name]
        if vocab_size <= 0:
            raise ValueError("model.vocab_size is not set: train.py links it from data.vocab_size; "
                             "pass vocab_size= when building an objective by hand")
        chunk_positions(ce_chunk_size, vocab_size)  # a bad budget fails here, naming ce_chunk_size
        missing = [m for m in self.required_masks if m not in getattr(trunk, "supported_masks", ())]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the {'/'.join(missing)} attention mask, which the "
                f"{type(trunk).__name__} trunk cannot serve (it supports {tuple(trunk.supported_masks)}): "
                f"use a transformer trunk, e.g. --model.trunk configs/models/transformer-tiny.yaml")
        if summaries and not self.accepts_summaries:
            raise ValueError(f"{', '.join(type(s).__name__ for s in summaries)} cannot attach to {type(self).__name__}: "
                             f"future summaries need a causal objective (next-token or multi-token prediction); "
                             f"drop model.init_args.summaries or pick a causal family")
        self.trunk = trunk
        self.vocab_size, self.bytes_per_token, self.eos_id = vocab_size, bytes_per_token, eos_id
        self.embed = nn.Embedding(vocab_size + self.extra_tokens, self.embedding_width())
        nn.init.normal_(self.embed.weight, std=0.02)
        if getattr(trunk, "tied_embeddings", True) is False:  # a pretrained model with an output head of its own
            self.lm_head = nn.Linear(self.embedding_width(), vocab_size + self.extra_tokens, bias=False)
            nn.init.normal_(self.lm_head.weight, std=0.02)
        # a trunk that brings a pretrained model (models.HFTrunk) hands over its embedding and head here; the rest
        # of that warm start (tokenizer check, extra-token rows, exported heads) runs at setup
        self.pretrained_report = start_from_pretrained(self)
        if self.pretrained_report is not None:  # weights loaded from a checkpoint supersede the rest of it
            self.register_load_state_dict_post_hook(_pretrained_start_superseded)
        self.summaries = nn.ModuleList(summaries or [])
        for summary in self.summaries:  # each summary makes its head at this objective's width and vocabulary
            summary.attach(self)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.special_ids = dict(special_ids or {})
        self.scorer = AnswerScorer(eval_examples, answer_check)

    # --- the pieces families compose -------------------------------------------------------------------------
    def embedding_width(self) -> int:
        """Width of the token embedding (and tied unembedding): the trunk's, unless a family embeds elsewhere."""
        return self.trunk.d_model

    @property
    def unembedding(self) -> torch.Tensor:
        """The output projection [V, D]: the input embedding (tied), or where a pretrained model has an output head
        of its own, the untied `lm_head`."""
        head = self._modules.get("lm_head")
        return self.embed.weight if head is None else head.weight

    def hidden(self, tokens: torch.Tensor, *, mask="causal", cache=None, **trunk_options) -> torch.Tensor:
        return self.trunk(self.embed(tokens), mask=mask, cache=cache, **trunk_options)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.unembedding)

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def likelihood_positions(self) -> slice:
        """The positions of `batch["tokens"]` whose tokens the comparable likelihood counts (for their UTF-8
        bytes): each tier says (`objectives/training/causal.py`, `objectives/training/denoising.py`)."""
        raise NotImplementedError

    # --- training and validation --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)["loss"]
        if self.hparams.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}: training stopped; checkpoints "
                f"written before this step are kept. Lower the learning rate or check the data.")
        self.log(M.TRAIN_LOSS, loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:  # a fit that trains on after its last validation gets one more (train.py)
            self.validated_at_step = self.trainer.global_step
        self.scorer.start_validation()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.loss(batch)
        n = int(batch["tokens"].shape[0])
        self.log(M.VAL_LOSS, out["loss"], batch_size=n, sync_dist=True)
        for nll, tokens, n_bytes, name in (("ntp_nll", "ntp_tokens", "ntp_bytes", M.VAL_NTP_LOSS),
                                           ("nll_bound", "bound_tokens", "bound_bytes", M.VAL_NLL_BOUND)):
            if nll in out:  # a summed NLL (next-token, or a diffusion family's NELBO) over out[tokens] tokens
                count = max(int(out[tokens]), 1)
                counted = out.get(n_bytes, M.counted_bytes(batch, self.likelihood_positions(), out[tokens]))
                self.log_likelihood(name, out[nll] / count, count, counted)
        for name, (value, weight) in out.get("metrics", {}).items():
            self.log(name, value, batch_size=max(int(weight), 1), sync_dist=True)
        if "answer" in batch and "prompt_len" in batch:
            self.score_answers(batch)
        elif batch_idx == 0 and self.hparams.sample_tokens > 0:
            self.sample_continuation(batch)

    def log_likelihood(self, name: str, nats_per_token: torch.Tensor, count: int, n_bytes: int | None = None) -> None:
        """Log a comparable likelihood figure (nats/token over `count` tokens) and the HParams metric, and, where
        the batch gives the UTF-8 bytes of exactly those tokens (`n_bytes`), bits per byte. Weighted by bytes,
        the epoch's val/bpb is sum(nats) / ln 2 / sum(bytes) over the same tokens."""
        self.log(name, nats_per_token, batch_size=count, sync_dist=True)
        self.log(M.HP_METRIC, nats_per_token, batch_size=count, sync_dist=True)
        if n_bytes:
            self.log(M.VAL_BPB, nats_per_token * count / math.log(2) / n_bytes, batch_size=n_bytes, sync_dist=True)

    # --- generation ---------------------------------------------------------------------------------------------
    def check_generation_length(self, total: int) -> None:
        limit = self.trunk.max_seq_len
        if total > limit:
            raise ValueError(f"prompt plus max_new_tokens is {total} positions, more than the trunk's max_seq_len "
                             f"{limit}: shorten the prompt or lower max_new_tokens")

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int | torch.Tensor, **options) -> torch.Tensor:
        """prompt [B, P] -> [B, P + max_new_tokens]: each tier and family declares its own options
        (`objectives/training/causal.py`, `objectives/training/denoising.py`)."""
        raise NotImplementedError

    def refuse_options(self, options: dict, how: str) -> None:
        """Fail naming the `generate` options this family does not have, rather than ignore them; an option given
        as None or False counts as not given. `how` says how the family generates instead."""
        given = sorted(name for name, value in options.items() if value is not None and value is not False)
        if given:
            raise ValueError(f"{type(self).__name__} {how}: it has no {', '.join(given)} option of generate")

    def pad_to(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        if ids.shape[1] >= length:
            return ids[:, :length]
        fill = self.eos_id if self.eos_id is not None else 0
        return F.pad(ids, (0, length - ids.shape[1]), value=fill)


    # --- scoring generated answers (reasoning data) ---------------------------------------------------------------
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Exact-match accuracy of the generated answers on the whole test split (reasoning data)."""
        if "answer" in batch and "prompt_len" in batch:
            self.score_answers(batch, stage="test")

    def score_answers(self, batch: dict, stage: str = "val") -> None:
        """{stage}/accuracy: exact match of the generated answer; {stage}/answer_tokens: tokens generated per
        question (objectives/decoding/scoring.py). Validation scores `eval_examples` questions; test scores all."""
        self.scorer.score(self, batch, stage)

    def sample_continuation(self, batch: dict) -> None:
        """A greedy continuation of the first val window's opening, for the TensorBoard text tab."""
        prompt = batch["tokens"][:1, :32]
        n = min(self.hparams.sample_tokens, self.trunk.max_seq_len - prompt.shape[1])
        generated = self.generate(prompt, n)[0, prompt.shape[1]:].tolist()
        self.scorer.examples = [(prompt[0].tolist(), generated, None)]

    @property
    def generated_examples(self) -> list[tuple[list[int], list[int], list[int] | None]]:
        """This validation's (prompt, generation, gold or None) examples, for TensorBoard's text tab."""
        return self.scorer.examples

    # --- optimisation, checkpoints, scaling -----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self))
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        # FSDP's shard units come from the strategy's auto_wrap_policy (configs/strategies/fsdp.yaml)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.trunk.compile()
            self._compiled = True

    def extra_token_sources(self) -> list[int | None]:
        """Per extra token (`extra_tokens`), the existing token whose embedding row a warm start copies into it
        (Coconut's special tokens start as an existing token), or None for the usual init."""
        return [None] * self.extra_tokens

    def finish_pretrained_start(self, datamodule=None) -> dict | None:
        """The rest of the warm start from a pretrained trunk (`objectives/training/checkpoints.py`), once: the
        data's tokenizer checked against the model's, the extra-token rows, the heads export_hf.py wrote beside the
        model. `setup` runs it for a new run; by hand, call it before training or decoding. The report, or None."""
        return finish_pretrained_start(self, datamodule)

    def setup(self, stage: str) -> None:
        # a pretrained trunk's warm start finishes for any new run (fit, validate, test), once; a warm start
        # (init_from) applies to a new fit, before the optimizer is built; a resumed fit (--ckpt_path) restores its
        # own weights instead
        pretrained = self.pretrained_report
        if pretrained is not None and not pretrained["finished"] and not self.trainer.ckpt_path:
            self.finish_pretrained_start(self.trainer.datamodule)
            if self.trainer.is_global_zero:
                print(format_pretrained_report(self.pretrained_report))
        if stage == "fit" and self.hparams.get("init_from") and not self.trainer.ckpt_path:
            self.warm_start_report = warm_start(self, self.hparams.init_from, self.trainer.datamodule)
            if self.trainer.is_global_zero:
                print(format_report(self.warm_start_report))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # frozen companions are left out of the state dict; their path and weight hash are kept instead
        if companions(self):
            checkpoint["companions"] = companion_records(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_companions(self, checkpoint.get("companions", {}))
        saved = checkpoint.get("state_dict", {}).get("embed.weight")
        if saved is not None and saved.shape[0] != self.embed.num_embeddings:
            raise ValueError(
                f"the checkpoint's vocabulary has {saved.shape[0] - self.extra_tokens} tokens but this model's has "
                f"{self.vocab_size}: "
                f"use the data and tokenizer the checkpoint was trained with, or start without --ckpt_path "
                f"(--model.init_args.init_from starts a new run from its weights, adding rows for new tokens)")

    def on_fit_start(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                params = dict(self.hparams)
                if self.trainer.datamodule is not None:
                    params.update({f"data.{k}": v for k, v in self.trainer.datamodule.hparams.items()})
                # what the HParams tab compares families by; val/bpb is the one metric every family shares
                params.update(family=type(self).__name__, trunk=type(self.trunk).__name__,
                              parameters=sum(p.numel() for p in self.parameters()),
                              seed=int(os.environ.get("PL_GLOBAL_SEED", -1)))
                declare_hparams(logger, params, bytes_known=self.hparams.bytes_per_token > 0)


def _pretrained_start_superseded(model: Objective, incompatible_keys) -> None:
    """A state dict loaded into an objective over a pretrained trunk (a checkpoint, a resume) holds its trained
    rows and heads: the pretrained start must not finish over them (`finish_pretrained_start` becomes a no-op)."""
    model.pretrained_report["finished"] = True


# the HParams table's hyperparameter columns, the same in every run (see declare_hparams)
HPARAMS_TABLE = ("family", "trunk", "parameters", "seed")


def declare_hparams(logger, params: dict, bytes_known: bool) -> None:
    """Write the run's hyperparameters for TensorBoard's HParams tab. The run's session records every
    hyperparameter; the table's columns (the "experiment" summary) are HPARAMS_TABLE and the metrics hp_metric,
    val/bpb where the data's tokens have UTF-8 bytes (the one figure every family shares), else val/accuracy
    (reasoning data), and tokens/s. TensorBoard takes the columns of the first run it finds with an experiment
    summary, so every run writes the same ones: with each run's own hyperparameters as columns, a comparison's
    table showed whichever run came first, sorted by name (`_class_path`, `_instantiator`, ...). Only hp_metric
    gets a placeholder point (NaN at step 0); Lightning's `log_hyperparams(params, metrics)` would log one for
    every column, a NaN val/bpb point in every run, and on data without bytes the only val/bpb point there is."""
    from lightning.fabric.utilities.logger import _flatten_dict
    from torch.utils.tensorboard.summary import hparams
    logger.log_hyperparams(params)  # hparams.yaml
    logger.log_metrics({M.HP_METRIC: float("nan")}, 0)
    metrics = {M.HP_METRIC: float("nan"), (M.VAL_BPB if bytes_known else M.VAL_ACCURACY): float("nan"),
               M.TOKENS_PER_SEC: float("nan")}
    flat = logger._sanitize_params(_flatten_dict(params))
    _, session_start, session_end = hparams(flat, metrics)
    table, _, _ = hparams({name: flat[name] for name in HPARAMS_TABLE}, metrics)
    writer = logger.experiment._get_file_writer()
    for summary in (table, session_start, session_end):
        writer.add_summary(summary, 0)
