"""The selective scan of Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752), the kernel under `models.mamba`'s block.

The selective scan (Gu & Dao 2023, section 3.2 and Algorithm 2), per channel d and state index n:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (zero-order-hold A, simplified Euler B)
    y_t = C_t . h_t + D * u_t
    y_t = y_t * silu(z_t)                                          (the gate of the Mamba block)

`selective_scan` has the signature and semantics of `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`
and hands over to it where `mamba_ssm` is installed and the tensors live on a GPU. Otherwise it runs a pure-PyTorch
chunked scan (fp32, or fp64 for fp64 inputs) with a hand-written backward:

* time is cut into chunks of K steps (K = 8); within a chunk the recurrence runs for the K positions *for every
  chunk at once* (one vectorised op per position over all chunks), starting from a zero state, while the
  cumulative decay of each position since its chunk start, exp(delta_1 A + ... + delta_k A), is kept alongside
  as a running product;
* a short loop over the chunks carries the state across chunk boundaries (h_start of chunk c+1 = cumulative
  decay of chunk c times h_start of chunk c plus its zero-start end state);
* every position then adds its cumulative decay times the state its chunk started from.

Every decay in the scan is a product of per-step factors exp(delta_t A) <= 1 (for delta >= 0, A <= 0): nothing
is ever divided by a decay and no exponential of a large positive number is formed, so the scan is as stable
as the sequential recurrence for any delta, however long the sequence (and as accurate: the same products
of the same per-step factors). Each exp(delta_t A) is formed once; no (K x K x N) segment sums, no division
by a cumulative decay (whose exp(-cumsum) overflows fp32 after ~88 nats of decay).

The chunks are processed in segments of M >= 4 chunks, the (K, batch, M, N, dim) working set sized to stay in
cache on CPU (fresh large buffers page-fault and spill); a segment hands its last state to the next. That is
about L (1/M + 1/K) Python-level steps instead of L, each op covering M positions x batch x N x dim elements.
Where even M = 4 chunks of the whole batch would not fit (many short rows: MQAR's 64 x 64), the rows go through
the scan in slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the CUDA kernel of the reference implementation, used as a drop-in where it is installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_ssm_kernel
except Exception:  # ImportError, or a broken CUDA extension
    mamba_ssm_kernel = None

LOG2E = 1.4426950408889634
CHUNK = 8  # positions per chunk of the pure-PyTorch scan
SEGMENT_ELEMENTS = 1 << 19  # target size of one segment's (K, batch, chunks, N, dim) buffers on CPU (in cache)
SEGMENT_ELEMENTS_CUDA = 1 << 25  # a GPU wants fewer, larger kernels
MIN_CHUNKS = 4  # chunks per segment at least: each op of the in-chunk loop covers >= 4 positions


# ---------------------------------------------------------------------------------------------------------------
# the selective scan
# ---------------------------------------------------------------------------------------------------------------


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The selective scan of Gu & Dao 2023 as a plain sequential loop over time (for tests and benchmarks).

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t h_t + D u_t ;  y_t *= silu(z_t).

    Shapes as `mamba_ssm`'s `selective_scan_ref`: u, delta, z (batch, dim, L); A (dim, N); B, C (dim, N) constant,
    (batch, N, L) time-varying, or (batch, G, N, L) time-varying in G groups (channel d reads group d // (dim / G));
    D, delta_bias (dim,). Computed in fp32 (fp64 for fp64 inputs); returns (batch, dim, L) in u's dtype, and the
    final state (batch, dim, N) when `return_last_state`.
    """
    dtype_in = u.dtype
    cd = _compute_dtype(u, delta, A, B, C)
    u, delta, A = u.to(cd), delta.to(cd), A.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    B, C = _per_channel(B.to(cd), dim), _per_channel(C.to(cd), dim)  # (dim, N) or (batch, dim, N, L)
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, L, N)
    if B.dim() == 2:
        deltaB_u = (delta * u).unsqueeze(-1) * B[:, None, :]
    else:
        deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(2, 3)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        if C.dim() == 2:
            ys.append((h * C).sum(-1))
        else:
            ys.append(torch.einsum("bdn,bdn->bd", h, C[..., t]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The selective scan of Gu & Dao 2023, a drop-in for `mamba_ssm`'s `selective_scan_fn`.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t h_t + D u_t ;  y_t *= silu(z_t)
    with delta <- softplus(delta + delta_bias) when `delta_softplus` (else delta + delta_bias).

    Args:
        u, delta: (batch, dim, L).
        A: (dim, N), real (S4D-real: negative). Complex A (S4D-lin) is not supported off the CUDA kernel.
        B, C: (dim, N) constant over time, (batch, N, L) time-varying (selective), or (batch, G, N, L)
            time-varying in G groups, G dividing dim: channel d reads group d // (dim / G) (Mamba-2 and hybrid
            checkpoints share B and C across the channels of a group; G = 1 is the (batch, N, L) case).
        D: (dim,) skip connection, optional.
        z: (batch, dim, L) gate, optional: the output is multiplied by silu(z).
        delta_bias: (dim,), optional.
        delta_softplus: apply softplus to delta (after adding delta_bias).
        return_last_state: also return the state after the last step, (batch, dim, N).

    Returns (batch, dim, L) in u's dtype (and the last state, fp32). On CUDA with `mamba_ssm` installed its
    kernel runs; otherwise the chunked pure-PyTorch scan of this module (fp32; fp64 for fp64 inputs).
    """
    if mamba_ssm_kernel is not None and u.is_cuda:
        return mamba_ssm_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                            return_last_state)
    if A.is_complex():
        raise NotImplementedError("the pure-PyTorch selective scan supports real A only (complex A, S4D-lin, needs "
                                  "mamba_ssm's CUDA kernel): pass A as a real (dim, N) tensor")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (2, 3, 4):
            raise ValueError(f"selective_scan takes {name} as (dim, N), (batch, N, L) or (batch, G, N, L); got "
                             f"shape {tuple(t.shape)}")
    groups = max(t.shape[1] if t.dim() == 4 else 1 for t in (B, C))
    if groups > 1:  # the groups are independent scans over their channels
        return _grouped_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, groups)
    B, C = (t[:, 0] if t.dim() == 4 else t for t in (B, C))  # one group given as (batch, 1, N, L)
    tm = _time_major  # (batch, c, L) -> (batch, L, c): the scan works time-major and y comes back
    y, last, _ = _SelectiveScan.apply(tm(u), tm(delta), A, tm(B) if B.dim() == 3 else B,
                                      tm(C) if C.dim() == 3 else C, D, None if z is None else tm(z), delta_bias,
                                      delta_softplus, None, 0)
    out = _channel_major(y)
    return (out, last.transpose(1, 2)) if return_last_state else out


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (dim, N) constant or (batch, dim, N, L): a group's (N, L) repeated for each of its channels."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if dim % t.shape[1]:
        raise ValueError(f"{t.shape[1]} groups of B/C do not divide the {dim} channels")
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def _grouped_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, groups):
    """`selective_scan` with B and/or C in `groups` groups: the scan of each group's channels on its own."""
    dim = u.shape[1]
    if dim % groups:
        raise ValueError(f"{groups} groups of B/C do not divide the {dim} channels of u")
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 4 and t.shape[1] != groups:
            raise ValueError(f"B and C have different numbers of groups ({name}: {t.shape[1]}, the other {groups})")
    H = dim // groups
    part = lambda t, g: None if t is None else t[g * H:(g + 1) * H]  # noqa: E731  per-channel parameters
    outs = []
    for g in range(groups):
        cs = slice(g * H, (g + 1) * H)
        Bg, Cg = (t[:, g] if t.dim() == 4 else (t[cs] if t.dim() == 2 else t) for t in (B, C))
        outs.append(selective_scan(u[:, cs], delta[:, cs], A[cs], Bg, Cg, part(D, g),
                                   None if z is None else z[:, cs], part(delta_bias, g), delta_softplus, True))
    out = torch.cat([o for o, _ in outs], dim=1)
    return (out, torch.cat([s for _, s in outs], dim=1)) if return_last_state else out


def selective_scan_time_major(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, keep_states: int = 0):
    """`selective_scan` on time-major tensors, the layout the Mamba block works in (no transposes).

    u, delta, z: (batch, L, dim); B, C: (batch, L, N) or (dim, N); A: (dim, N); D, delta_bias: (dim,);
    initial_state: (batch, dim, N) or None (zeros). Returns (y (batch, L, dim) in u's dtype, last state
    (batch, dim, N) in the compute dtype, states of the last `keep_states` positions (keep, batch, dim, N) or
    None). Differentiable in every tensor argument (the kept states are not).
    """
    h0 = None if initial_state is None else initial_state.transpose(1, 2)
    y, last, kept = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, keep_states)
    kept = None if keep_states <= 0 else kept.transpose(2, 3)
    return y, last.transpose(1, 2), kept


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _Transpose12(torch.autograd.Function):
    """(b, x, y) -> (b, y, x) contiguous. PyTorch copies a 3-D transpose element by element but has a fast
    2-D transpose, so go batch by batch (about 10x faster on CPU for (2, 512, 1024))."""

    @staticmethod
    def forward(ctx, x):
        return _transpose12(x)

    @staticmethod
    def backward(ctx, g):
        return _transpose12(g)


