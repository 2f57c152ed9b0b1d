"""An RWKV-7 trunk: Peng et al. 2025, 'RWKV-7 "Goose" with Expressive Dynamic State Evolution', arXiv:2503.14456.

Embeddings in, hidden states out, like every trunk (models/contracts.py).

A block is x += TimeMix(LN1(x)); x += ChannelMix(LN2(x)) (pre-LayerNorm residuals); the trunk applies LN0 to its
input and a final LayerNorm. The paper's equations (its architecture section), its symbols first and the names of
the reference implementation (BlinkDL/RWKV-LM, RWKV-v7) in brackets, which are also the parameter names here.

Token shift. Every input of the time mixing is a lerp of the token and the one before it, with a learned
per-channel weight: x^q_t = x_t + (x_{t-1} - x_t) * mu_q for q in r, d, k, v, a, g [x_r, x_w, x_k, x_v, x_a, x_g]
(x_{-1} = 0). The lerp weights are static (RWKV-6's data-dependent lerp is gone in RWKV-7, here as in the
reference code): what depends on the data are the low-rank MLPs below.

Weight preparation, per head of N channels:
    r_t = x^r_t W_r                                 receptance, the query                   [receptance]
    k_t = x^k_t W_k,   v_t = x^v_t W_v                                                      [key, value]
    d_t = w0 + tanh(x^d_t A_d) B_d                  decay MLP                               [w0, w1, w2]
    w_t = exp(-e^{-0.5} sigmoid(d_t))               decay, within (0.545, 1)
    a_t = sigmoid(a0 + x^a_t A_a B_a)               in-context learning rate                [a0, a1, a2]
    g_t = sigmoid(x^g_t A_g) B_g                    output gate                             [g1, g2]
    kappa_t = normalize(k_t * xi) per head          removal key (unit length)               [k_k]
    k~_t = k_t * (1 + (a_t - 1) * alpha)            replacement key                         [k_a]
    v_t = lerp(v_t, v^0_t, sigmoid(nu0 + x^v_t A_nu B_nu))   value residual to layer 0's v [v0, v1, v2]

The generalised delta rule, state S_t (N x N per head, values by keys):
    S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k~_t
    p_t = GroupNorm_heads(S_t r_t) + (r_t . (rho * k~_t)) v_t       the bonus rho     [ln_x, r_k]
    out_t = (p_t * g_t) W_o                                                           [output]
Channel mixing: out'_t = ReLU(x'^k_t W_k')^2 W_v', with x'^k a token shift as above [ffn.x_k, ffn.key, ffn.value].

The code keeps the transposed state M = S^T (keys by values, fla's layout) and writes the rule with the reference's
vectors a_t := -kappa_t and b_t := kappa_t * (learning rate a_t), k_t := k~_t:
    M_t = diag(w_t) M_{t-1} + b_t (a_t^T M_{t-1}) + k_t v_t^T,    o_t = M_t^T r_t.
Three forms of it: `wkv_recurrent` (the definition, a loop over time), `wkv_step` (one decoding step, O(1) in the
length) and `wkv_chunked` (training and prefill: a loop over chunks only, see its docstring). Where fla
(fla-org/flash-linear-attention) is installed and the tensors live on a GPU, its Triton kernel of the chunked rule
runs instead (same equations, untested here: no GPU in this project's test runs).

Where this departs from the reference, and why:
* A block made by `make_block()` (multi-token heads) has no value residual: it does not see the trunk's first
  layer. The trunk's own blocks do, and the first layer's values are handed down within each forward (and so, in a
  cached forward, position by position: no extra decoding state).
* LN0 belongs to the trunk (applied to its input), not to block 0, since the embedding belongs to the objective.
* The FFN width is a parameter (`d_ffn`, default 4 x d_model as in the paper; RWKV-LM's trainer now uses 3.5 x).
* The reference's L2Wrap (a loss-side logit penalty) is not part of a trunk and is left out.

Decoding state per block: the two token-shift inputs (the last input of the time and the channel mixing) and the
wkv state of every head, O(1) per token, in the Mamba trunks' cache (`models.mamba.MambaCache`: per-row `lengths`,
the last `history` states for `crop`, `snapshot` / `restore`, `fork`). A padding mask zeroes the mixers' inputs at
padded positions (the zeros a sequence starts from) and makes them identity steps of the rule (w = 1, no removal,
no write), so padding leaves the state as it was: left padding is exact, and in a cache a row advances by its own
real tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import branch_index, check_length, check_padding
from models.mamba import MambaCache, MambaDecodingCache

try:  # fla's fused Triton kernel of the chunked rule (what its `fla.ops.rwkv7.chunk_rwkv7` wraps; called directly
    # because the wrapper's signature changed across fla releases, while gk has stayed the log-decay)
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule as _fla_chunk
except Exception:  # ImportError, or a broken Triton install
    _fla_chunk = None

Mask = str | torch.Tensor
DECAY_SCALE = math.exp(-0.5)  # log w_t = -e^{-0.5} sigmoid(d_t), so w_t > exp(-e^{-0.5}) = 0.545


# ---------------------------------------------------------------------------------------------------------------
# the generalised delta rule: M_t = diag(w_t) M_{t-1} + b_t (a_t^T M_{t-1}) + k_t v_t^T,  o_t = M_t^T r_t
# ---------------------------------------------------------------------------------------------------------------


def wkv_step(state, r, log_w, k, v, a, b):
    """One step of the rule for every row and head: r, log_w, k, a, b (B, H, K); v (B, H, V); state (B, H, K, V).
    Returns (o_t (B, H, V), the new state). O(1) in the length: the decoding step."""
    sa = torch.matmul(a.unsqueeze(-2), state)  # a_t^T M_{t-1}: (B, H, 1, V)
    state = torch.exp(log_w).unsqueeze(-1) * state + b.unsqueeze(-1) * sa + k.unsqueeze(-1) * v.unsqueeze(-2)
    return torch.matmul(r.unsqueeze(-2), state).squeeze(-2), state


def wkv_recurrent(r, log_w, k, v, a, b, initial_state=None):
    """The rule by its definition, a loop over time (the reference the other forms are tested against).
    r, log_w, k, a, b (B, T, H, K); v (B, T, H, V); initial_state (B, H, K, V) or None (zeros).
    Returns o (B, T, H, V) and the final state, both in the inputs' dtype."""
    B, T, H, K = r.shape
    state = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(r.dtype)
    outs = []
    for t in range(T):
        o, state = wkv_step(state, r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t])
        outs.append(o)
    return torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1]), state


