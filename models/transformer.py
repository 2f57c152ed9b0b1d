"""A pre-norm decoder transformer trunk: RMSNorm, rotary positions, SwiGLU, attention through SDPA.

Embeddings in, hidden states out. The token embedding and unembedding belong to the objective.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (DecodingCache, Linear, RMSNorm, Rotary, SwiGLU, as_index, as_lengths, branch_index,
                           check_length, check_padding, padded_at_the_end)

Mask = str | torch.Tensor  # "causal", "full", or a boolean tensor broadcastable to [B, H, T, S], True = attend


class KVCache:
    """Keys and values of one attention layer; row b holds `lengths[b]` valid positions, key index = position.

    Without gradients the keys live in a buffer preallocated to `max_len` and are written in place. Under
    `torch.enable_grad()` every append builds new tensors (a slice and `torch.cat`, or an out-of-place scatter
    for ragged rows), so the keys an earlier pass's attention saved for its backward are never overwritten and
    a forward over several passes through the cache can be trained.
    """

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._owned = True  # k and v are the preallocated buffers (no autograd graph holds them)
        self._bounds = (0, 0)  # (shortest, longest) row, kept on the host so that uniform decoding never syncs

    @property
    def length(self) -> int:
        return self._bounds[1]

    @property
    def bounds(self) -> tuple[int, int]:
        """(shortest, longest) row length."""
        return self._bounds

    def _set_lengths(self, lengths: torch.Tensor, bounds: tuple[int, int] | None = None) -> None:
        self.lengths = lengths
        if bounds is None:
            lo, hi = torch.aminmax(lengths) if lengths.numel() else (0, 0)
            bounds = (int(lo), int(hi))
        self._bounds = bounds

    def _reserve(self) -> None:
        """Write in place from now on: move the keys into preallocated buffers of `max_len` positions."""
        if self._owned:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            buffer = old.new_zeros(old.shape[0], old.shape[1], self.max_len, old.shape[3])
            buffer[:, :, : old.shape[2]] = old.detach()
            setattr(self, name, buffer)
        self._owned = True

    def append(self, k: torch.Tensor, v: torch.Tensor, advance: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, head_dim] at each row's own end; the rows grow by T (or by `advance` [B], the
        real tokens of right-padded rows). Returns the keys and values of positions 0 .. longest row + T."""
        T = k.shape[2]
        lo, hi = self._bounds
        end = hi + T
        check_length(end, self.max_len, "decoding cache")
        grad = torch.is_grad_enabled()
        if lo == hi:  # every row at the same length: one slice
            if grad:
                self.k, self.v = torch.cat([self.k[:, :, :lo], k], 2), torch.cat([self.v[:, :, :lo], v], 2)
                self._owned = False
            else:
                self._reserve()
                self.k[:, :, lo:end] = k
                self.v[:, :, lo:end] = v
        else:
            index = (self.lengths[:, None] + torch.arange(T, device=k.device))[:, None, :, None].expand_as(k)
            if grad:
                width = self.k.shape[2]
                base_k = self.k[:, :, :end] if width >= end else F.pad(self.k, (0, 0, 0, end - width))
                base_v = self.v[:, :, :end] if width >= end else F.pad(self.v, (0, 0, 0, end - width))
                self.k = base_k.scatter(2, index, k.to(base_k.dtype))
                self.v = base_v.scatter(2, index, v.to(base_v.dtype))
                self._owned = False
            else:
                self._reserve()
                self.k.scatter_(2, index, k.to(self.k.dtype))  # autocast: bf16 keys into the cache's dtype
                self.v.scatter_(2, index, v.to(self.v.dtype))
        if advance is None:
            self._set_lengths(self.lengths + T, (lo + T, hi + T))
        else:
            self._set_lengths(self.lengths + advance)
        return self.k[:, :, :end], self.v[:, :, :end]

    def crop(self, length: int | torch.Tensor) -> None:
        """Forget every position of a row from `length` on (an int for every row, or a [B] tensor)."""
        lo, hi = self._bounds
        if isinstance(length, int) and lo == hi:  # rows alike: checked on the host, without a sync (speculative
            if not 0 <= length <= hi:              # decoding crops every step)
                raise ValueError(f"cannot crop a cache of {hi} positions to {length}")
            self._set_lengths(torch.full_like(self.lengths, length), (length, length))
            return
        n = as_lengths(length, self.lengths)
        if bool(((n < 0) | (n > self.lengths)).any()):
            raise ValueError(f"cannot crop a cache of {self.lengths.tolist()} positions to {n.tolist()}")
        self._set_lengths(n, (int(length), int(length)) if isinstance(length, int) else None)

    def fork(self, index) -> "KVCache":
        """A new cache whose rows are copies of the rows `index` (ints or a LongTensor [N], repeats allowed)."""
        index = as_index(index, self.lengths.device)
        new = object.__new__(KVCache)
        new.k, new.v, new.max_len, new._owned = self.k[index], self.v[index], self.max_len, self._owned
        new._set_lengths(self.lengths[index])
        return new


