"""A Mamba trunk: the selective state-space model of Gu & Dao 2023 ("Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", arXiv:2312.00752).

Embeddings in, hidden states out, like every trunk (see models/transformer.py for the contract).

The selective scan itself, with its chunked pure-PyTorch form and the hand-over to `mamba_ssm`'s CUDA kernel,
is in `models/selective_scan.py`.

Decoding keeps, per block, the last d_conv inputs of the convolution and the SSM state: O(1) time and memory
per token. The block cache also keeps those two states for the last `history` positions so that it can be
cropped back (speculative decoding rolls rejected drafts back), and can be snapshotted and restored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import selective_scan as scan
from models.layers import DecodingCache, RMSNorm, as_index, as_lengths, branch_index, check_length, check_padding

Mask = str | torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------------------------------------------


class MambaCache:
    """Decoding state of one Mamba block: the last d_conv conv inputs and the SSM state, O(1) in the length.

    `conv_state` (batch, d_inner, d_conv) holds the raw conv inputs of each row's last d_conv positions (oldest
    first); `ssm_state` (batch, d_inner, d_state) is fp32; `lengths` [batch] counts each row's positions (rows
    of a ragged batch differ). A ring buffer also keeps both states for each row's last `history` positions,
    so `crop(n)` (an int, or a [batch] tensor of per-row lengths) can take row b back to any length
    n_b >= lengths_b - history (a recurrent state cannot be rewound further; that raises a ValueError).
    `snapshot()` / `restore(snap)` save and bring back the state (O(1): the ring is not copied; after a restore,
    crops reach back as far as the ring still holds states of the snapshot's continuation); `fork(index)` copies
    rows into a new cache. The states are replaced, never written in place, so a forward over several passes
    through the cache can be trained (the ring keeps detached copies: a crop back in a trained forward
    continues from a constant state).
    """

    def __init__(self, batch_size: int, d_inner: int, d_state: int, d_conv: int, device=None, dtype=None,
                 history: int = 64):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        dtype = dtype or torch.float32
        self.history = history
        self.conv_state = torch.zeros(batch_size, d_inner, d_conv, device=device, dtype=dtype)
        self.ssm_state = torch.zeros(batch_size, d_inner, d_state, device=device, dtype=torch.float32)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._conv_ring = self.conv_state.new_zeros(history + 1, *self.conv_state.shape)
        self._ssm_ring = self.ssm_state.new_zeros(history + 1, *self.ssm_state.shape)
        self._slot_ids = torch.full((history + 1, batch_size), -1, dtype=torch.long, device=device)  # which write
        self._writes = 0
        self._oldest = torch.zeros_like(self.lengths)  # per row, the oldest length whose state the ring holds
        self._record(self.lengths, self.conv_state, self.ssm_state)

    @property
    def length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def _slot(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths % (self.history + 1)

    @torch.no_grad()
    def _record(self, lengths: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
        """Keep the states of rows (a bool [batch], default all) as those of their given lengths."""
        r = torch.arange(len(lengths), device=lengths.device) if rows is None else rows.nonzero()[:, 0]
        slots = self._slot(lengths[r])
        self._conv_ring[slots, r] = conv[r].to(self._conv_ring.dtype)
        self._ssm_ring[slots, r] = ssm[r].float()
        self._slot_ids[slots, r] = self._writes
        self._writes += 1

    def conv_windows(self, inputs: torch.Tensor, padding_mask: torch.Tensor | None, keep: int):
        """The conv state after a chunk of raw conv inputs [b, T, channels]: (advance [b], each row's last d_conv
        real inputs [b, channels, d_conv], and the windows after the chunk's last `keep` positions [keep, b,
        channels, d_conv]) for `_advance`. Padding sits after a row's real inputs."""
        T, d_conv = inputs.shape[1], self.conv_state.shape[2]
        # the raw conv inputs with the cached ones before them: (b, channels, d_conv + T)
        raw = torch.cat([self.conv_state, inputs.transpose(1, 2).to(self.conv_state.dtype)], dim=2)
        if padding_mask is None:
            advance, conv = torch.full_like(self.lengths, T), raw[:, :, T:]
        else:  # each row's last d_conv real inputs
            advance = padding_mask.sum(1)
            index = (advance[:, None] + torch.arange(d_conv, device=raw.device))[:, None, :]
            conv = raw.gather(2, index.expand(raw.shape[0], raw.shape[1], d_conv))
        with torch.no_grad():
            conv_tail = raw.detach().unfold(2, d_conv, 1)[:, :, -keep:].permute(2, 0, 1, 3)
        return advance, conv, conv_tail

    def _advance(self, advance: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, conv_tail: torch.Tensor,
                 ssm_tail: torch.Tensor, tail_end: int, full: bool) -> None:
        """Row b advances by advance[b] positions (every row by tail_end when `full`) to the new states conv,
        ssm. conv_tail / ssm_tail (keep, batch, d_inner, .) hold the states after chunk positions
        tail_end - keep .. tail_end - 1 (oldest first); a row keeps those of its own real positions."""
        keep = conv_tail.shape[0]
        first = tail_end - keep  # the chunk position of the first kept state
        old = self.lengths
        for i in range(keep - 1):  # the last one is each row's new state, recorded below
            p = first + i
            self._record(old + p + 1, conv_tail[i], ssm_tail[i], None if full else p < advance)
        self.lengths = old + advance
        self.conv_state, self.ssm_state = conv, ssm
        self._record(self.lengths, conv, ssm)
        oldest = torch.maximum(self._oldest, self.lengths - self.history)
        if first > 0:  # the lengths before the kept tail were never recorded
            oldest = torch.where(advance > 0, torch.maximum(oldest, torch.minimum(old + first + 1, self.lengths)),
                                 oldest)
        self._oldest = oldest

    def crop(self, length: int | torch.Tensor) -> None:
        n = as_lengths(length, self.lengths)
        bad = (n < 0) | (n > self.lengths)
        if bool(bad.any()):
            raise ValueError(f"cannot crop a Mamba cache of {self.lengths.tolist()} positions to {n.tolist()}")
        lost = n < self._oldest
        if bool(lost.any()):
            b = int(lost.nonzero()[0, 0])
            raise ValueError(
                f"cannot crop the Mamba cache back to {int(n[b])} positions: a recurrent state cannot be rewound "
                f"and this cache holds the states of lengths {int(self._oldest[b])}..{int(self.lengths[b])} only "
                f"(the last {self.history} positions at most); make the cache with a larger history, or "
                f"snapshot() before advancing and restore() to go back")
        same = n == self.lengths
        if bool(same.all()):
            return
        r = torch.arange(len(n), device=n.device)
        slots = self._slot(n)
        self.conv_state = torch.where(same[:, None, None], self.conv_state, self._conv_ring[slots, r])
        self.ssm_state = torch.where(same[:, None, None], self.ssm_state, self._ssm_ring[slots, r])
        self.lengths = n

    def fork(self, index) -> "MambaCache":
        """A new cache whose rows are copies of the rows `index` (ints or a LongTensor [N], repeats allowed)."""
        index = as_index(index, self.lengths.device)
        new = object.__new__(MambaCache)
        new.history, new._writes = self.history, self._writes
        new.conv_state, new.ssm_state = self.conv_state[index], self.ssm_state[index]
        new.lengths, new._oldest = self.lengths[index], self._oldest[index]
        new._conv_ring, new._ssm_ring = self._conv_ring[:, index], self._ssm_ring[:, index]
        new._slot_ids = self._slot_ids[:, index]
        return new

    def snapshot(self) -> dict:
        return {"lengths": self.lengths.clone(), "oldest": self._oldest.clone(), "ids": self._slot_ids.clone(),
                "conv_state": self.conv_state.clone(), "ssm_state": self.ssm_state.clone()}

    def restore(self, snapshot: dict) -> None:
        n = self.lengths = snapshot["lengths"].clone()
        self.conv_state, self.ssm_state = snapshot["conv_state"].clone(), snapshot["ssm_state"].clone()
        ids = snapshot["ids"]
        r = torch.arange(len(n), device=n.device)
        overwritten = self._slot_ids[self._slot(n), r] != ids[self._slot(n), r]
        if bool(overwritten.any()):
            self._record(n, self.conv_state, self.ssm_state, overwritten)
        # per row, keep the ring slots that nothing has overwritten since the snapshot
        now, then, floor = self._slot_ids.tolist(), ids.tolist(), snapshot["oldest"].tolist()
        oldest = n.tolist()
        for b in range(len(oldest)):
            while oldest[b] > floor[b] and now[(oldest[b] - 1) % (self.history + 1)][b] \
                    == then[(oldest[b] - 1) % (self.history + 1)][b]:
                oldest[b] -= 1
        self._oldest = torch.tensor(oldest, dtype=torch.long, device=n.device)