def wkv_chunked(r, log_w, k, v, a, b, chunk_size: int = 32, initial_state=None):
    """The rule in chunks of C positions: a few matrix products per chunk, all chunks at once, and a loop over the
    chunks only for the state they hand on (the WY / UT-transform form of DeltaNet and fla's chunked DPLR rule).

    Inside a chunk (positions 1..C after the state M_0), let c_t = log w_1 + ... + log w_t (per key channel) and
    G_t = exp(c_t). Dividing the rows of the state by G_t turns the decay into the identity:
        M~_t = M~_{t-1} + (b_t / G_t) u_t + (k_t / G_t) v_t^T,    u_t = a_t^T M_{t-1} = (a_t G_{t-1})^T M~_{t-1},
    so M~_t = M_0 + sum_{s<=t} [(b_s / G_s) u_s + (k_s / G_s) v_s^T], and the u_t of the chunk solve one unit lower
    triangular system (the UT transform):
        u_t = (a_t G_{t-1})^T M_0 + sum_{s<t} (a_t . b_s G_{t-1}/G_s) u_s + sum_{s<t} (a_t . k_s G_{t-1}/G_s) v_s
        U = W M_0 + U',  W = (I - L_ab)^{-1} (a G_{t-1}),  U' = (I - L_ab)^{-1} L_ak V.
    The chunk's output o_t = (r_t G_t)^T M_0 + sum_{s<=t} [(r_t . b_s G_t/G_s) u_s + (r_t . k_s G_t/G_s) v_s], and
    its end state M_C = A M_0 + S with the transition A = diag(G_C) + sum_s (b_s G_C/G_s) W_s^T and the chunk's own
    state S = sum_s (b_s G_C/G_s) U'_s + (k_s G_C/G_s) v_s^T. Only M_{c+1} = A_c M_c + S_c runs chunk by chunk.

    Numerics: every decay ratio that is used is G_t/G_s with s <= t, at most 1. The pairwise ratios inside the
    C x C matrices are factored around the chunk's middle, (x_t G_t/G_m) . (y_s G_m/G_s), so each factor stays
    within exp(max |log w| C/2) (for RWKV-7, |log w| < 0.61: 130 at C = 16, 1.6e4 at C = 32), never the
    exp(-cumsum) of a whole chunk; the state update and the output use G_t/G_0 <= 1 and G_C/G_s <= 1 only.
    Computed in fp32 (fp64 for fp64 inputs), autocast off: the triangular solve is the sensitive part.

    r, log_w, k, a, b (B, T, H, K); v (B, T, H, V); initial_state (B, H, K, V) or None. Any T: a length that C does
    not divide is padded with identity steps (log w = 0, nothing written), which leave the final state exact.
    Returns o (B, T, H, V) and the final state (B, H, K, V), in the compute dtype.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    C = chunk_size
    n = max(1, -(-T // C))
    with torch.autocast(r.device.type, enabled=False):
        def chunks(x):  # (B, T, H, X) -> (B, H, n, C, X), padded with zeros (identity steps)
            x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, n * C - T))
            return x.view(B, n, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

        r, log_w, k, v, a, b = (chunks(x) for x in (r, log_w, k, v, a, b))
        cum = log_w.cumsum(-2)  # c_t
        before = cum - log_w  # c_{t-1}
        mid = cum[..., C // 2 : C // 2 + 1, :]  # c_m: the chunk's middle, the point the pairwise ratios factor at
        to_mid, from_mid = torch.exp(mid - cum), torch.exp(cum - mid)
        b_s, k_s = b * to_mid, k * to_mid  # x_s G_m / G_s
        a_t, r_t = a * torch.exp(before - mid), r * from_mid  # a_t G_{t-1} / G_m,  r_t G_t / G_m
        ones = torch.ones(C, C, dtype=torch.bool, device=r.device)
        strict, causal = ones.tril(-1), ones.tril()
        L_ab = (a_t @ b_s.transpose(-1, -2)).masked_fill(~strict, 0.0)  # a_t . b_s G_{t-1}/G_s, s < t
        L_ak = (a_t @ k_s.transpose(-1, -2)).masked_fill(~strict, 0.0)
        L_rb = (r_t @ b_s.transpose(-1, -2)).masked_fill(~causal, 0.0)  # r_t . b_s G_t/G_s, s <= t
        L_rk = (r_t @ k_s.transpose(-1, -2)).masked_fill(~causal, 0.0)
        # the UT transform: one unit lower triangular solve gives W (C x K) and U' (C x V) of every chunk
        eye = torch.eye(C, dtype=dtype, device=r.device)
        WU = torch.linalg.solve_triangular(eye - L_ab, torch.cat([a * torch.exp(before), L_ak @ v], -1),
                                           upper=False, unitriangular=True)
        W, U_own = WU.split([K, V], -1)
        end = cum[..., -1:, :]  # c_C
        b_end, k_end = b * torch.exp(end - cum), k * torch.exp(end - cum)  # x_s G_C / G_s
        transition = torch.diag_embed(torch.exp(end[..., 0, :])) + b_end.transpose(-1, -2) @ W  # (B, H, n, K, K)
        own = b_end.transpose(-1, -2) @ U_own + k_end.transpose(-1, -2) @ v  # (B, H, n, K, V)
        h = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
        starts = []
        for A_c, S_c in zip(transition.unbind(2), own.unbind(2)):  # unbind: one backward for all the chunks
            starts.append(h)
            h = torch.baddbmm(S_c.flatten(0, 1), A_c.flatten(0, 1), h.flatten(0, 1)).view(B, H, K, V)
        M0 = torch.stack(starts, 2)  # (B, H, n, K, V): the state each chunk starts from
        U = W @ M0 + U_own
        o = (r * torch.exp(cum)) @ M0 + L_rb @ U + L_rk @ v  # (B, H, n, C, V)
        return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T], h


def wkv(r, log_w, k, v, a, b, chunk_size: int = 32, initial_state=None):
    """The chunked rule: fla's Triton kernel on a GPU where fla is installed, else `wkv_chunked`. Shapes as
    `wkv_chunked`; returns o and the final state in the compute dtype (fp32, fp64 for fp64 inputs)."""
    if _fla_chunk is not None and r.is_cuda:
        o, state = _fla_chunk(q=r.float(), k=k.float(), v=v.float(), a=a.float(), b=b.float(), gk=log_w.float(),
                              scale=1.0, initial_state=None if initial_state is None else initial_state.float(),
                              output_final_state=True)
        return o.float(), state.float()
    return wkv_chunked(r, log_w, k, v, a, b, chunk_size, initial_state)


# ---------------------------------------------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------------------------------------------


def lora_rank(d_model: int, factor: float) -> int:
    """The reference's low-rank sizes: factor * sqrt(d_model), rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * d_model ** 0.5 / 32) * 32))


