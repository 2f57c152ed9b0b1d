"""A Mamba-2 trunk: the state-space duality (SSD) layer of Dao & Gu 2024 ("Transformers are SSMs: Generalized
Models and Efficient Algorithms Through Structured State Space Duality", arXiv:2405.21060).

Embeddings in, hidden states out, like every trunk (see models/transformer.py for the contract).

Mamba-2 restricts Mamba's A to a scalar times the identity per head, so that the whole recurrence of a head,
with X_t = dt_t x_t the head's input (P channels) and a_t = exp(dt_t A) its decay,

    h_t = a_t h_{t-1} + X_t B_t^T             (state h_t: P x N per head)
    y_t = h_t C_t + D x_t                     (SSD paper, eq. (2) with A_t = a_t I)

is one masked matrix product Y = (L o C B^T) X, with L[t, s] = a_{s+1} ... a_t for s <= t and 0 above the
diagonal (the "1-semiseparable" mask, SSD paper section 3). Computing that quadratic form for all of a long
sequence costs L^2; the chunked SSD algorithm (SSD paper section 6, Listing 1 in `ssd_minimal.py` of
state-spaces/mamba) cuts time into chunks of Q positions and splits the matrix into

1. the diagonal blocks: inside each chunk, Y_diag = (L_chunk o C B^T) X, a Q x Q masked matmul per chunk;
2. each chunk's own end state (starting from zero), S_c = sum_s (a_{s+1} ... a_end) X_s B_s^T, one matmul;
3. the inter-chunk recurrence over the chunks only, H_c = (a over chunk c-1) H_{c-1} + S_{c-1}: L/Q steps;
4. the off-diagonal part, Y_off = (a_start+1 ... a_t) C_t H_c, one matmul per chunk.

so that all the work but L/Q small elementwise steps is matrix products, which CPUs and GPUs are fast at. The
chunk size Q is a parameter; a length that Q does not divide is padded at the end with dt = 0 (decay 1, no
input), which leaves the final state exact.

The block (`mamba_ssm.modules.mamba2.Mamba2`, the defaults of the reference: d_state 128, headdim 64,
expand 2, A ~ U[1, 16], dt ~ log-uniform [1e-3, 1e-1]): one in_proj to (z, x, B, C, dt); a depthwise causal
conv over (x, B, C) and SiLU; B and C shared by the heads of each of `ngroups` groups (as keys and queries are
shared in multi-query attention); the SSD layer with the D skip; the gated RMSNorm norm(y * silu(z)) (per
group, norm before gate off, as the reference's default); out_proj. Parameter names and shapes are the
reference's (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), so state dicts move between the two.

Precision: under bf16 autocast the projections run in bf16, and so do the operands of the SSD's products
(C B^T, the masked product with X, the chunk states and C H; sums of at most Q, N or P terms, accumulated in
fp32 by oneDNN). Everything else of the SSD is fp32: the conv and SiLU before it, dt, dt A and its cumulative
sums, every decay exp(...) (a sum of log-decays loses its small terms in bf16's 8-bit mantissa, and an error in
a log-decay multiplies the state), the inter-chunk states H_c and the decoding state (running sums over the
whole sequence), the gradients, and the gated RMSNorm's statistics.

Speed on a CPU (`ChunkedSSD`, `Mamba2Block._whole_sequences`): the SSD's backward is written by hand and keeps
only the layer's inputs, the block runs long inputs in pieces of about a thousand positions so that its
elementwise steps work in the caches, and under `recompute` a piece's second run takes the SSD's output from the
first; BENCHMARKS.md has the training speed and memory against the transformer.

Where `mamba_ssm`'s Triton kernels are installed and the tensors live on a GPU, its fused
`mamba_chunk_scan_combined` computes the SSD layer instead (same equations); nothing needs it.

Decoding keeps, per block, the last d_conv conv inputs and the (H, P, N) state per row: O(1) time and memory
per token, in the Mamba trunk's cache (`models.mamba.MambaCache`: per-row `lengths`, the last `history`
states for `crop`, `snapshot` / `restore`, `fork`). A padding mask feeds the convolution zeros and sets dt = 0
at padded positions, so they neither decay nor write the state: left padding is exact, and in a cache each
row advances by its own real tokens.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from models.layers import RMSNorm
from models.mamba import MambaCache, MambaDecodingCache, causal_conv, check_causal_mask, recurrent_forward

try:  # the reference's fused Triton kernel, used as a drop-in where it is installed
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_ssm_chunk_scan
except Exception:  # ImportError, or a broken Triton install
    _mamba_ssm_chunk_scan = None

Mask = str | torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# the SSD layer
# ---------------------------------------------------------------------------------------------------------------


def within_chunk_decays(cum: torch.Tensor) -> torch.Tensor:
    """L[..., t, s] = exp(cum[t] - cum[s]) for s <= t, 0 above the diagonal: cum (..., Q) -> (..., Q, Q).

    The exponent is a difference of cumulative sums inside one chunk (at most Q terms), never positive on the
    kept triangle. Where no gradient flows through it (the SSD's own passes), the exponential runs in place on
    the whole square and the triangle above is zeroed after (what overflows there is discarded): on a CPU the
    exponential of the -inf fill takes a slow path and the whole took about 3x longer. Under autograd the
    triangle is filled with -inf first, so that no inf meets a zero gradient."""
    Q = cum.shape[-1]
    upper = torch.ones(Q, Q, dtype=torch.bool, device=cum.device).triu(1)
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)
    if diff.requires_grad:
        return torch.exp(diff.masked_fill(upper, -math.inf))
    return diff.exp_().masked_fill_(upper, 0.0)


class ChunkedSSD(torch.autograd.Function):
    """The chunked SSD core on chunk-shaped fp32 tensors, with a backward written out by hand.

    Inputs: X (b, c, Q, H, P), the heads' inputs times dt, time-major as the projections make them; cum
    (b, c, H, Q), the cumulative log-decays from each chunk's start; B, C (b, c, G, Q, N); h0 (b, H, P, N);
    `reuse`, None or a dict shared by the two runs of a recomputed piece (see `Mamba2Block._piece`): the first
    run leaves its outputs there and the second returns them instead of computing them again (the inputs are
    the same; only what the backward keeps is needed from the second run). Outputs: y (b, c, Q, H, P) and the
    final state (b, H, P, N).

    Why by hand: through autograd the four steps keep every Q x Q decay, masked score and chunk state for the
    backward and move them through a dozen elementwise kernels. Here the forward keeps only its inputs; the
    backward rebuilds the decays, scores and chunk-start states (one batched matmul and c small steps) and
    applies the chain rule in a few batched matmuls, the heads of a group folded into one matrix where they
    share B and C. Inside, a chunk's state is held transposed, (N, Hg*P) per group, the layout in which every
    product over the states reads contiguous operands (each such product 15-20% faster than with (Hg*P, N) in
    a CPU probe). Every gradient
    is checked against autograd through `ssd_reference` (tests/test_mamba2.py).
    """

    @staticmethod
    def forward(ctx, X, cum, B, C, h0, matmul_dtype=torch.float32, reuse=None):
        ctx.mm = mm = partial(matmul_in, matmul_dtype)
        ctx.save_for_backward(X, cum, B, C, h0)
        if reuse is not None and "y" in reuse:  # the checkpoint's second run: the first run's outputs
            reuse["spent"] = True
            return reuse.pop("y"), reuse.pop("last")
        y, last = ChunkedSSD._forward(mm, X, cum, B, C, h0)
        if reuse is not None and "spent" not in reuse:  # a later run (a retained graph's backward) keeps nothing
            reuse["y"], reuse["last"] = y.detach(), last.detach()
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dlast):
        X, cum, B, C, h0 = ctx.saved_tensors
        dlast = torch.zeros_like(h0) if dlast is None else dlast.float()
        return *ChunkedSSD._backward(ctx.mm, dy.contiguous(), dlast, X, cum, B, C, h0), None, None

    @staticmethod
    def _rebuild(mm, X, cum, B, C, h0):
        """What both passes need of a piece: the decays L (b, c, G, Hg, Q, Q), the scores C B^T (b, c, G, 1, Q,
        Q), the end weights exp(cum_end - cum) (b, c, Q, H, 1), the chunks' decays (b, c, G, 1, Hg, 1), their
        start states (b, c, G, N, Hg*P) and the final state (b, G, N, Hg*P), fp32."""
        b, c, Q, H, P = X.shape
        G, N = B.shape[2], B.shape[4]
        decays = within_chunk_decays(cum).view(b, c, G, H // G, Q, Q)
        scores = mm(C, B.transpose(-1, -2)).unsqueeze(3)
        to_end = torch.exp(cum[..., -1:] - cum).transpose(2, 3).unsqueeze(-1)
        chunk_decay = torch.exp(cum[..., -1]).view(b, c, G, 1, H // G, 1)
        # each chunk's own end state from zero, S_c = sum_s exp(cum_end - cum_s) B_s X_s^T: heads of a group
        # share B, so one (N x Q) @ (Q x Hg*P) product per chunk and group
        own = mm(B.transpose(-1, -2), grouped(X * to_end, G)).float()  # (b, c, G, N, Hg*P)
        # the recurrence between chunks, H_{i+1} = a_i H_i + S_i, in fp32 (a running sum over the sequence),
        # each state written straight into its slot (the copy per step took a tenth of the SSD's time, profiled)
        starts = torch.empty_like(own)
        starts[:, 0] = to_state_layout(h0, G)
        heads = (b, G, N, H // G, P)
        for i in range(c - 1):
            torch.addcmul(own[:, i].view(heads), starts[:, i].view(heads), chunk_decay[:, i],
                          out=starts[:, i + 1].view(heads))
        last = torch.addcmul(own[:, -1].view(heads), starts[:, -1].view(heads), chunk_decay[:, -1])
        return decays, scores, to_end, chunk_decay, starts, last.view_as(own[:, -1])

    @staticmethod
    def _forward(mm, X, cum, B, C, h0):
        b, c, Q, H, P = X.shape
        # the output first: it may outlive the piece (`reuse`), and allocated before the temporaries it leaves
        # glibc's heap less fragmented (peak RSS of a T=16384 step about 15% lower)
        out = torch.empty(X.shape, dtype=torch.float32, device=X.device)
        decays, scores, _, _, starts, last = ChunkedSSD._rebuild(mm, X, cum, B, C, h0)
        # diagonal blocks, per head: (C B^T o L) X
        y = mm((scores * decays).view(b, c, H, Q, Q), X.transpose(2, 3)).transpose(2, 3)
        # off-diagonal: exp(cum_t) C_t H_c, one (Q x N) @ (N x Hg*P) product per chunk and group
        from_start = torch.exp(cum).transpose(2, 3).unsqueeze(-1)  # (b, c, Q, H, 1)
        y_off = ungrouped(mm(C, starts), H)
        return torch.addcmul(y.float(), y_off, from_start, out=out), from_state_layout(last, H)

    @staticmethod
    def _backward(mm, dy, dlast, X, cum, B, C, h0):
        b, c, Q, H, P = X.shape
        G, N = B.shape[2], B.shape[4]
        decays, scores, to_end, chunk_decay, starts, _ = ChunkedSSD._rebuild(mm, X, cum, B, C, h0)
        # diagonal blocks: y_h = M_h X_h with M_h = (C B^T) o L_h
        dM = mm(dy.transpose(2, 3), X.transpose(2, 3).transpose(-1, -2)).view_as(decays)
        M = scores * decays
        dX = mm(M.view(b, c, H, Q, Q).transpose(-1, -2), dy.transpose(2, 3)).transpose(2, 3)
        dscores = (dM * decays).sum(3)  # (b, c, G, Q, Q)
        dlog = (dM * M).view(b, c, H, Q, Q)  # d/d(cum_t - cum_s) on the kept triangle
        dcum = dlog.sum(-1) - dlog.sum(-2)
        dC = mm(dscores, B).float()
        dB = mm(dscores.transpose(-1, -2), C).float()
        # off-diagonal: y_off_t = exp(cum_t) C_t H_c
        dy_scaled = dy * torch.exp(cum).transpose(2, 3).unsqueeze(-1)
        dC += mm(grouped(dy_scaled, G), starts.transpose(-1, -2))
        y_off = ungrouped(mm(C, starts), H)
        dcum += (dy_scaled * y_off).sum(-1).transpose(2, 3)
        dstarts = mm(C.transpose(-1, -2), grouped(dy_scaled, G)).float()  # (b, c, G, N, Hg*P)
        # the recurrence between chunks, backwards: the gradient of H_{i+1} (= that of chunk i's own state S_i)
        # is dH_{i+1} = dstarts_{i+1} + a_{i+1} dH_{i+2}, from dH_c = dlast; each written into its slot
        downs = torch.empty_like(dstarts)
        downs[:, -1] = to_state_layout(dlast, G)
        heads = (b, G, N, H // G, P)
        for i in range(c - 1, 0, -1):
            torch.addcmul(dstarts[:, i].view(heads), downs[:, i].view(heads), chunk_decay[:, i],
                          out=downs[:, i - 1].view(heads))
        dh0 = torch.addcmul(dstarts[:, 0].view(heads), downs[:, 0].view(heads), chunk_decay[:, 0])
        dchunk = (downs * starts).view(b, c, *heads[1:]).sum((3, 5))  # d/d a_i = <dH_{i+1}, H_i> per head
        dcum[..., -1] += (dchunk * chunk_decay.view_as(dchunk)).view(b, c, H)
        # the chunks' own end states: S_c = sum_s exp(cum_end - cum_s) B_s X_s^T
        dXw = ungrouped(mm(B, downs), H)  # (b, c, Q, H, P)
        dX = torch.addcmul(dX.float(), dXw, to_end)
        dB += mm(grouped(X * to_end, G), downs.transpose(-1, -2))
        dweight = ((dXw * X).sum(-1, keepdim=True) * to_end).squeeze(-1).transpose(2, 3)  # (b, c, H, Q)
        dcum -= dweight
        dcum[..., -1] += dweight.sum(-1)
        return dX, dcum, dB, dC, from_state_layout(dh0.view_as(downs[:, 0]), H)


def to_state_layout(h: torch.Tensor, G: int) -> torch.Tensor:
    """(b, H, P, N) -> (b, G, N, Hg*P), fp32: the per-group transposed layout `ChunkedSSD` holds states in."""
    b, H, P, N = h.shape
    return h.float().view(b, G, H // G, P, N).permute(0, 1, 4, 2, 3).reshape(b, G, N, (H // G) * P)


def from_state_layout(h: torch.Tensor, H: int) -> torch.Tensor:
    """(b, G, N, Hg*P) -> (b, H, P, N), the inverse of `to_state_layout`."""
    b, G, N, HgP = h.shape
    return h.view(b, G, N, H // G, HgP * G // H).permute(0, 1, 3, 4, 2).reshape(b, H, HgP * G // H, N)


def matmul_in(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with both operands and the product in `dtype`: under bf16 autocast the SSD's products take bf16
    (about 5x faster than fp32 on a CPU with AVX-512 bf16; oneDNN accumulates in fp32), and what sums them
    over chunks, the recurrence and the decays' gradients, stays fp32."""
    return torch.matmul(a.to(dtype), b.to(dtype))


def grouped(t: torch.Tensor, G: int) -> torch.Tensor:
    """(b, c, Q, H, P) -> (b, c, G, Q, Hg*P): the heads of each group side by side (a view when G = 1)."""
    b, c, Q, H, P = t.shape
    return t.reshape(b, c, Q, G, (H // G) * P).transpose(2, 3)


def ungrouped(t: torch.Tensor, H: int) -> torch.Tensor:
    """(b, c, G, Q, Hg*P) -> (b, c, Q, H, P), the inverse of `grouped`."""
    b, c, G, Q, HgP = t.shape
    return t.transpose(2, 3).reshape(b, c, Q, H, HgP * G // H)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, reuse: dict | None = None):
    """The chunked SSD algorithm: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, for every head.

    x (b, L, H, P); dt (b, L, H), positive (after softplus); A (H,), negative; B, C (b, L, G, N) with G dividing
    H (head h reads group h // (H / G)); initial_state (b, H, P, N) or None (zeros). Returns y (b, L, H, P) in
    x's dtype and the final state (b, H, P, N), fp32; in between everything is fp32 but the products' operands
    under autocast (`ChunkedSSD`; `reuse`: see there).
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise ValueError(f"{G} groups of B and C do not divide {H} heads")
    Q = chunk_size
    nc = max(1, -(-L // Q))
    pad = nc * Q - L
    matmul_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                    else torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        dt = dt.float()
        X = x.float() * dt.unsqueeze(-1)
        dA = dt * A.float()
        B, C = B.float(), C.float()
        if pad:  # dt = 0 on the padding: decay 1 and no input, so the final state is that of position L-1
            X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
            dA = F.pad(dA, (0, 0, 0, pad))
        cum = dA.view(b, nc, Q, H).transpose(2, 3).cumsum(-1)  # (b, c, H, Q): log-decay from the chunk start
        Bc, Cc = (t.view(b, nc, Q, G, N).transpose(2, 3).contiguous() for t in (B, C))
        h0 = X.new_zeros(b, H, P, N) if initial_state is None else initial_state.float()
        y, last = ChunkedSSD.apply(X.view(b, nc, Q, H, P), cum, Bc, Cc, h0, matmul_dtype, reuse)
    return y.reshape(b, nc * Q, H, P)[:, :L].to(x.dtype), last


def ssd_scan(x, dt, A, B, C, chunk_size: int = 64, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
             initial_states=None, return_final_states: bool = False, reuse: dict | None = None):
    """The SSD layer with the signature of `mamba_ssm`'s `mamba_chunk_scan_combined` (which runs instead on a GPU
    where it is installed).

    x (b, L, H, P); dt (b, L, H), through softplus(dt + dt_bias) when `dt_softplus` (else dt + dt_bias); A (H,);
    B, C (b, L, G, N); D (H,) or (H, P) skip; z (b, L, H, P): the output is multiplied by silu(z);
    initial_states (b, H, P, N). Returns y (b, L, H, P) in x's dtype, and the final state (b, H, P, N, fp32)
    when `return_final_states`. `reuse` (not in mamba_ssm's signature): see `ChunkedSSD`.
    """
    if _mamba_ssm_chunk_scan is not None and x.is_cuda:
        return _mamba_ssm_chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     initial_states=initial_states, return_final_states=return_final_states)
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    y, last = ssd_chunked(x, F.softplus(dt) if dt_softplus else dt, A, B, C, chunk_size, initial_states, reuse)
    if D is not None:
        y = y + x * (D.to(x.dtype).unsqueeze(-1) if D.dim() == 1 else D.to(x.dtype))
    if z is not None:
        y = y * F.silu(z)
    return (y, last) if return_final_states else y


def ssd_reference(x, dt, A, B, C, D=None, z=None, initial_states=None):
    """The same recurrence as a plain loop over time, in fp64 (for tests): h_t = exp(dt_t A) h_{t-1} +
    dt_t x_t B_t^T, y_t = h_t C_t + D x_t, times silu(z_t). Shapes as `ssd_scan` (dt already positive)."""
    b, L, H, P = x.shape
    G = B.shape[2]
    x, dt, A = x.double(), dt.double(), A.double()
    Bh, Ch = (t.double().repeat_interleave(H // G, dim=2) for t in (B, C))  # (b, L, H, N)
    h = x.new_zeros(b, H, P, B.shape[3]) if initial_states is None else initial_states.double()
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + x * (D.double().unsqueeze(-1) if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def ssd_states(x, dt, A, B, initial_state):
    """The state after every position of a short piece, in closed form:
    h_t = (a_1 ... a_t) h_0 + sum_{s <= t} (a_{s+1} ... a_t) X_s B_s^T.

    x (b, T, H, P); dt (b, T, H); A (H,); B (b, T, G, N); initial_state (b, H, P, N). Returns (T, b, H, P, N),
    fp32: T states, meant for the few positions that a decoding step or a speculative verification adds."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dt = dt.float()
    dA = (dt * A.float()).transpose(1, 2)  # (b, H, T)
    decay = within_chunk_decays(dA.cumsum(-1))  # (b, H, t, s)
    from_start = torch.exp(dA.cumsum(-1))  # (b, H, t)
    X = (x.float() * dt.unsqueeze(-1)).view(b, T, G, H // G, P)
    XB = torch.einsum("bsghp,bsgn->bsghpn", X, B.float()).reshape(b, T, H, P * N)  # X_s B_s^T per head
    h = torch.einsum("bhts,bshk->tbhk", decay, XB).view(T, b, H, P, N)
    return h + from_start.permute(2, 0, 1)[..., None, None] * initial_state.float().unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------------------------------------------


class Mamba2Cache(MambaCache):
    """Decoding state of one Mamba-2 block: the Mamba cache (ring of the last `history` states, crop, snapshot,
    restore) with a conv window over (x, B, C), (batch, conv_dim, d_conv), and the heads' states flattened to
    (batch, nheads * headdim, d_state) fp32."""

    def __init__(self, batch_size: int, conv_dim: int, d_inner: int, d_state: int, d_conv: int, device=None,
                 dtype=None, history: int = 64):
        super().__init__(batch_size, d_inner, d_state, d_conv, device, dtype, history)
        self.conv_state = self.conv_state.new_zeros(batch_size, conv_dim, d_conv)
        self._conv_ring = self.conv_state.new_zeros(history + 1, *self.conv_state.shape)


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)) * weight, the RMS taken over each of `ngroups` groups of channels, in fp32
    (`mamba_ssm.ops.triton.layernorm_gated.RMSNorm` with norm_before_gate=False)."""

    def __init__(self, dim: int, ngroups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.ngroups, self.eps = ngroups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        v = y.float() * F.silu(z.float())
        g = v.shape[-1] // self.ngroups
        v = F.rms_norm(v.unflatten(-1, (self.ngroups, g)), (g,), eps=self.eps).flatten(-2)
        return (v * self.weight.float()).to(y.dtype)


class Mamba2Block(nn.Module):
    """The Mamba-2 mixer (Dao & Gu 2024, Figure 6 right; `mamba_ssm.modules.mamba2.Mamba2`).

    Args:
        d_model: width of the block's input and output.
        d_state: state size N per head.
        d_conv: width of the depthwise causal convolution over (x, B, C).
        expand: d_inner = expand * d_model.
        headdim: channels P per head; nheads = d_inner / headdim.
        ngroups: groups of heads that share B and C (1: all heads share them).
        chunk_size: positions Q per chunk of the SSD algorithm (need not divide the length).
        A_init_range: A = -U[lo, hi] per head.
        dt_min, dt_max, dt_init_floor: dt at init, log-uniform in [dt_min, dt_max] (through dt_bias).
        conv_bias, bias: biases of the convolution and of the projections.
        norm_eps: epsilon of the gated RMSNorm.
        recompute: in training, keep only each piece's input and the SSD's output, and rerun the rest of the
            piece in the backward (less memory for a second run of the projections, conv and norms; see `_piece`).
            Off by default: the SSD layer keeps only its inputs anyway.
        piece_tokens: on a CPU, the whole-sequence path runs in pieces of about this many positions (see
            `_whole_sequences`); the result does not depend on it.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, norm_eps: float = 1e-5, recompute: bool = False, piece_tokens: int = 1024):
        super().__init__()
        d_inner = expand * d_model
        self.recompute, self.piece_tokens = recompute, piece_tokens
        if d_inner % headdim:
            raise ValueError(f"headdim {headdim} does not divide d_inner = expand * d_model = {d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups {ngroups} does not divide the {nheads} heads (d_inner {d_inner} / headdim "
                             f"{headdim})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.d_model, self.d_state, self.d_conv, self.d_inner = d_model, d_state, d_conv, d_inner
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)  # z,x,B,C,dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, ngroups, norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init = (A_init_range, dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        (lo, hi), dt_min, dt_max, floor = self._init
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(lo, hi)))
        self.D.fill_(1.0)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> Mamba2Cache:
        p = self.in_proj.weight
        return Mamba2Cache(batch_size, self.conv_dim, self.d_inner, self.d_state, self.d_conv, device or p.device,
                           dtype or p.dtype, history)

    def forward(self, u: torch.Tensor, cache: Mamba2Cache | None = None,
                padding_mask: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """u (b, T, d_model) -> (b, T, d_model); with a cache, u holds the T positions after cache.length.
        padding_mask (b, T) bool, True at real tokens: padded positions leave the state as it was (dt = 0).
        norm: the residual block's pre-norm, applied to u first (inside the recomputed pieces, see `_piece`)."""
        b, T, _ = u.shape
        H = self.nheads
        if T == 0:
            return self.out_proj(u.new_zeros(b, 0, self.d_inner))
        if cache is None and padding_mask is None:
            return self._whole_sequences(u, norm)
        u = u if norm is None else norm(u)
        if cache is not None and T == 1:
            return self.step(u, cache, padding_mask)
        z, xBC_raw, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, H], dim=-1)
        if padding_mask is not None:  # padded positions feed the convolution zeros, as before a sequence starts
            xBC_raw = xBC_raw * padding_mask.to(xBC_raw.dtype).unsqueeze(-1)
        before = None if cache is None else cache.conv_state[:, :, 1:].transpose(1, 2)
        x, B, C = self._conv_and_split(xBC_raw, before)
        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, T, H), fp32
        if padding_mask is not None:
            dt = dt * padding_mask.to(dt.dtype).unsqueeze(-1)
        if cache is None:
            y, _ = ssd_chunked(x, dt, A, B, C, self.chunk_size)
        else:
            y = self._cached_ssd(x, dt, A, B, C, xBC_raw, cache, padding_mask)
        y = y + x * self.D.to(x.dtype).unsqueeze(-1)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _conv_and_split(self, xBC_raw: torch.Tensor, before: torch.Tensor | None):
        """Conv and SiLU over (x, B, C), in fp32 (what the SSD computes in), split into x (b, T, H, P) and B, C
        (b, T, G, N). `before`: the d_conv - 1 raw inputs before these (b, d_conv - 1, conv_dim), or None."""
        xBC = F.silu(causal_conv(xBC_raw.float(), self.conv1d, before))
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, -1)), \
            C.unflatten(-1, (self.ngroups, -1))

    def _whole_sequences(self, u: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The block over whole sequences (training, scoring, a prefill without cache), on a CPU in pieces of
        about `piece_tokens` positions: several rows at a time, or runs of one row's positions that pass the
        conv inputs and the SSD state on to the next run. The result is that of one pass; but every elementwise
        step (conv, SiLU, the SSD's decays, the norm) then works on tensors that fit in the caches, where on 4 x
        4096 positions at once they ran several times slower per element than on 1 x 4096."""
        b, T, _ = u.shape
        if u.is_cuda or b * T <= self.piece_tokens:
            return self._piece(u, None, None, norm)[0]
        rows = max(1, self.piece_tokens // T)
        span = T if rows > 1 else max(self.chunk_size, self.piece_tokens // self.chunk_size * self.chunk_size)
        outs = []
        for r in range(0, b, rows):
            before = state = None
            for t in range(0, T, span):
                out, before, state = self._piece(u[r:r + rows, t:t + span], before, state, norm)
                outs.append(out)
        return torch.cat(outs, 1).view(b, T, -1) if rows == 1 else torch.cat(outs, 0)

    def _piece(self, u: torch.Tensor, before: torch.Tensor | None, state: torch.Tensor | None,
               norm: nn.Module | None):
        """One piece of `_whole_sequences`, after `before` (the raw conv inputs before it) and `state` (the SSD
        state before it): its output, its last d_conv - 1 raw conv inputs and its final state. The residual
        block's pre-norm `norm` runs inside, so that with `recompute` its output is not kept either.

        With `recompute` the piece keeps its input and the SSD's output (2 KiB per position at d_inner 512, fp32):
        the backward reruns the projections, the conv and the norms, but takes the SSD's output from the first
        run (`ChunkedSSD`'s `reuse`) rather than running the SSD's forward a second time (on a CPU the SSD's
        forward is about a third of a block's); its own backward rebuilds what it needs from its inputs. (Where
        mamba_ssm's GPU kernel computes the SSD, there is no reuse and the SSD runs twice.)"""
        if self.recompute and torch.is_grad_enabled():  # keep the inputs and the SSD's output; rerun the rest
            return checkpoint(self._piece_outputs, u, before, state, norm, {}, use_reentrant=False)
        return self._piece_outputs(u, before, state, norm)

    def _piece_outputs(self, u, before, state, norm, reuse=None):
        u = u if norm is None else norm(u)
        z, xBC_raw, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        x, B, C = self._conv_and_split(xBC_raw, before)
        y, last = ssd_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size, D=self.D,
                           dt_bias=self.dt_bias, dt_softplus=True, initial_states=state, return_final_states=True,
                           reuse=reuse)
        # the next piece's conv inputs before it, copied: the checkpoint of the next piece keeps it, and a view
        # would keep this piece's whole projection alive with it
        tail = xBC_raw[:, -(self.d_conv - 1):]
        if before is not None and tail.shape[1] < self.d_conv - 1:  # a piece shorter than the window
            tail = torch.cat([before.to(xBC_raw.dtype), xBC_raw], 1)[:, -(self.d_conv - 1):]
        tail = tail.clone(memory_format=torch.contiguous_format)
        return self.out_proj(self.norm(y.flatten(-2), z)), tail, last

    def step(self, u: torch.Tensor, cache: Mamba2Cache, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step, u (b, 1, d_model), O(1) in the length: h = exp(dt A) h + dt x B^T, y = h C + D x
        per head (SSD paper, eq. (2)). A row whose padding_mask is False keeps its state and length."""
        b = u.shape[0]
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = torch.split(self.in_proj(u[:, 0]), [self.d_inner, self.conv_dim, H], dim=-1)
        conv = torch.cat([cache.conv_state[:, :, 1:], xBC.unsqueeze(-1).to(cache.conv_state.dtype)], dim=2)
        xBC = (conv.to(xBC.dtype) * self.conv1d.weight[:, 0].to(xBC.dtype)).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias.to(xBC.dtype)
        x, B, C = torch.split(F.silu(xBC), [self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, H)
        if padding_mask is not None:
            dt = dt * padding_mask[:, :1]
            conv = torch.where(padding_mask[:, :1, None], conv, cache.conv_state)
        x = x.float().view(b, H, P)
        Bh, Ch = (t.float().view(b, G, 1, N).expand(b, G, H // G, N).reshape(b, H, N) for t in (B, C))
        h = cache.ssm_state.view(b, H, P, N) * torch.exp(dt * -torch.exp(self.A_log.float()))[..., None, None]
        h = h + (dt[..., None] * x).unsqueeze(-1) * Bh.unsqueeze(2)
        y = torch.matmul(h, Ch.unsqueeze(-1)).squeeze(-1) + self.D.float()[:, None] * x  # (b, H, P)
        advance = torch.ones_like(cache.lengths) if padding_mask is None else padding_mask[:, 0].long()
        h = h.flatten(1, 2)
        cache._advance(advance, conv, h, conv.unsqueeze(0), h.detach().unsqueeze(0), 1, full=padding_mask is None)
        return self.out_proj(self.norm(y.flatten(1).to(u.dtype), z)).unsqueeze(1)

    def _cached_ssd(self, x, dt, A, B, C, xBC_raw, cache: Mamba2Cache, padding_mask) -> torch.Tensor:
        """The SSD from the cache's state, advancing the cache: the chunked algorithm over all but the last
        `keep` positions, then the closed form over those, whose states the cache keeps for crop(). With a
        padding mask (padding after each row's real tokens), row b advances by its real tokens only."""
        b, T, H, P = x.shape
        keep = min(T, cache.history + 1)
        h0 = cache.ssm_state.view(b, H, P, self.d_state)
        ys = []
        if T > keep:
            y, h0 = ssd_chunked(x[:, :T - keep], dt[:, :T - keep], A, B[:, :T - keep], C[:, :T - keep],
                                self.chunk_size, h0)
            ys.append(y)
        states = ssd_states(x[:, T - keep:], dt[:, T - keep:], A, B[:, T - keep:], h0)  # (keep, b, H, P, N)
        Cg = C[:, T - keep:].float().repeat_interleave(H // self.ngroups, dim=2)  # (b, keep, H, N)
        ys.append(torch.einsum("tbhpn,bthn->bthp", states, Cg).to(x.dtype))
        advance, conv, conv_tail = cache.conv_windows(xBC_raw, padding_mask, keep)
        cache._advance(advance, conv, states[-1].flatten(1, 2), conv_tail, states.detach().flatten(2, 3), T,
                       full=padding_mask is None)
        return torch.cat(ys, 1)


class Mamba2ResidualBlock(nn.Module):
    """x + Mamba2Block(RMSNorm(x)): the pre-norm residual block of the Mamba-2 trunk."""

    def __init__(self, d_model: int, norm_eps: float = 1e-5, **mixer_args):
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)
        self.mixer = Mamba2Block(d_model, norm_eps=norm_eps, **mixer_args)

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: Mamba2Cache | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_causal_mask(mask, "Mamba-2 block")
        return x + self.mixer(x, cache=cache, padding_mask=padding_mask, norm=self.norm)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> Mamba2Cache:
        return self.mixer.make_cache(batch_size, device, dtype, history)


class Mamba2(nn.Module):
    """The Mamba-2 trunk (Dao & Gu 2024): a pre-norm residual stack of Mamba-2 blocks and a final RMSNorm.

    Args:
        d_model: width of the hidden states.
        n_layers: number of blocks.
        d_state: SSM state size N per head (the reference uses 64 or 128).
        d_conv: width of the depthwise causal convolution.
        expand: d_inner = expand * d_model.
        headdim: channels per head (64 in the reference); nheads = d_inner / headdim.
        ngroups: groups of heads sharing B and C.
        chunk_size: positions per chunk of the SSD algorithm (64 here, untuned; the reference's GPU kernels
            use 256). Any size works; one that does not divide the length pads the last chunk.
        max_seq_len: the longest sequence the trunk accepts (no positional tables: only a sanity bound).
        norm_eps: RMSNorm epsilon.
        recompute: rerun each block in the backward instead of keeping its activations (see Mamba2Block).
        piece_tokens: positions per piece of the blocks' whole-sequence path on a CPU (see Mamba2Block).
    """

    supported_masks = ("causal",)

    def __init__(self, d_model: int = 256, n_layers: int = 4, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, ngroups: int = 1, chunk_size: int = 64, max_seq_len: int = 1_000_000,
                 norm_eps: float = 1e-5, recompute: bool = False, piece_tokens: int = 1024):
        super().__init__()
        self.d_model, self.n_layers, self.max_seq_len = d_model, n_layers, max_seq_len
        self._block_args = dict(d_model=d_model, norm_eps=norm_eps, d_state=d_state, d_conv=d_conv, expand=expand,
                                headdim=headdim, ngroups=ngroups, chunk_size=chunk_size, recompute=recompute,
                                piece_tokens=piece_tokens)
        self.blocks = nn.ModuleList(self.make_block() for _ in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)

    def make_block(self) -> Mamba2ResidualBlock:
        """A fresh block of this trunk's kind and shape, initialised (used for multi-token heads)."""
        block = Mamba2ResidualBlock(**self._block_args)
        with torch.no_grad():  # the reference's init: residual output projections scaled by 1/sqrt(n_layers)
            block.mixer.out_proj.weight.div_(math.sqrt(self.n_layers))
        return block

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> MambaDecodingCache:
        return MambaDecodingCache([b.make_cache(batch_size, device, dtype, history) for b in self.blocks])

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: MambaDecodingCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) -> hidden states (B, T, d_model). `positions` is accepted for the trunk contract and
        unused (a recurrence has no positional encoding); `padding_mask` (B, T) True at real tokens: padding
        at either end of a row, or, with a cache, after each row's real tokens only (row b advances by its own).
        `branch` = m > 0: (hidden states, the input of the last m blocks)."""
        return recurrent_forward(self, x, mask, cache, padding_mask, "Mamba-2 trunk", branch)