def _transpose12(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for i in range(x.shape[0]):
        out[i].copy_(x[i].t())
    return out


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """(batch, c, L) -> (batch, L, c); free when x is already a transposed view of time-major data."""
    t = x.transpose(1, 2)
    return t if t.is_contiguous() else _Transpose12.apply(x)


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """(batch, L, c) -> contiguous (batch, c, L)."""
    return _Transpose12.apply(x)


def _chunk_length(L: int) -> int:
    """K: CHUNK positions, or the power of two at or above L when the scan is shorter."""
    return min(CHUNK, 1 << max(L - 1, 0).bit_length())


def _segments(b: int, L: int, n: int, d: int, cuda: bool = False) -> tuple[int, int, int, int]:
    """(chunk length K, chunks per segment M, number of segments, padded length) for a scan of this shape.

    Python-level steps: K - 1 + M per segment, i.e. about L (1/M + 1/K) in all."""
    K = _chunk_length(L)
    chunks = -(-L // K)
    M = (SEGMENT_ELEMENTS_CUDA if cuda else SEGMENT_ELEMENTS) // (b * n * d * K)
    M = max(1, min(chunks, max(M, MIN_CHUNKS)))
    nseg = -(-chunks // M)
    return K, M, nseg, nseg * M * K


def _to_segments(x: torch.Tensor, Lp: int, nseg: int, K: int, M: int) -> torch.Tensor:
    """Time-major (b, L, c) -> (nseg, K, b, M, c): segment s, step k of chunk m is time s*M*K + m*K + k."""
    b, L, c = x.shape
    if Lp > L:
        x = F.pad(x, (0, 0, 0, Lp - L))
    return x.reshape(b, nseg, M, K, c).permute(1, 3, 0, 2, 4).contiguous()


def _from_segments(x: torch.Tensor, L: int) -> torch.Tensor:
    """(nseg, K, b, M, c) -> time-major (b, L, c)."""
    nseg, K, b, M, c = x.shape
    return x.permute(2, 0, 3, 1, 4).reshape(b, nseg * M * K, c)[:, :L]


class _SelectiveScan(torch.autograd.Function):
    """The whole selective scan on time-major tensors, with a backward that rebuilds what it needs:

        delta = softplus(delta_raw + bias);  h_t = exp(delta_t A) h_{t-1} + (delta u)_t B_t;
        out_t = (C_t . h_t + D u_t) * silu(z_t)

    u, delta_raw, z: (b, L, d); A: (d, N); B, C: (b, L, N) or (d, N); D, bias: (d,) or None; h0: (b, N, d) or
    None. Returns out (b, L, d) in u's dtype, the last state (b, N, d) and the states of the last `keep`
    positions (keep, b, N, d). Internally states are laid out (..., N, d) so that the contractions over N are
    fast matrix products.

    Memory: the forward saves only its inputs as they came (bf16 under autocast: u, delta_raw and z are
    activations the block keeps anyway) and the state at each segment start. The backward recomputes delta,
    delta * u, the states segment by segment and the scan's output (one matmul per segment, for the gate's
    gradient), instead of keeping about seven fp32 (b, L, d) tensors per block from the forward to the backward.
    """

    @staticmethod
    def forward(ctx, u, delta_raw, A, B, C, D, z, delta_bias, softplus, h0, keep):
        ctx.device_type = u.device.type
        with torch.autocast(u.device.type, enabled=False):  # fp32 (or fp64) throughout, whatever the autocast
            cd = _compute_dtype(u, delta_raw, A, B, C)
            delta, _ = _step_sizes(delta_raw, delta_bias, softplus, cd)
            uc = u.to(cd)
            y, last, kept, starts = _scan_forward(delta, delta * uc, A.to(cd), B.to(cd), C.to(cd),
                                                  None if h0 is None else h0.to(cd), keep)
            out = _gate(y, uc, D, z, cd)
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, starts)
        ctx.softplus, ctx.has_h0 = softplus, h0 is not None
        ctx.mark_non_differentiable(kept)
        return out.to(u.dtype), last, kept

    @staticmethod
    def backward(ctx, g_out, g_last, _g_kept):
        u, delta_raw, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        with torch.autocast(ctx.device_type, enabled=False):
            cd = _compute_dtype(u, delta_raw, A, B, C)
            delta, slope = _step_sizes(delta_raw, delta_bias, ctx.softplus, cd)  # slope: d delta / d delta_raw
            uc = u.to(cd)
            g = g_out.to(cd) if g_out is not None else uc.new_zeros(uc.shape)
            sz = None if z is None else F.silu(z.to(cd))
            g_pre = g if sz is None else g * sz  # gradient of the scan's output plus the skip
            g_delta, g_du, g_A, g_B, g_C, g_h0, y = _scan_backward(
                delta, delta * uc, A.to(cd), B.to(cd), C.to(cd), starts, ctx.has_h0, g_pre, g_last,
                want_y=z is not None)
            g_D = None if D is None else (g_pre * uc).sum((0, 1)).to(D.dtype)
            g_u = g_du * delta
            if D is not None:
                g_u.addcmul_(g_pre, D.to(cd))
            g_delta.addcmul_(g_du, uc)
            del g_du
            g_z = None
            if z is not None:
                if D is not None:
                    y.addcmul_(uc, D.to(cd))
                zc = z.to(cd)
                sig = torch.sigmoid(zc)
                g_z = (g * y * sig * (1 + zc * (1 - sig))).to(z.dtype)  # d silu(z) / dz = s (1 + z (1 - s))
            g_raw = g_delta if slope is None else g_delta.mul_(slope)
            g_bias = None if delta_bias is None else g_raw.sum((0, 1)).to(delta_bias.dtype)
        return (g_u.to(u.dtype), g_raw.to(delta_raw.dtype), g_A.to(A.dtype), g_B.to(B.dtype), g_C.to(C.dtype), g_D,
                g_z, g_bias, None, g_h0, None)


def _step_sizes(delta_raw, delta_bias, softplus, cd):
    """(delta, d delta / d delta_raw or None): delta_raw + delta_bias, through softplus when asked."""
    x = delta_raw.to(cd)
    if delta_bias is not None:
        x = x + delta_bias.to(cd)
    if not softplus:
        return x, None
    return F.softplus(x), torch.sigmoid(x)


def _gate(y, u, D, z, cd):
    """(y + D u) * silu(z), in place on y."""
    if D is not None:
        y.addcmul_(u, D.to(cd))
    if z is not None:
        y.mul_(F.silu(z.to(cd)))
    return y


def _rows_per_slice(b: int, L: int, n: int, d: int, cuda: bool = False) -> int:
    """Batch rows the scan works on at a time: on a CPU, as many as keep a segment of MIN_CHUNKS chunks within
    SEGMENT_ELEMENTS (rows are independent scans). A batch of 64 short MQAR rows at d_inner 256 made every
    (K, b, M, N, d) buffer 33 MB at once, 16x the target: the scan then ran at memory speed and spent a tenth of
    its time zero-filling fresh pages (a Mamba block's forward+backward 2x slower than in slices)."""
    if cuda:
        return b
    return max(1, min(b, SEGMENT_ELEMENTS // (n * d * _chunk_length(L) * MIN_CHUNKS)))


def _scan_forward(delta, du, A, B, C, h0, keep):
    """`_scan_slice_forward` over slices of the batch's rows (`_rows_per_slice`), joined."""
    b, L, d = du.shape
    rows = _rows_per_slice(b, L, A.shape[1], d, du.is_cuda)
    if rows >= b:
        return _scan_slice_forward(delta, du, A, B, C, h0, keep)
    parts = [_scan_slice_forward(delta[r:r + rows], du[r:r + rows], A, _rows(B, r, rows), _rows(C, r, rows),
                                 None if h0 is None else h0[r:r + rows], keep, rows) for r in range(0, b, rows)]
    y, last, kept, starts = zip(*parts)
    return torch.cat(y), torch.cat(last), torch.cat(kept, 1), torch.cat(starts, 1)


def _rows(t: torch.Tensor, r: int, rows: int) -> torch.Tensor:
    """Rows r .. r+rows of a time-varying B or C (b, L, N); a constant (d, N) one as it is."""
    return t[r:r + rows] if t.dim() == 3 else t


def _scan_slice_forward(delta, du, A, B, C, h0, keep, slice_rows=None):
    """The chunked scan h_t = exp(delta_t A) h_{t-1} + du_t B_t, y_t = C_t . h_t (time-major; see the module
    docstring), its segments sized for `slice_rows` rows (default: these), so that every slice of a batch has as
    many segment starts. Returns y (b, L, d), the last state (b, N, d), the states of the last `keep` positions
    (keep, b, N, d) and the state each segment starts from (nseg, b, N, d), which is all the backward keeps."""
    b, L, d = du.shape
    N = A.shape[1]
    h = du.new_zeros(b, N, d) if h0 is None else h0.contiguous()
    if L == 0:
        return du.new_zeros(b, 0, d), h.clone(), du.new_empty(0, b, N, d), h.new_empty(0, b, N, d)
    K, M, nseg, Lp = _segments(slice_rows or b, L, N, d, du.is_cuda)
    A2 = (A * LOG2E).t().contiguous()  # (N, d): exp(delta A) = exp2(delta A log2 e), and exp2 is faster
    ds = _to_segments(delta, Lp, nseg, K, M)
    dus = _to_segments(du, Lp, nseg, K, M)
    Bs = _to_segments(B, Lp, nseg, K, M) if B.dim() == 3 else B.t().contiguous()
    Cs = _to_segments(C, Lp, nseg, K, M) if C.dim() == 3 else C.t().contiguous()
    ys = du.new_empty(nseg, K, b, M, d)
    starts_all = []  # the state each segment starts from, for the backward pass
    keep = min(keep, L)
    kept = du.new_empty(max(keep, 0), b, N, d)
    # working buffers reused by every segment: fresh large allocations are slow (page faults)
    dA, tmp = du.new_empty(K, b, M, N, d), du.new_empty(K, b, M, N, d)
    HG, starts = du.new_empty(2, K, b, M, N, d), du.new_empty(b, M + 1, N, d)
    for s in range(nseg):
        starts_all.append(h)
        h = _segment_states(ds[s], dus[s], A2, Bs[s] if B.dim() == 3 else Bs, dA, HG, starts, h)
        _outputs(HG[0], Cs[s] if C.dim() == 3 else Cs, ys[s], tmp)
        if keep > 0:
            _collect(kept, HG[0], s, K, M, L, keep)
    return _from_segments(ys, L), h, kept, torch.stack(starts_all)


def _outputs(H, Cseg, out, tmp):
    """y = C . h for one segment's states H (K, b, M, N, d): Cseg (K, b, M, N) or (N, d) constant."""
    if Cseg.dim() == 4:
        torch.matmul(Cseg.unsqueeze(-2), H, out=out.unsqueeze(-2))
    else:
        torch.sum(torch.mul(H, Cseg, out=tmp), dim=-2, out=out)


def _scan_backward(delta, du, A, B, C, seg_starts, has_h0, gy, glast, want_y=False):
    """Gradients of `_scan_forward` from the saved segment starts: (g_delta, g_du, g_A, g_B, g_C, g_h0, y), with
    the scan's output y (b, L, d) recomputed on the way when `want_y` (else None); in the forward's row slices."""
    b, L, d = du.shape
    rows = _rows_per_slice(b, L, A.shape[1], d, du.is_cuda)
    if rows >= b:
        return _scan_slice_backward(delta, du, A, B, C, seg_starts, has_h0, gy, glast, want_y)
    parts = [_scan_slice_backward(delta[r:r + rows], du[r:r + rows], A, _rows(B, r, rows), _rows(C, r, rows),
                                  seg_starts[:, r:r + rows], has_h0, gy[r:r + rows],
                                  None if glast is None else glast[r:r + rows], want_y, rows)
             for r in range(0, b, rows)]
    g_delta, g_du, g_A, g_B, g_C, g_h0, y = zip(*parts)
    join = lambda grads, t: torch.cat(grads) if t.dim() == 3 else sum(grads)  # noqa: E731  rows or a constant
    return (torch.cat(g_delta), torch.cat(g_du), sum(g_A), join(g_B, B), join(g_C, C),
            torch.cat(g_h0) if has_h0 else None, torch.cat(y) if want_y else None)


def _scan_slice_backward(delta, du, A, B, C, seg_starts, has_h0, gy, glast, want_y=False, slice_rows=None):
    """Gradients of `_scan_slice_forward` from its saved segment starts (see `_scan_backward`)."""
    b, L, d = du.shape
    N = A.shape[1]
    if L == 0:
        g_h0 = (glast if glast is not None else du.new_zeros(b, N, d)) if has_h0 else None
        return (torch.zeros_like(delta), torch.zeros_like(du), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), g_h0, du.new_zeros(b, 0, d) if want_y else None)
    K, M, nseg, Lp = _segments(slice_rows or b, L, N, d, du.is_cuda)
    variable_B, variable_C = B.dim() == 3, C.dim() == 3
    A2 = (A * LOG2E).t().contiguous()
    At = A.t().contiguous()
    ds = _to_segments(delta, Lp, nseg, K, M)
    dus = _to_segments(du, Lp, nseg, K, M)
    gs = _to_segments(gy.to(du.dtype), Lp, nseg, K, M)
    Bs = _to_segments(B, Lp, nseg, K, M) if variable_B else B.t().contiguous()
    Cs = _to_segments(C, Lp, nseg, K, M) if variable_C else C.t().contiguous()

    g_delta = du.new_empty(nseg, K, b, M, d)
    g_du = du.new_empty(nseg, K, b, M, d)
    ys = du.new_empty(nseg, K, b, M, d) if want_y else None
    g_At = torch.zeros_like(At)
    g_B = du.new_empty(nseg, K, b, M, N) if variable_B else torch.zeros_like(Bs)
    g_C = du.new_empty(nseg, K, b, M, N) if variable_C else torch.zeros_like(Cs)
    mu = du.new_zeros(b, N, d) if glast is None else glast.to(du.dtype).contiguous()
    dA, tmp = du.new_empty(K, b, M, N, d), du.new_empty(K, b, M, N, d)
    HG, LR = du.new_empty(2, K, b, M, N, d), du.new_empty(2, K, b, M, N, d)
    starts, mus = du.new_empty(b, M + 1, N, d), du.new_empty(b, M + 1, N, d)
    for s in reversed(range(nseg)):
        Bseg = Bs[s] if variable_B else Bs
        # recompute the states of this segment from the state it started from
        _segment_states(ds[s], dus[s], A2, Bseg, dA, HG, starts, seg_starts[s])
        H = HG[0]
        if want_y:
            _outputs(H, Cs[s] if variable_C else Cs, ys[s], tmp)
        # adjoint lam_t = dL/dh_t = C_t g_t + exp(delta_{t+1} A) lam_{t+1}: the same chunked scan, reversed,
        # with R_t = exp((delta_{t+1} + ... + delta_{end of chunk}) A) carried alongside
        g = gs[s].unsqueeze(-2)  # (K, b, M, 1, d)
        Lam, R = LR[0], LR[1]
        torch.mul(g, Cs[s].unsqueeze(-1) if variable_C else Cs, out=Lam)
        R[K - 1].fill_(1.0)
        R[:K - 1].zero_()
        for k in range(K - 2, -1, -1):
            LR[:, k].addcmul_(dA[k + 1], LR[:, k + 1])
        # carry across chunks: mus[:, m] = exp(delta A) lam at the first step of chunk m
        mus[:, M] = mu
        for m in range(M - 1, -1, -1):
            lam0 = torch.addcmul(Lam[0][:, m], R[0][:, m], mus[:, m + 1])
            torch.mul(dA[0][:, m], lam0, out=mus[:, m])
        Lam.addcmul_(R, mus[:, 1:])
        mu = mus[:, 0].clone()
        # X = lam_t * exp(delta_t A) * h_{t-1} = dL/d(delta_t A)
        X = R
        torch.mul(H[:-1], dA[1:], out=X[1:])
        torch.mul(starts[:, :M], dA[0], out=X[0])
        X.mul_(Lam)
        g_At.add_(torch.mul(X, ds[s].unsqueeze(-2), out=tmp).sum(dim=(0, 1, 2)))
        torch.sum(torch.mul(X, At, out=tmp), dim=-2, out=g_delta[s])
        # through (delta u)_t B_t: dL/d(delta u)_t = lam_t . B_t
        if variable_B:
            torch.matmul(Bseg.unsqueeze(-2), Lam, out=g_du[s].unsqueeze(-2))
            torch.matmul(dus[s].unsqueeze(-2), Lam.transpose(-1, -2), out=g_B[s].unsqueeze(-2))
        else:
            torch.sum(torch.mul(Lam, Bseg, out=tmp), dim=-2, out=g_du[s])
            g_B.add_(torch.mul(Lam, dus[s].unsqueeze(-2), out=tmp).sum(dim=(0, 1, 2)))
        # through y_t = C_t . h_t
        if variable_C:
            torch.matmul(g, H.transpose(-1, -2), out=g_C[s].unsqueeze(-2))
        else:
            g_C.add_(torch.mul(H, g, out=tmp).sum(dim=(0, 1, 2)))
    g_h0 = mu if has_h0 else None
    g_B = _from_segments(g_B, L) if variable_B else g_B.t()
    g_C = _from_segments(g_C, L) if variable_C else g_C.t()
    return (_from_segments(g_delta, L), _from_segments(g_du, L), g_At.t(), g_B, g_C, g_h0,
            _from_segments(ys, L) if want_y else None)


def _segment_states(ds, dus, A2, Bseg, dA, HG, starts, h):
    """The states of one segment, starting from state h (b, N, d).

    ds, dus: (K, b, M, d) delta and delta*u; A2: (N, d) = A log2(e); Bseg: (K, b, M, N) or (N, d) constant.
    Fills dA (K, b, M, N, d) with the per-step decays exp(delta_t A), HG[0] with the states and HG[1] with the
    cumulative decays since the chunk start, starts (b, M+1, N, d) with the state each chunk starts from.
    Returns the state after the segment.
    """
    K = ds.shape[0]
    M = ds.shape[2]
    torch.mul(ds.unsqueeze(-2), A2, out=dA)
    dA.exp2_()  # per-step decays exp(delta_t A), each <= 1 for delta >= 0 and A <= 0
    H, G = HG[0], HG[1]
    torch.mul(dus.unsqueeze(-2), Bseg.unsqueeze(-1) if Bseg.dim() == 4 else Bseg, out=H)
    G[0].copy_(dA[0])
    G[1:].zero_()
    # zero-start states and cumulative decays within every chunk at once: one op per position of the chunk,
    # (h, g)_k = exp(delta_k A) * (h, g)_{k-1} + (delta_k u_k B_k, 0)
    for k in range(1, K):
        HG[:, k].addcmul_(dA[k], HG[:, k - 1])
    # carry the state across the chunks of the segment
    starts[:, 0] = h
    for m in range(M):
        torch.addcmul(H[K - 1][:, m], G[K - 1][:, m], starts[:, m], out=starts[:, m + 1])
    # add the decayed start state of each chunk
    H.addcmul_(G, starts[:, :M])
    return starts[:, M].clone()


def _collect(kept, H, s, K, M, L, keep):
    """Copy the states of positions L-keep .. L-1 that fall in segment s into kept (keep, b, N, d)."""
    S = K * M
    for p in range(max(L - keep, s * S), min(L, (s + 1) * S)):
        q = p - s * S
        kept[p - (L - keep)].copy_(H[q % K][:, q // K])
