"""The two contracts between the trunks (`models/`) and the objectives, in code: what an objective may use of a
trunk and of a decoding state, and nothing else. Every trunk of `models/` satisfies `Trunk`, every cache it makes
satisfies `DecodingState` (tests/test_trunk_contract.py checks both with `isinstance`); `BranchingTrunk` is what a
trunk may offer beyond `Trunk` (the project's own trunks do)."""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

Mask = str | torch.Tensor  # "causal", "full", or a boolean tensor broadcastable to [B, H, T, S] (True = attend)


@runtime_checkable
class DecodingState(Protocol):
    """A trunk's decoding cache. Rows keep their own lengths; cropping forgets positions (speculative decoding
    rolls rejected drafts back with it); forking copies rows (one prefix expanded into N continuations)."""

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: positions cached per row."""

    @property
    def length(self) -> int:
        """The longest row's cached positions."""

    def crop(self, length: int | torch.Tensor) -> None:
        """Forget every position of a row from `length` on (an int for every row, or a [B] tensor)."""

    def fork(self, index) -> "DecodingState":
        """A new state whose rows are copies of the rows `index` (LongTensor [N]) of this one."""

    def __iter__(self) -> Iterator:
        """The per-block caches (tree drafts compact key-value caches block by block)."""


@runtime_checkable
class Trunk(Protocol):
    """A sequence mixer: embeddings in, hidden states out. It owns its blocks and final norm, not the token
    embedding or the unembedding (those belong to the objective)."""

    d_model: int  # the width D of its inputs and outputs
    n_layers: int
    max_seq_len: int  # positions it can take, cached ones included
    supported_masks: tuple[str, ...]  # of "causal", "full", "tensor": an objective needing another fails at setup

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: DecodingState | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> hidden states [B, T, D], after the final norm. With a cache, the T positions follow each
        row's cached ones and the cache advances by each row's real tokens (padding_mask [B, T], True = real)."""

    def make_cache(self, batch_size: int, device=None, dtype=None) -> DecodingState:
        """An empty decoding state for `batch_size` rows."""

    def make_block(self) -> nn.Module:
        """A fresh block of the trunk's own kind (`block(x, cache=...)` maps [B, T, D] to [B, T, D], with
        `block.make_cache(batch_size, device, dtype)`), for heads that need a layer (MTP heads and modules)."""


@runtime_checkable
class BranchingTrunk(Trunk, Protocol):
    """A trunk that can also hand out the input of its last blocks, and names its final norm: what multi-token
    heads that are siblings of its last layer need (Gloeckle et al. 2024's released model: heads 2..n read what the
    last layer reads, and every head goes through the one final norm). The project's trunks are; a Hugging Face
    model, which transformers runs whole, is not."""

    norm: nn.Module  # the final norm, which `forward` applies to the last block's output

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: DecodingState | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As `Trunk.forward`; with branch = m > 0 it returns (hidden states, z): z [B, T, D] the input of its last
        m blocks (the residual stream there, before any norm), the cache advancing as without it."""
