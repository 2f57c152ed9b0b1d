"""Data: corpora, tokenizers, synthetic and reasoning tasks. Batches are dicts of tensors (`tokens`, `loss_mask`,
and where the data has structure `segments`)."""
from datamodules.biographies import BiographiesDataModule
from datamodules.reasoning import ReasoningDataModule
from datamodules.recall import MQARDataModule
from datamodules.skeleton import SkeletonDataModule
from datamodules.synthetic import SyntheticDataModule
from datamodules.text import TextDataModule

__all__ = ["TextDataModule", "ReasoningDataModule", "SkeletonDataModule", "SyntheticDataModule", "MQARDataModule",
           "BiographiesDataModule"]