def causal_conv(x: torch.Tensor, conv1d: nn.Conv1d, before: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks' depthwise causal convolution in time-major layout, x (b, T, d) -> (b, T, d): `before` holds
    the d_conv - 1 inputs before x (b, d_conv - 1, d), None for the zeros before a sequence starts. Shifted multiply-adds over contiguous
    (b, T, d) rows, rather than nn.Conv1d on transposed (b, d, T) data, which was slower on CPU."""
    T, d_conv = x.shape[1], conv1d.kernel_size[0]
    x = F.pad(x, (0, 0, d_conv - 1, 0)) if before is None else torch.cat([before.to(x.dtype), x], dim=1)
    w = conv1d.weight[:, 0, :].to(x.dtype)  # (d, d_conv)
    # the bias starts the sum (one pass over the output less than adding it after)
    out = x[:, 0:T] * w[:, 0] if conv1d.bias is None else torch.addcmul(conv1d.bias.to(x.dtype), x[:, 0:T], w[:, 0])
    for j in range(1, d_conv):
        out = torch.addcmul(out, x[:, j:j + T], w[:, j])
    return out


class MambaBlock(nn.Module):
    """The Mamba mixer of Gu & Dao 2023 (their Figure 3; `mamba_ssm.modules.mamba_simple.Mamba`).

    in_proj to (x, z); x: depthwise causal conv1d and SiLU; x_proj to (dt, B, C); dt_proj; the selective scan
    with the D skip and the SiLU(z) gate; out_proj. Parameter names and shapes are those of mamba_ssm's module
    (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state dicts move between the two.

    Init as the reference: A = -exp(A_log) with A_log = log(1..N) (S4D-real), D = 1, dt_proj.bias the inverse
    softplus of dt ~ log-uniform in [dt_min, dt_max], dt_proj.weight ~ U(+-dt_rank^-1/2 * dt_scale).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_scale: float = 1.0, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        dt_min, dt_max, floor, dt_scale = self._dt_init
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> MambaCache:
        p = self.in_proj.weight
        return MambaCache(batch_size, self.d_inner, self.d_state, self.d_conv, device or p.device,
                          dtype or p.dtype, history)

    def _ssm_inputs(self, xc: torch.Tensor):
        x_dbl = self.x_proj(xc)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added inside the scan, as in mamba_ssm
        return dt, Bm, Cm

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, T, d_model) -> (b, T, d_model); with a cache, x holds the T positions after each row's end.

        padding_mask (b, T) bool, True = a real token. Padding leaves the state as it was: its conv inputs are
        zero (the zeros a sequence's start is padded with, so left padding is exact) and its step size delta is
        zero, so exp(delta A) = 1 and delta B u = 0: h passes through unchanged. With a cache, padding comes after
        each row's real tokens, and row b advances by its real tokens only."""
        b, T, _ = x.shape
        if T == 0:
            return self.out_proj(x.new_zeros(b, 0, self.d_inner))
        if cache is not None and T == 1:
            return self.step(x, cache, padding_mask)
        xz = self.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)  # (b, T, d_inner) each
        if padding_mask is not None:
            xi = xi * padding_mask[..., None].to(xi.dtype)
        xc = F.silu(causal_conv(xi, self.conv1d, None if cache is None else cache.conv_state[:, :, 1:].transpose(1, 2)))
        dt, Bm, Cm = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.float())
        delta, bias, softplus = dt, self.dt_proj.bias.float(), True
        if padding_mask is not None:  # delta = 0 at padding: the state passes through
            delta, bias, softplus = F.softplus(dt.float() + bias) * padding_mask[..., None], None, False
        if cache is None and padding_mask is None and scan.mamba_ssm_kernel is not None and x.is_cuda:
            y = scan.mamba_ssm_kernel(xc.transpose(1, 2), dt.transpose(1, 2), A, Bm.transpose(1, 2),
                                             Cm.transpose(1, 2), self.D.float(), z.transpose(1, 2),
                                             self.dt_proj.bias.float(), True).transpose(1, 2)
            return self.out_proj(y)
        keep = 0 if cache is None else min(T, cache.history + 1)
        y, last, kept = scan.selective_scan_time_major(
            xc, delta, A, Bm, Cm, D=self.D.float(), z=z, delta_bias=bias, delta_softplus=softplus,
            initial_state=None if cache is None else cache.ssm_state, keep_states=keep)
        if cache is not None:
            advance, conv, conv_tail = cache.conv_windows(xi, padding_mask, keep)
            cache._advance(advance, conv, last, conv_tail, kept, T, full=padding_mask is None)
        return self.out_proj(y)

    def step(self, x: torch.Tensor, cache: MambaCache, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step, x (b, 1, d_model): O(1) time and memory in the length (Gu & Dao 2023, sec. 3.3).
        A row whose padding_mask is False keeps its state and length."""
        xz = self.in_proj(x[:, 0])
        xi, z = xz.chunk(2, dim=-1)  # (b, d_inner)
        conv = torch.cat([cache.conv_state[:, :, 1:], xi.unsqueeze(-1).to(cache.conv_state.dtype)], dim=2)
        window = torch.cat([cache.conv_state[:, :, 1:].to(xi.dtype), xi.unsqueeze(-1)], dim=2)  # (b, d, d_conv)
        xc = (window * self.conv1d.weight[:, 0, :].to(xi.dtype)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.to(xc.dtype)
        xc = F.silu(xc)
        dt, Bm, Cm = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.float())
        delta = F.softplus(dt.float() + self.dt_proj.bias.float())  # (b, d)
        if padding_mask is not None:
            delta = delta * padding_mask[:, :1]
            conv = torch.where(padding_mask[:, :1, None], conv, cache.conv_state)
        dA = torch.exp(delta.unsqueeze(-1) * A)  # (b, d, N)
        h = cache.ssm_state * dA + (delta * xc.float()).unsqueeze(-1) * Bm.float().unsqueeze(1)
        y = torch.matmul(h, Cm.float().unsqueeze(-1)).squeeze(-1) + self.D.float() * xc.float()
        y = (y * F.silu(z.float())).to(x.dtype)
        advance = torch.ones_like(cache.lengths) if padding_mask is None else padding_mask[:, 0].long()
        cache._advance(advance, conv, h, conv.unsqueeze(0), h.unsqueeze(0), 1, full=padding_mask is None)
        return self.out_proj(y).unsqueeze(1)


def check_causal_mask(mask: Mask, owner: str = "Mamba trunk") -> None:
    if isinstance(mask, str) and mask == "causal":
        return
    got = f"a {tuple(mask.shape)} tensor mask" if isinstance(mask, torch.Tensor) else repr(mask)
    raise ValueError(
        f"the {owner} supports only causal masks (got {got}): a selective state-space scan reads the sequence "
        f"left to right and has no bidirectional or arbitrary attention; use the transformer trunk "
        f"(models.Transformer) for an objective that needs mask='full' or a tensor mask")


def recurrent_forward(trunk: nn.Module, x: torch.Tensor, mask: Mask, cache, padding_mask: torch.Tensor | None,
                      owner: str, branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The forward of a recurrent trunk (Mamba, Mamba-2): the causal mask and the length checked, padding checked
    (at either end of a row, or with a cache after each row's real tokens only), then the blocks with their caches
    and the final norm; with `branch` = m > 0, also the input of the last m blocks (`models.contracts`)."""
    check_causal_mask(mask, owner)
    check_length((cache.length if cache is not None else 0) + x.shape[1], trunk.max_seq_len, "trunk")
    if padding_mask is not None:
        padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
        check_padding(padding_mask, f"{owner}'s decoding cache" if cache is not None else owner,
                      at_the_end=cache is not None)
    layer_caches = list(cache) if cache is not None else [None] * len(trunk.blocks)
    cut, z = branch_index(len(trunk.blocks), branch), None
    for i, (block, layer_cache) in enumerate(zip(trunk.blocks, layer_caches)):
        z = x if i == cut else z
        x = block(x, mask=mask, cache=layer_cache, padding_mask=padding_mask)
    return (trunk.norm(x), z) if branch else trunk.norm(x)


class MambaResidualBlock(nn.Module):
    """x + MambaBlock(RMSNorm(x)): the pre-norm residual block of the Mamba trunk (`mixer`, `norm` as in
    mamba_ssm's Block)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, norm_eps: float = 1e-5, dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)
        # the init's floor (mamba_ssm's 1e-4) must not clamp a smaller dt_min away
        self.mixer = MambaBlock(d_model, d_state, d_conv, expand, dt_rank, dt_min=dt_min, dt_max=dt_max,
                                dt_init_floor=min(1e-4, dt_min))

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: MambaCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_causal_mask(mask, "Mamba block")
        if padding_mask is not None:
            padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
        return x + self.mixer(self.norm(x), cache=cache, padding_mask=padding_mask)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> MambaCache:
        return self.mixer.make_cache(batch_size, device, dtype, history)


class MambaDecodingCache(DecodingCache):
    """The trunk's DecodingCache with `snapshot()` / `restore(snap)` over all blocks."""

    def snapshot(self) -> list:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snapshot: list) -> None:
        for layer, snap in zip(self.layers, snapshot):
            layer.restore(snap)


