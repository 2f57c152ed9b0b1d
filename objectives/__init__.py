"""Objectives: one LightningModule per family, all subclasses of `objectives.base.Objective`."""
from objectives.base import Objective
from objectives.coconut import Coconut
from objectives.diffusion_lm import DiffusionLM
from objectives.distill import SelfDistillation
from objectives.mdlm import MaskedDiffusion
from objectives.mtp import DeepSeekMTP, MultiTokenPrediction
from objectives.ladir import LaDiR
from objectives.ntp import NextTokenPrediction
from objectives.planning import PlanningTokens
from objectives.skeleton import SkeletonOfThought
from objectives.summaries import BagOfWordsSummary, ReverseLMSummary

__all__ = ["Objective", "Coconut", "NextTokenPrediction", "MultiTokenPrediction", "DeepSeekMTP", "MaskedDiffusion", "DiffusionLM",
           "SelfDistillation", "LaDiR", "PlanningTokens", "SkeletonOfThought", "BagOfWordsSummary", "ReverseLMSummary"]
