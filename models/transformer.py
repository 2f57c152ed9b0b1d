"""A pre-norm decoder transformer trunk: RMSNorm, rotary positions, SwiGLU, attention through SDPA.

Embeddings in, hidden states out. The token embedding and unembedding belong to the objective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import DecodingCache, RMSNorm, Rotary, SwiGLU, check_length

Mask = str | torch.Tensor  # "causal", "full", or a boolean tensor broadcastable to [B, H, T, S], True = attend


class KVCache:
    """Keys and values of one attention layer, preallocated to `max_len`; `length` positions are valid."""

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        check_length(end, self.k.shape[2], "decoding cache")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def crop(self, length: int) -> None:
        self.length = length


def _attention_mask(mask: Mask, start: int, T: int, device) -> tuple[torch.Tensor | None, bool]:
    """(explicit boolean mask or None, is_causal) for queries at positions start..start+T-1 over start+T keys."""
    if isinstance(mask, torch.Tensor):
        return mask.to(device=device, dtype=torch.bool), False
    if mask == "full" or T == 1:
        return None, False
    if start == 0:
        return None, True
    # causal with a cache: SDPA's is_causal aligns to the top-left corner, so the offset needs a mask
    rows = torch.arange(start, start + T, device=device)[:, None]
    return torch.arange(start + T, device=device)[None, :] <= rows, False


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_len: int, rope_base: float, qkv_bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, max_len, rope_base)

    def forward(self, x: torch.Tensor, mask: Mask, cache: KVCache | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = cache.length if cache is not None else 0
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.append(k, v)
        attn_mask, is_causal = _attention_mask(mask, start, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, max_len: int, rope_base: float, eps: float,
                 qkv_bias: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_heads, max_len, rope_base, qkv_bias)
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)
        self.max_len = max_len

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, cache)
        return x + self.mlp(self.mlp_norm(x))

    def make_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        p = self.attn.qkv.weight
        return KVCache(batch_size, self.attn.n_heads, self.attn.head_dim, self.max_len,
                       device or p.device, dtype or p.dtype)


class Transformer(nn.Module):
    """The transformer trunk.

    Args:
        d_model: width of the hidden states.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        max_seq_len: the longest sequence (prompt plus generation) the trunk accepts.
        mlp_hidden: SwiGLU hidden width; default 8/3 d_model rounded up to a multiple of 64.
        rope_base: rotary base frequency.
        norm_eps: RMSNorm epsilon.
        qkv_bias: learned biases on the queries, keys and values (as in Qwen2), initialised to zero. A key bias
            gives every position a token-independent key, so attention can pick positions by offset before the
            embeddings have learned anything. That shortens the plateau masked diffusion starts on, since its
            masked positions see no token of their own (BENCHMARKS.md; MDLM's DiT gets the same from its adaLN
            shift).
    """

    supported_masks = ("causal", "full", "tensor")

    def __init__(self, d_model: int = 256, n_layers: int = 4, n_heads: int = 4, max_seq_len: int = 512,
                 mlp_hidden: int | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 qkv_bias: bool = False):
        super().__init__()
        self.d_model, self.n_layers, self.max_seq_len = d_model, n_layers, max_seq_len
        mlp_hidden = mlp_hidden or 64 * math.ceil(8 * d_model / 3 / 64)
        self._block_args = (d_model, n_heads, mlp_hidden, max_seq_len, rope_base, norm_eps, qkv_bias)
        self.blocks = nn.ModuleList(self.make_block() for _ in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)

    def make_block(self) -> Block:
        """A fresh block of this trunk's kind and shape, initialised (used for multi-token heads)."""
        block = Block(*self._block_args)
        for name, p in block.named_parameters():
            if p.dim() == 2:
                # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat
                std = 0.02 / math.sqrt(2 * self.n_layers) if name.endswith("out.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("qkv.bias"):
                nn.init.zeros_(p)
        return block

    def make_cache(self, batch_size: int, device=None, dtype=None) -> DecodingCache:
        return DecodingCache([b.make_cache(batch_size, device, dtype) for b in self.blocks])

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: DecodingCache | None = None) -> torch.Tensor:
        if isinstance(mask, str) and mask not in ("causal", "full"):
            raise ValueError(f"unknown mask {mask!r}: use 'causal', 'full' or a boolean tensor")
        check_length((cache.length if cache is not None else 0) + x.shape[1], self.max_seq_len, "trunk")
        layer_caches = list(cache) if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches):
            x = block(x, mask=mask, cache=layer_cache)
        return self.norm(x)
