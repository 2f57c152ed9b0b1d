"""Objectives: one LightningModule per family, all subclasses of `objectives.base.Objective`."""
from objectives.base import Objective
from objectives.ntp import NextTokenPrediction

__all__ = ["Objective", "NextTokenPrediction"]
