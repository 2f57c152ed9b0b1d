"""Pieces shared by the trunks: normalization, rotary positions, the gated MLP, masks and the decoding cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a product of 2 to 8 rows in fp32 on a CPU without gradients (decoding: a verify step's
    few tokens, a small batch's next tokens) runs as weight @ x^T.

    Why: for those shapes F.linear's fp32 kernel is about twice as slow as the transposed product (the quickstart
    trunk's 16 weight matrices read cold, 1 thread, AVX2-only AMD EPYC: 2.92 against 1.51 ms at 4 rows, 3.60 against
    2.87 at 8; at 1 row F.linear's 0.77 is the faster, so one row keeps it, and from 12 rows F.linear wins again;
    `python -m benchmarks.linear_rows`, BENCHMARKS.md, "fp32 decoding").
    Low precision keeps F.linear (oneDNN's bf16 products cost about the same from 1 to 4 rows). The bits differ from
    F.linear's at the 1e-7 level, as fp32 products of different row counts already do."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (2 <= rows <= 8 and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        out = torch.mm(weight, x.reshape(rows, -1).t()).t()
        if bias is not None:
            out = out + bias
        return out.contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through `linear` (a few fp32 rows without gradients as weight @ x^T on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / rms(x) * g, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """The gated MLP of Shazeer 2020: W_out (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden, bias=False)
        self.out = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), tables precomputed up to `max_len` positions."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        """Rotate x [B, H, T, head_dim] to its positions: an int p (positions p .. p+T-1 in every row), or a
        LongTensor [T] or [B, T] (per-row positions: ragged rows, or padding that skips positions)."""
        if isinstance(positions, int):
            T = x.shape[-2]
            cos, sin = self.cos[positions : positions + T], self.sin[positions : positions + T]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
            if cos.dim() == 3:  # [B, T, head_dim / 2]: one row of positions per batch row, shared by the heads
                cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def check_length(length: int, maximum: int, owner: str) -> None:
    if length > maximum:
        raise ValueError(
            f"a sequence of {length} positions is longer than the {owner}'s maximum of {maximum}: "
            f"raise model.init_args.trunk.init_args.max_seq_len or lower data.init_args.seq_len"
        )


def branch_index(n_blocks: int, branch: int) -> int | None:
    """The block whose input a trunk's forward hands out with `branch` = m (the input of its last m blocks, where
    multi-token sibling heads branch off); None for m = 0 (nothing handed out)."""
    if not 0 <= branch <= n_blocks:
        raise ValueError(f"branch={branch}: a trunk of {n_blocks} blocks can hand out the input of its last 1 to "
                         f"{n_blocks} blocks (0: none)")
    return n_blocks - branch if branch else None


def block_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The block-causal attention mask of segment ids [B, T] (or [T]): bool [B, 1, T, T], True = attend.

    A block is a maximal run of equal ids. A query attends every key of its own block (before and after it) and
    every key of the blocks before it, none of the blocks after: full attention inside a block, causal across
    blocks (the mask of block diffusion and of plans expanded a block at a time). The ids need not be ordered;
    only where they change matters.
    """
    ids = segment_ids if segment_ids.dim() == 2 else segment_ids[None]
    starts = torch.ones_like(ids, dtype=torch.long)
    starts[:, 1:] = (ids[:, 1:] != ids[:, :-1]).long()
    block = starts.cumsum(1)  # the index of each position's block, counted from 1
    return (block[:, None, :, None] >= block[:, None, None, :])


def padded_at_the_end(real: torch.Tensor) -> bool:
    """Whether every row of a key-padding mask [B, T] (True = a real token) is real tokens, then padding."""
    return not bool((real[:, 1:] & ~real[:, :-1]).any())


def check_padding(real: torch.Tensor, owner: str, at_the_end: bool) -> None:
    """Refuse a padding mask the owner cannot serve: padding inside a row (and, for a cache, padding before a
    row's real tokens, which the cache would count as its own positions)."""
    if padded_at_the_end(real):
        return
    if not at_the_end and padded_at_the_end(real.flip(1)):
        return  # left padding
    where = "after the real tokens of each row (right padding)" if at_the_end else "at either end of a row"
    raise ValueError(f"the {owner} takes padding {where} only; this padding_mask has padding elsewhere: "
                     f"right-pad the rows (real tokens first) and give per-row lengths")


def as_lengths(n: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row length LongTensor like `like` [B] from an int (every row) or a tensor [B]."""
    if isinstance(n, torch.Tensor):
        n = n.to(device=like.device, dtype=torch.long).reshape(-1)
        if n.numel() == 1 and like.numel() != 1:
            n = n.expand_as(like)
        if n.shape != like.shape:
            raise ValueError(f"per-row lengths of shape {tuple(n.shape)} given for a cache of {like.numel()} rows")
        return n
    return torch.full_like(like, int(n))


def as_index(index, device) -> torch.Tensor:
    """Row indices (an int, a sequence or a tensor) as a LongTensor [N]."""
    return torch.as_tensor(index, dtype=torch.long, device=device).reshape(-1)


class DecodingCache:
    """A trunk's decoding state: one cache per block, advanced together and cropped back together.

    Rows keep their own lengths (`lengths`, LongTensor [B]; `length` is the longest): a ragged batch of prompts
    is prefilled at once and each row continues from its own end. Each block cache has `lengths`, `length`,
    `crop(n)` and `fork(index)`. Cropping to n (an int for every row, or a [B] tensor) forgets every position
    of a row from n on, which is how speculative decoding rolls back rejected drafts; `fork(index)` makes a new
    cache whose rows are copies of the given rows (one prefix's state copied to N rows for parallel expansion).
    Under `torch.enable_grad()` cached forwards build new tensors instead of writing into the cache, so that a
    forward over several passes through one cache can be trained.
    """

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def lengths(self) -> torch.Tensor:
        return self.layers[0].lengths if self.layers else torch.zeros(0, dtype=torch.long)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def crop(self, length: int | torch.Tensor) -> None:
        for layer in self.layers:  # every block checks the lengths itself, the first before anything changes
            layer.crop(length)

    def fork(self, index) -> "DecodingCache":
        return type(self)([layer.fork(index) for layer in self.layers])

    def __iter__(self):
        return iter(self.layers)
