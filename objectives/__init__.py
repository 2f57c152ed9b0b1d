"""Objectives: one LightningModule per family (the modules of this folder), all subclasses of
`objectives.training.base.Objective`; the machinery they share lives in `training/` and `decoding/`."""
import sys

from objectives.training.base import Objective
from objectives.coconut import Coconut
from objectives.diffusion_lm import DiffusionLM
from objectives.distill import SelfDistillation
from objectives.mdlm import MaskedDiffusion
from objectives.deepseek_mtp import DeepSeekMTP
from objectives.mtp import MultiTokenPrediction
from objectives.ladir import LaDiR
from objectives.ntp import NextTokenPrediction
from objectives.planning import PlanningTokens
from objectives.skeleton import SkeletonOfThought
from objectives.summaries import BagOfWordsSummary, ReverseLMSummary

__all__ = ["Objective", "Coconut", "NextTokenPrediction", "MultiTokenPrediction", "DeepSeekMTP", "MaskedDiffusion", "DiffusionLM",
           "SelfDistillation", "LaDiR", "PlanningTokens", "SkeletonOfThought", "BagOfWordsSummary", "ReverseLMSummary"]

# module paths of earlier releases that configs and scripts name (`objectives.optim.WarmupCosine`,
# `objectives.runtime.Throughput`, `objectives.checkpoints.load_objective`), kept working
from objectives.training import callbacks as _callbacks, checkpoints as _checkpoints, optim as _optim  # noqa: E402
sys.modules.update({"objectives.optim": _optim, "objectives.runtime": _callbacks,
                    "objectives.checkpoints": _checkpoints})