def orthogonal(rows: int, cols: int, scale: float) -> nn.Parameter:
    """An orthogonal matrix times `scale` (times sqrt(rows / cols) when taller than wide), the reference's init
    of the low-rank MLPs' second matrices."""
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))
    return nn.Parameter(w)


def no_decay(*params: nn.Parameter) -> None:
    for p in params:  # as the reference: weight decay on the projection matrices (`.weight`) only
        p._no_weight_decay = True


def shifted(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} for every t of x (B, T, D): `last` (B, D), the input before x, or zeros at a sequence's start."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last.to(x.dtype).unsqueeze(1)
    return torch.cat([first, x[:, :-1]], 1)


class TimeMix(nn.Module):
    """RWKV-7's time mixing (the equations in the module docstring), parameters named as the reference's.

    Args:
        d_model: width C; head_size: channels N per head (H = C / N heads).
        layer_id, n_layers: the position of the block, for the reference's layer-dependent init.
        value_residual: mix layer 0's values into v (every layer but the first; not for `make_block` heads).
        decay_lora, a_lora, value_lora, gate_lora: ranks of the low-rank MLPs (default: the reference's).
        chunk_size: positions per chunk of the chunked rule.
    """

    def __init__(self, d_model: int, head_size: int, layer_id: int, n_layers: int, value_residual: bool,
                 decay_lora: int | None = None, a_lora: int | None = None, value_lora: int | None = None,
                 gate_lora: int | None = None, chunk_size: int = 32):
        super().__init__()
        if d_model % head_size:
            raise ValueError(f"head_size {head_size} does not divide d_model {d_model}")
        C, N = d_model, head_size
        self.n_heads, self.head_size, self.chunk_size = C // N, N, chunk_size
        self.value_residual = value_residual
        decay_lora, a_lora = decay_lora or lora_rank(C, 2.5), a_lora or lora_rank(C, 2.5)
        value_lora, gate_lora = value_lora or lora_rank(C, 1.7), gate_lora or lora_rank(C, 5.0)
        # the reference's init: token-shift weights and decays graded over channels and layers
        depth = layer_id / max(n_layers - 1, 1)  # 0 at the first layer, 1 at the last
        shallow = 1.0 - layer_id / n_layers  # 1 at the first layer, towards 0 at the last
        channel = torch.arange(C) / C
        linear = torch.arange(C) / max(C - 1, 1) - 0.5
        zigzag = (torch.arange(C) % N - (N - 1) / 2) / max((N - 1) / 2, 1)
        zigzag = zigzag * zigzag.abs()
        mu = lambda power: nn.Parameter(1.0 - channel ** (power * shallow))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (mu(p) for p in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2))
        decay_floor = -6 + 6 * (torch.arange(C) / max(C - 1, 1)) ** (1 + depth ** 0.3)
        self.w0 = nn.Parameter(decay_floor + 0.5 + 2.5 * zigzag)
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, decay_lora)), orthogonal(decay_lora, C, 0.1)
        self.a0 = nn.Parameter(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, a_lora)), orthogonal(a_lora, C, 0.1)
        if value_residual:
            self.v0 = nn.Parameter(0.73 - 0.4 * linear)
            self.v1, self.v2 = nn.Parameter(torch.zeros(C, value_lora)), orthogonal(value_lora, C, 0.1)
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, gate_lora)), orthogonal(gate_lora, C, 0.1)
        self.k_k = nn.Parameter(0.71 - 0.1 * linear)  # xi
        self.k_a = nn.Parameter(torch.full((C,), 1.02))  # alpha
        self.r_k = nn.Parameter(torch.full((self.n_heads, N), -0.04))  # rho, the bonus
        self.receptance, self.key = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.value, self.output = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, C, eps=64e-5)  # the reference's eps (its outputs are not scaled)
        with torch.no_grad():
            bound = 0.5 / math.sqrt(C)
            self.receptance.weight.uniform_(-bound, bound)
            self.key.weight.uniform_(-0.1 * bound, 0.1 * bound)
            self.value.weight.uniform_(-bound, bound)
            self.output.weight.zero_()  # every block starts as the identity
            self.ln_x.weight.fill_(((1 + layer_id) / n_layers) ** 0.7)
        no_decay(*self.parameters(recurse=False))

    def forward(self, x, prev, v_first=None, real=None, state=None, keep: int = 0):
        """x (B, T, C), the normalised input; prev its token shift x_{t-1}; v_first layer 0's values (or None);
        real (B, T) bool, False at padding (identity steps); state (B, H, N, N) to start from, or None.

        Without a state, the chunked rule over all T. With one, the chunked rule over the first T - keep positions
        and single steps over the last `keep`, whose states a cache keeps for crop(). Returns the output (B, T, C),
        this layer's values v (B, T, C), the final state and the `keep` states after the last positions
        (keep, B, H, N, N) (None without a state)."""
        B, T, C = x.shape
        H, N = self.n_heads, self.head_size
        xx = prev - x
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, mu.to(x.dtype))
                                  for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_w = -DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float())
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.value_residual and v_first is not None:
            nu = torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
            v = torch.lerp(v, v_first.to(v.dtype), nu.to(v.dtype))
        heads = lambda t: t.unflatten(-1, (H, N))  # noqa: E731
        kappa = F.normalize(heads(k * self.k_k), dim=-1)  # removal key, unit length per head
        k = k * (1 + (a - 1) * self.k_a)  # replacement key
        r, k, v, a, log_w = heads(r), heads(k), heads(v), heads(a), heads(log_w)
        rule_a, rule_b, rule_k = -kappa, kappa * a, k
        if real is not None:  # padding: w = 1, nothing removed, nothing written
            m = real[:, :, None, None]
            log_w, rule_b, rule_k = log_w * m, rule_b * m, rule_k * m
        o, state, tail = self._rule(r, log_w, rule_k, v, rule_a, rule_b, state, keep)
        o = self.ln_x(o.flatten(0, 1).flatten(-2).to(x.dtype)).view(B, T, C)
        bonus = ((r * k * self.r_k).sum(-1, keepdim=True) * v).flatten(-2)
        return self.output((o + bonus) * g), v.flatten(-2), state, tail

    def _rule(self, r, log_w, k, v, a, b, state, keep: int):
        if state is None:
            o, last = wkv(r, log_w, k, v, a, b, self.chunk_size)
            return o, last, None
        T = r.shape[1]
        outs, tail = [], []
        if T > keep:
            o, state = wkv(r[:, :T - keep], log_w[:, :T - keep], k[:, :T - keep], v[:, :T - keep],
                           a[:, :T - keep], b[:, :T - keep], self.chunk_size, state)
            outs.append(o)
        inputs = [t[:, T - keep:].float() for t in (r, log_w, k, v, a, b)]
        with torch.autocast(r.device.type, enabled=False):  # the decoding state stays fp32
            for step in zip(*(t.unbind(1) for t in inputs)):
                o, state = wkv_step(state.float(), *step)
                outs.append(o.unsqueeze(1))
                tail.append(state.detach())
        return torch.cat(outs, 1), state, torch.stack(tail)