class Mamba(nn.Module):
    """The Mamba trunk (Gu & Dao 2023): a pre-norm residual stack of Mamba blocks and a final RMSNorm.

    Args:
        d_model: width of the hidden states.
        n_layers: number of blocks.
        d_state: SSM state size N per channel.
        d_conv: width of the depthwise causal convolution.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the delta projection; default ceil(d_model / 16).
        max_seq_len: the longest sequence the trunk accepts (no positional tables: only a sanity bound).
        norm_eps: RMSNorm epsilon.
        dt_min, dt_max: the step sizes delta at init, log-uniform between them (mamba_ssm's defaults 0.001, 0.1).
            A channel whose delta stays near d forgets at rate d|A| per token: the smallest delta bounds how far
            back a freshly trained model can recall (BENCHMARKS.md, "Mamba at 16x: memory horizon and step
            selectivity").
    """

    supported_masks = ("causal",)

    def __init__(self, d_model: int = 256, n_layers: int = 4, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, max_seq_len: int = 1_000_000, norm_eps: float = 1e-5,
                 dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.n_layers, self.max_seq_len = d_model, n_layers, max_seq_len
        self._block_args = (d_model, d_state, d_conv, expand, dt_rank, norm_eps, dt_min, dt_max)
        self.blocks = nn.ModuleList(self.make_block() for _ in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)

    def make_block(self) -> MambaResidualBlock:
        """A fresh block of this trunk's kind and shape, initialised (used for multi-token heads)."""
        block = MambaResidualBlock(*self._block_args)
        # mamba_ssm's _init_weights: Linear biases zero (but dt_proj's), and the GPT-2 scheme for the residual
        # output projection: default (kaiming-uniform) init divided by sqrt(n_layers), one residual per block
        with torch.no_grad():
            for module in block.modules():
                if isinstance(module, nn.Linear) and module.bias is not None \
                        and not getattr(module.bias, "_no_reinit", False):
                    module.bias.zero_()
            block.mixer.out_proj.weight.div_(math.sqrt(self.n_layers))
        return block

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> MambaDecodingCache:
        return MambaDecodingCache([b.make_cache(batch_size, device, dtype, history) for b in self.blocks])

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: DecodingCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> hidden states [B, T, D], the trunk contract of models/transformer.py.

        mask: "causal" only (anything else is refused, naming it). cache: the T positions follow each row's
        cached ones. positions: accepted and unused (a recurrent scan has no position tables: order is the
        sequence's). padding_mask [B, T] bool, True = a real token: padding leaves the state unchanged (see
        MambaBlock.forward); padding at either end of a row, or, with a cache, after the real tokens only.
        branch: m > 0 returns (hidden states, the input of the last m blocks).
        """
        return recurrent_forward(self, x, mask, cache, padding_mask, "Mamba trunk", branch)
