"""Trunks: sequence mixers that map embeddings [B, T, D] to hidden states [B, T, D]."""
from models.mamba import Mamba
from models.mamba2 import Mamba2
from models.rwkv7 import RWKV7
from models.transformer import Transformer

__all__ = ["HFTrunk", "Mamba", "Mamba2", "RWKV7", "Transformer"]


def __getattr__(name: str):
    # imported on first use: models.hf needs the optional transformers package only when a trunk is built
    if name == "HFTrunk":
        from models.hf import HFTrunk
        return HFTrunk
    raise AttributeError(f"module 'models' has no attribute {name!r}")