class AttentionInputs(NamedTuple):
    """What every layer of one trunk forward shares: the rotary positions (an int start for every row, or
    [T] / [B, T]), the boolean mask or None, SDPA's is_causal, and how far each row's cache advances."""
    positions: int | torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    advance: torch.Tensor | None
    causal_after_cache: bool = False  # several queries after a cache of equal rows, causal (`Attention.attend`)


def attention_inputs(mask: Mask, T: int, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                     padding_mask: torch.Tensor | None = None, device=None) -> AttentionInputs:
    """Positions and mask for T queries that follow each row's cached keys (made once per trunk forward).

    Key index j of row b is that row's position j; the queries sit at indices lengths[b] .. lengths[b] + T - 1.
    No mask tensor is made where SDPA needs none: a causal forward from position 0, one query after a cache
    whose rows have equal lengths, full attention without padding. A causal forward after such a cache has its
    queries in the lower right corner of the score matrix, while SDPA's is_causal aligns to the upper left, so it
    gets one [1, 1, T, S] mask. Ragged rows and key padding get one [B, 1, T, S] mask. A padding query attends
    every key (its output is never used, and a row with no key would turn into NaN and spread through the
    padding keys' values). With a cache, padding must come after a row's real tokens (right padding).
    """
    if isinstance(mask, str) and mask not in ("causal", "full"):
        raise ValueError(f"unknown mask {mask!r}: use 'causal', 'full' or a boolean tensor")
    lo, hi = cache.bounds if cache is not None else (0, 0)
    real, advance, right_padded = None, None, True
    if padding_mask is not None:
        real = padding_mask.to(device=device, dtype=torch.bool)
        right_padded = padded_at_the_end(real)
        if cache is not None:
            check_padding(real, "transformer's decoding cache", at_the_end=True)
            advance = real.sum(1)
    if positions is None:
        if real is not None:  # real tokens numbered consecutively, whatever padding is before them
            offsets = (real.long().cumsum(1) - 1).clamp(min=0)
            positions = offsets + (cache.lengths[:, None] if cache is not None else 0)
        elif lo != hi:
            positions = cache.lengths[:, None] + torch.arange(T, device=device)
        else:
            positions = lo
    S = hi + T
    if lo == hi and (real is None or (right_padded and mask == "causal")):
        # equal rows; right padding is harmless under a causal mask (real queries never reach a later key)
        if isinstance(mask, torch.Tensor):
            return AttentionInputs(positions, mask.to(device=device, dtype=torch.bool), False, advance)
        if mask == "full" or T == 1:
            return AttentionInputs(positions, None, False, advance)
        if lo == 0:
            return AttentionInputs(positions, None, True, advance)
        rows = torch.arange(lo, S, device=device)[:, None]
        return AttentionInputs(positions, (torch.arange(S, device=device) <= rows)[None, None], False, advance, True)
    starts = (cache.lengths if cache is not None else torch.zeros(real.shape[0], dtype=torch.long, device=device))
    starts = starts[:, None, None, None]  # [B, 1, 1, 1]
    key = torch.arange(S, device=device)[None, None, None, :]
    if mask == "causal":
        allowed = key <= starts + torch.arange(T, device=device)[None, None, :, None]
    else:
        allowed = key < starts + T  # every written key of the row
        if isinstance(mask, torch.Tensor):
            m = mask.to(device=device, dtype=torch.bool)
            allowed = allowed & (m[:, None] if m.dim() == 3 else m)
    if real is not None:
        in_chunk = (key - starts).clamp(0, T - 1)[:, 0, 0]  # [B, S]: the chunk index of each key
        key_real = (key[:, 0, 0] < starts[:, 0, 0]) | real.gather(1, in_chunk)
        allowed = (allowed & key_real[:, None, None, :]) | ~real[:, None, :, None]
    return AttentionInputs(positions, allowed, False, advance)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_len: int, rope_base: float, qkv_bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out = Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, max_len, rope_base)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q, inputs.positions), self.rotary(k, inputs.positions)
        if cache is not None:
            k, v = cache.append(k, v, inputs.advance)
        return self.out(self.attend(q, k, v, inputs, decoding=cache is not None).transpose(1, 2).reshape(B, T, D))

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs,
               decoding: bool = False) -> torch.Tensor:
        """SDPA of q [B, H, T, hd] over k, v [B, H, S, hd]; `decoding`: the keys come from a decoding cache.

        A verify step of speculative decoding feeds several tokens after the cache, and its output must equal
        plain decoding's, which feeds them one at a time. In bf16 (or fp16) the rows of an SDPA of T queries are
        not the bits of T one-query calls (one masked call of 4 queries rounds about one row in a hundred
        differently in a d64 probe on an AVX-512 bf16 CPU, and bf16 rounding is coarse enough to change a greedy
        choice), while oneDNN's bf16 linear layers give every row the same bits whatever the row count. So
        low-precision decoding (no gradients, keys from a cache) runs a causal step of several queries after the
        cache query by query over exactly the keys a one-query step sees: the same calls, the same bits, and the
        rest of the step stays in the weights' precision. On a CPU these calls (and plain decoding's) run in fp32,
        whose SDPA of one query is about twice as fast as bf16's at these sizes (21 against 46 us with the casts,
        4 heads of 64, 100 keys, 1 thread, AMD EPYC with AVX-512 bf16): in bf16 the calls query by query cost
        about 0.2 plain steps of a d256 x 4 verify step
        (BENCHMARKS.md, "bf16 decoding"). One call of T queries, even in fp32, is not row-exact after the cast
        back (its products differ by row count by about 1e-7). A GPU keeps the weights' precision (an fp32 copy
        of the cache every step would double the memory traffic that decoding is bound by). fp32 weights keep
        the one call: their rows differ by about 1e-7, which has not changed a greedy choice in any benchmark.
        Training and validation keep the one call in the weights' precision.
        """
        T, S = q.shape[2], k.shape[2]
        if not (decoding and q.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal)
        dtype = q.dtype
        if q.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()
        if inputs.causal_after_cache and T > 1:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, : S - T + i + 1],
                                                            v[:, :, : S - T + i + 1]) for i in range(T)], 2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal)
        return out.to(dtype)


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

    def forward(self, x: torch.Tensor, *, mask: Mask | AttentionInputs = "causal", cache: KVCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(mask, AttentionInputs):  # a block used on its own (a multi-token head)
            mask = attention_inputs(mask, x.shape[1], cache, positions, padding_mask, x.device)
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
        self.d_model, self.n_layers, self.max_seq_len, self.n_heads = d_model, n_layers, max_seq_len, n_heads
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

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: DecodingCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> hidden states [B, T, D].

        mask: "causal", "full" or a boolean tensor broadcastable to [B, H, T, S] (True = attend; S = the cached
            keys plus T; `models.layers.block_mask` makes the block-causal one from segment ids).
        cache: a decoding cache (`make_cache`): the T positions follow each row's cached ones, and the cache
            advances by them (by each row's real tokens when padded).
        positions: rotary positions [B, T] or [T]; default each row's next positions (real tokens numbered
            consecutively when padded).
        padding_mask: [B, T] bool, True = a real token: padding is never attended to; with a cache it must come
            after each row's real tokens.
        branch: m > 0 returns (hidden states, z), z [B, T, D] the input of the last m blocks (no final norm).
        """
        layer_caches = list(cache) if cache is not None else [None] * len(self.blocks)
        check_length((cache.length if cache is not None else 0) + x.shape[1], self.max_seq_len, "trunk")
        if positions is not None and positions.numel():
            check_length(int(positions.max()) + 1, self.max_seq_len, "trunk")
        inputs = attention_inputs(mask, x.shape[1], layer_caches[0] if layer_caches else None, positions,
                                  padding_mask, x.device)
        cut, z = branch_index(len(self.blocks), branch), None
        for i, (block, layer_cache) in enumerate(zip(self.blocks, layer_caches)):
            z = x if i == cut else z
            x = block(x, mask=inputs, cache=layer_cache)
        return (self.norm(x), z) if branch else self.norm(x)
