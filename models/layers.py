"""Pieces shared by the trunks: normalization, rotary positions, the gated MLP and the decoding cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

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

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [B, H, T, head_dim] as positions start .. start+T-1."""
        T = x.shape[-2]
        cos = self.cos[start : start + T].to(x.dtype)
        sin = self.sin[start : start + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def check_length(length: int, maximum: int, owner: str) -> None:
    if length > maximum:
        raise ValueError(
            f"a sequence of {length} positions is longer than the {owner}'s maximum of {maximum}: "
            f"raise model.init_args.trunk.init_args.max_seq_len or lower data.init_args.seq_len"
        )


class DecodingCache:
    """A trunk's decoding state: one cache per block, advanced together and cropped back together.

    Each block cache has `length` and `crop(n)`; cropping to n forgets every position from n on, which is how
    speculative decoding rolls back rejected drafts.
    """

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        for layer in self.layers:
            layer.crop(length)

    def __iter__(self):
        return iter(self.layers)