class ChannelMix(nn.Module):
    """RWKV-7's channel mixing: ReLU(lerp(x_t, x_{t-1}, mu_k) W_k)^2 W_v, a token-shifted squared-ReLU MLP."""

    def __init__(self, d_model: int, d_ffn: int, layer_id: int, n_layers: int):
        super().__init__()
        shallow = 1.0 - layer_id / n_layers
        self.x_k = nn.Parameter(1.0 - (torch.arange(d_model) / d_model) ** (shallow ** 4))
        no_decay(self.x_k)
        self.key, self.value = nn.Linear(d_model, d_ffn, bias=False), nn.Linear(d_ffn, d_model, bias=False)
        with torch.no_grad():
            bound = 0.5 / math.sqrt(d_model)
            self.key.weight.uniform_(-bound, bound)
            self.value.weight.zero_()

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.value(torch.relu(self.key(torch.addcmul(x, prev - x, self.x_k.to(x.dtype)))).square())


class RWKV7Cache(MambaCache):
    """Decoding state of one RWKV-7 block, in the Mamba cache (per-row lengths, the ring of the last `history`
    states for crop, snapshot / restore, fork): `conv_state` (batch, d_model, 2) holds the two token-shift inputs
    (the last input of the time mixing, then of the channel mixing), `ssm_state` (batch, H * N, N) the heads' wkv
    states, fp32 (keys by values)."""

    def __init__(self, batch_size: int, d_model: int, head_size: int, device=None, dtype=None, history: int = 64):
        super().__init__(batch_size, d_model, head_size, 2, device, dtype, history)


