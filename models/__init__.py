"""Trunks: sequence mixers that map embeddings [B, T, D] to hidden states [B, T, D]."""
from models.mamba import Mamba
from models.mamba2 import Mamba2
from models.transformer import Transformer

__all__ = ["Mamba", "Mamba2", "Transformer"]