class RWKV7Block(nn.Module):
    """x + TimeMix(LN1(x)), then x + ChannelMix(LN2(x)): the block of the RWKV-7 trunk (`att`, `ffn`, `ln1`, `ln2`
    as the reference names them)."""

    def __init__(self, d_model: int, head_size: int, d_ffn: int, layer_id: int, n_layers: int,
                 value_residual: bool, norm_eps: float = 1e-5, **time_mix_args):
        super().__init__()
        self.d_model, self.head_size = d_model, head_size
        self.ln1, self.ln2 = nn.LayerNorm(d_model, eps=norm_eps), nn.LayerNorm(d_model, eps=norm_eps)
        self.att = TimeMix(d_model, head_size, layer_id, n_layers, value_residual, **time_mix_args)
        self.ffn = ChannelMix(d_model, d_ffn, layer_id, n_layers)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> RWKV7Cache:
        p = self.ffn.key.weight
        return RWKV7Cache(batch_size, self.d_model, self.head_size, device or p.device, dtype or p.dtype, history)

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: RWKV7Cache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_causal(mask, "RWKV-7 block")
        if padding_mask is not None:
            padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
        return self.mix(x, cache, padding_mask)[0]

    def mix(self, x: torch.Tensor, cache: RWKV7Cache | None = None, padding_mask: torch.Tensor | None = None,
            v_first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (x after the block, this layer's values v (B, T, C)); with a cache, x holds the T
        positions after each row's cached ones and the cache advances by each row's real tokens."""
        B, T, C = x.shape
        if T == 0:
            return x, x
        real = None if padding_mask is None else padding_mask.unsqueeze(-1).to(x.dtype)
        xa = self.ln1(x) if real is None else self.ln1(x) * real  # padding feeds the token shift zeros
        state = None if cache is None else cache.ssm_state.view(B, -1, self.head_size, self.head_size)
        keep = 0 if cache is None else min(T, cache.history + 1)
        y, v, state, tail = self.att(xa, shifted(xa, None if cache is None else cache.conv_state[..., 0]), v_first,
                                     padding_mask, state, keep)
        x = x + y
        xc = self.ln2(x) if real is None else self.ln2(x) * real
        x = x + self.ffn(xc, shifted(xc, None if cache is None else cache.conv_state[..., 1]))
        if cache is not None:
            self._advance(cache, torch.stack([xa, xc], -1), state, tail, padding_mask)
        return x, v

    @staticmethod
    def _advance(cache: RWKV7Cache, inputs: torch.Tensor, state: torch.Tensor, tail: torch.Tensor,
                 padding_mask: torch.Tensor | None) -> None:
        """Hand the cache each row's new states: the token-shift inputs (B, T, C, 2) of its last real position
        (its old ones if it has none), the wkv state, and the states after the last `keep` positions."""
        B, T = inputs.shape[:2]
        keep = tail.shape[0]
        if padding_mask is None:
            advance, shift = torch.full_like(cache.lengths, T), inputs[:, -1]
        else:
            advance = padding_mask.sum(1)
            last = inputs[torch.arange(B, device=inputs.device), (advance - 1).clamp(min=0)]
            shift = torch.where((advance > 0)[:, None, None], last.to(cache.conv_state.dtype), cache.conv_state)
        shift_tail = inputs[:, T - keep:].detach().transpose(0, 1)
        cache._advance(advance, shift.to(cache.conv_state.dtype), state.flatten(1, 2), shift_tail, tail.flatten(2, 3),
                       T, full=padding_mask is None)


def check_causal(mask: Mask, owner: str) -> None:
    if isinstance(mask, str) and mask == "causal":
        return
    got = f"a {tuple(mask.shape)} tensor mask" if isinstance(mask, torch.Tensor) else repr(mask)
    raise ValueError(f"the {owner} supports only causal masks (got {got}): its recurrence reads the sequence left "
                     f"to right; use the transformer trunk (models.Transformer) for an objective that needs "
                     f"mask='full' or a tensor mask")


# ---------------------------------------------------------------------------------------------------------------
# the trunk
# ---------------------------------------------------------------------------------------------------------------


class RWKV7(nn.Module):
    """The RWKV-7 trunk (Peng et al. 2025): LayerNorm on the input, a stack of RWKV-7 blocks, a final LayerNorm.

    Args:
        d_model: width of the hidden states.
        n_layers: number of blocks.
        head_size: channels per head of the wkv state (64 in the paper's models); d_model / head_size heads.
        d_ffn: hidden width of the channel mixing; default 4 * d_model (the paper).
        decay_lora, a_lora, value_lora, gate_lora: ranks of the low-rank MLPs of the decay, the in-context
            learning rate, the value residual and the gate; default the reference's (a multiple of 32 near 2.5,
            2.5, 1.7 and 5 times sqrt(d_model), at least 32).
        chunk_size: positions per chunk of the chunked rule (any size; one that does not divide the length pads).
        max_seq_len: the longest sequence the trunk accepts (no positional tables: only a sanity bound).
        norm_eps: LayerNorm epsilon.
    """

    supported_masks = ("causal",)

    def __init__(self, d_model: int = 256, n_layers: int = 4, head_size: int = 64, d_ffn: int | None = None,
                 decay_lora: int | None = None, a_lora: int | None = None, value_lora: int | None = None,
                 gate_lora: int | None = None, chunk_size: int = 32, max_seq_len: int = 1_000_000,
                 norm_eps: float = 1e-5):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.d_model, self.n_layers, self.max_seq_len = d_model, n_layers, max_seq_len
        self._block_args = dict(d_model=d_model, head_size=head_size, d_ffn=d_ffn or 4 * d_model, n_layers=n_layers,
                                norm_eps=norm_eps, decay_lora=decay_lora, a_lora=a_lora, value_lora=value_lora,
                                gate_lora=gate_lora, chunk_size=chunk_size)
        self.ln0 = nn.LayerNorm(d_model, eps=norm_eps)
        self.blocks = nn.ModuleList(RWKV7Block(layer_id=i, value_residual=i > 0, **self._block_args)
                                    for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)

    def make_block(self) -> RWKV7Block:
        """A fresh block of this trunk's kind and shape (for multi-token heads): initialised as the last layer,
        without value residual (a head does not see the trunk's first layer)."""
        return RWKV7Block(layer_id=self.n_layers - 1, value_residual=False, **self._block_args)

    def make_cache(self, batch_size: int, device=None, dtype=None, history: int = 64) -> MambaDecodingCache:
        return MambaDecodingCache([b.make_cache(batch_size, device, dtype, history) for b in self.blocks])

    def forward(self, x: torch.Tensor, *, mask: Mask = "causal", cache: MambaDecodingCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                branch: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) -> hidden states (B, T, d_model). mask: "causal" only. `positions` is accepted for the
        trunk contract and unused (a recurrence has no positional encoding). padding_mask (B, T) True at real
        tokens: padding at either end of a row, or, with a cache, after each row's real tokens only (row b
        advances by its own). `branch` = m > 0: (hidden states, the input of the last m blocks)."""
        check_causal(mask, "RWKV-7 trunk")
        check_length((cache.length if cache is not None else 0) + x.shape[1], self.max_seq_len, "trunk")
        if padding_mask is not None:
            padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
            check_padding(padding_mask, "RWKV-7 trunk's decoding cache" if cache is not None else "RWKV-7 trunk",
                          at_the_end=cache is not None)
        layer_caches = list(cache) if cache is not None else [None] * len(self.blocks)
        x, v_first = self.ln0(x), None
        cut, z = branch_index(len(self.blocks), branch), None
        for i, (block, layer_cache) in enumerate(zip(self.blocks, layer_caches)):
            z = x if i == cut else z
            x, v = block.mix(x, layer_cache, padding_mask, v_first)
            v_first = v if v_first is None else v_first  # the first layer's values, for the value residual
        return (self.norm(x), z) if branch else self.norm(x)
