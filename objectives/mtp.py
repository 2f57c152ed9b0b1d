"""Multi-token prediction: Meta's parallel (or causal) heads trained with the memory-saving per-head backward
(Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction"), and self-speculative
decoding with the heads as drafters. DeepSeek-V3's sequential modules are in `objectives/deepseek_mtp.py`.

Head k predicts token t+k from the prefix up to t. Head 1 is the trunk itself, so n_future=1 is exactly next-token
prediction, and `match_params` moves n-1 trunk layers into heads 2..n for a comparison at equal parameter count
(the NTP model's last layer plays head 1, as in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import DecodingCache, RMSNorm
from objectives.decoding.drafters import CacheGroup, Drafter, lookup_drafts
from objectives.decoding.greedy import token_probs
from objectives.training import metrics as M
from objectives.training.causal import CausalObjective
from objectives.training.losses import chunk_positions, chunked_cross_entropy
from objectives.training.multi_token import head_metrics, shifted


def head_cross_entropy_with_grads(hidden, weight, targets, mask, scale, grad_weight, chunk_mib: float):
    """Cross-entropy of one head over the tied unembedding with its gradients computed on the spot, chunk by chunk.

    hidden [N, D] (the head's normalised output), weight [V, D], targets [N], mask [N]; the loss's gradient is
    d(scale * sum mask * NLL): (softmax - onehot) * mask * scale per position. The unembedding's share is added in
    place into grad_weight [V, D] (addmm_, no [V, D] temporary), so no embedding-sized buffer is ever allocated
    per head or per chunk. Returns (summed NLL, correct count, argmax predictions [N], gradient for hidden [N, D]).
    """
    nll, correct = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    grad_hidden, predictions = torch.empty_like(hidden), torch.empty_like(targets)
    w = weight.to(grad_weight.dtype)
    chunk_size = chunk_positions(chunk_mib, weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_size):
        span = slice(start, start + chunk_size)
        h = hidden[span].to(grad_weight.dtype)
        chunk_nll, chunk_correct, predictions[span], grad_hidden[span] = _head_chunk(
            h, w, targets[span], mask[span], scale, grad_weight)
        nll, correct = nll + chunk_nll, correct + chunk_correct
    return nll, correct, predictions, grad_hidden


def _head_chunk(h, w, targets, mask, scale, grad_weight):
    """One chunk of `head_cross_entropy_with_grads`. Its one [n, V] fp32 buffer turns from logits into the
    gradient in place (no log-softmax copy), and it is freed on return, before the next chunk's logits exist: at
    most 1.5x the chunk's fp32 logits are alive (the fp32 buffer and its bf16 source or copy under autocast)."""
    logits = F.linear(h, w).float()
    top, predictions = logits.max(-1, keepdim=True)
    picked = logits.gather(-1, targets[:, None])
    probs = logits.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    nll = ((top + total.log() - picked)[:, 0] * mask).sum()  # -log softmax(z)_t = max + log sum exp(z - max) - z_t
    grad = probs.div_(total).scatter_add_(-1, targets[:, None], torch.full_like(picked, -1.0))
    grad = grad.mul_((mask * scale)[:, None]).to(grad_weight.dtype)
    del logits, probs  # under autocast the fp32 buffer goes before the matmuls (a no-op in fp32: it is grad)
    grad_weight.addmm_(grad.t(), h)
    predictions = predictions[:, 0]
    return nll, ((predictions == targets).float() * mask).sum(), predictions, grad @ w


class _PerHeadBackward(torch.autograd.Function):
    """The paper's memory order (Gloeckle et al. 2024, section 3.2 and Figure 2), inside one autograd node.

    Forward: given the trunk's output, for each head compute its loss and gradients on the spot (only one chunk of
    one head's logits alive at a time), the unembedding's gradient accumulated in place into one buffer of the
    compute dtype; then one backward through the heads' norm and blocks to the trunk output. The gradients are
    handed out in `backward`, so Lightning's automatic optimization, gradient accumulation and DDP see a single
    ordinary backward per step. Peak memory over NTP: that one buffer (half an fp32 gradient under bf16 autocast).
    """

    @staticmethod
    def forward(ctx, hidden, objective, targets, masks, stats, *params):
        embed = objective.embed.weight
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else embed.dtype
        grad_embed = torch.zeros(embed.shape, dtype=dtype, device=embed.device)
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            states = objective.head_states(h)
            leaves = [z.detach().requires_grad_() for z in states]
            outputs = [objective.head_output(k, leaf) for k, leaf in enumerate(leaves)]
        total, output_grads = hidden.new_zeros((), dtype=torch.float32), []
        with torch.autocast(hidden.device.type, enabled=False):
            for k, out in enumerate(outputs):
                count = masks[k].sum()
                scale = objective.loss_weights[k] / count.clamp(min=1)
                nll, correct, predictions, grad = head_cross_entropy_with_grads(
                    out.detach().flatten(0, 1), embed, targets[k].flatten(), masks[k].flatten().float(), scale,
                    grad_embed, objective.hparams.ce_chunk_size)
                stats[k] = (nll, count, correct, predictions.view(targets[k].shape))
                output_grads.append(grad.view(out.shape).to(out.dtype))
                total = total + scale * nll
        with torch.enable_grad():
            norm_params = list(objective.head_norm.parameters())
            pairs = [(o, g) for o, g in zip(outputs, output_grads) if o.requires_grad]
            normed = torch.autograd.grad([o for o, _ in pairs], [*leaves, *norm_params],
                                         grad_outputs=[g for _, g in pairs], allow_unused=True)
            state_grads = [g if g is not None else torch.zeros_like(z) for g, z in zip(normed, leaves)]
            block_params = list(objective.heads.parameters())
            through_blocks = torch.autograd.grad(states, [h, *block_params], grad_outputs=state_grads,
                                                 allow_unused=True)
        by_param = {id(embed): grad_embed,
                    **{id(p): g for p, g in zip(norm_params, normed[len(leaves):])},
                    **{id(p): g for p, g in zip(block_params, through_blocks[1:])}}
        # kept on ctx, not saved: backward releases them, so the gradients it returns are taken over, not copied
        ctx.grads = [through_blocks[0], *(by_param.get(id(p)) for p in params)]
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        # scaled in place: the gradients are used once, and a copy would double their memory
        return (None if grads[0] is None else grads[0].mul_(grad_output), None, None, None, None,
                *(None if g is None else g.mul_(grad_output) for g in grads[1:]))


class ResidualMLP(nn.Module):
    """Medusa's head block (Cai et al. 2024, "Medusa", section 2.1.1): x + SiLU(W x + b). W and b start at zero, so
    a new head starts as the identity on the trunk's last hidden state. It reads one position only: no cache."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MultiTokenPrediction(CausalObjective):
    """n future tokens from one trunk (Gloeckle et al. 2024).

    Loss = sum_k w_k CE(head_k(h_t), x_{t+k}), weights normalised to sum to 1 (uniform by default).

    Args:
        n_future: number of heads; head k predicts token t+k.
        head_layers: blocks per head (heads 2..n).
        head_type: "block": each head block is a layer of the trunk's kind (`make_block()`; the paper's heads, and
            at decode time they need caches of their own); "mlp": Medusa's residual MLP on the trunk's last hidden
            state (no attention, no cache, about d_model^2 parameters a block).
        topology: "parallel" (every head reads the trunk output) or "causal" (head k reads head k-1's output).
        loss_weights: one weight per head; default uniform.
        match_params: move (n-1) * head_layers trunk blocks into the heads (equal parameters to NTP).
        per_head_backward: the paper's memory-saving order; false computes every head then one backward.
        **kwargs: the base objective's arguments.
    """

    headline_metric = (M.ACCEPT_LEN_TEACHER_FORCED, "accepted length (teacher-forced)")

    default_drafter = "heads"

    def __init__(self, *args, n_future: int = 4, head_layers: int = 1, head_type: str = "block",
                 topology: str = "parallel", loss_weights: list[float] | None = None, match_params: bool = False,
                 per_head_backward: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if n_future < 1 or head_layers < 1:
            raise ValueError(f"n_future ({n_future}) and head_layers ({head_layers}) must be at least 1")
        if topology not in ("parallel", "causal"):
            raise ValueError(f"topology {topology!r} is unknown: use 'parallel' or 'causal'")
        if head_type not in ("block", "mlp"):
            raise ValueError(f"head_type {head_type!r} is unknown: use 'block' (a trunk layer) or 'mlp' (Medusa's)")
        weights = torch.ones(n_future) if loss_weights is None else torch.tensor(loss_weights, dtype=torch.float32)
        if weights.shape != (n_future,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"loss_weights {loss_weights} must be {n_future} non-negative numbers, not all zero")
        if match_params:
            moved = (n_future - 1) * head_layers
            if moved >= len(self.trunk.blocks):
                raise ValueError(f"match_params would move {moved} of the trunk's {len(self.trunk.blocks)} blocks "
                                 f"into the heads: give the trunk more layers or lower n_future")
            del self.trunk.blocks[len(self.trunk.blocks) - moved :]
        self.n_future, self.topology, self.per_head_backward = n_future, topology, per_head_backward
        self.head_type = head_type
        self.register_buffer("loss_weights", weights / weights.sum(), persistent=False)
        make = self.trunk.make_block if head_type == "block" else lambda: ResidualMLP(self.trunk.d_model)
        self.heads = nn.ModuleList(nn.ModuleList(make() for _ in range(head_layers)) for _ in range(n_future - 1))
        self.head_norm = RMSNorm(self.trunk.d_model)

    # --- heads ----------------------------------------------------------------------------------------------------
    def head_states(self, hidden: torch.Tensor, caches: list | None = None, **block_options) -> list[torch.Tensor]:
        """[z_1 .. z_n]: z_1 is the trunk output; z_k the output of head k's blocks (pre-norm). `block_options`
        (mask, positions, padding_mask) reach the blocks of transformer-layer heads."""
        states = [hidden]
        for k, blocks in enumerate(self.heads):
            x = states[-1] if self.topology == "causal" else hidden
            for j, block in enumerate(blocks):
                if self.head_type == "mlp":
                    x = block(x)
                else:
                    x = block(x, cache=caches[k].layers[j] if caches else None, **block_options)
            states.append(x)
        return states

    def head_output(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """The hidden state the unembedding reads for head k+1 (0-based k; the trunk normalises head 1's)."""
        return state if k == 0 else self.head_norm(state)

    def head_loss(self, k: int, state, targets, mask, stats: dict) -> torch.Tensor:
        nll, count, correct, predictions = chunked_cross_entropy(
            self.head_output(k, state), self.unembedding, targets, mask, self.hparams.ce_chunk_size,
            return_predictions=True)
        stats[k] = (nll.detach(), count, correct, predictions)
        return self.loss_weights[k] * nll / count.clamp(min=1)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        T = tokens.shape[1] - 1
        hidden = self.hidden(inputs[:, :-1])
        targets, masks = zip(*(shifted(tokens, mask, k, T) for k in range(1, self.n_future + 1)))
        stats: dict = {}
        if self.per_head_backward and torch.is_grad_enabled():
            params = [self.embed.weight, *self.head_norm.parameters(), *self.heads.parameters()]
            loss = _PerHeadBackward.apply(hidden, self, targets, masks, stats, *params)
        else:
            states = self.head_states(hidden)
            loss = sum(self.head_loss(k, z, targets[k], masks[k], stats) for k, z in enumerate(states))
        if len(self.summaries):
            loss = loss + self.summary_loss(hidden, batch)
        return {"loss": loss, **head_metrics(stats)}

    # --- decoding -------------------------------------------------------------------------------------------------
    def start_decoding(self, batch_size: int, device) -> CacheGroup:
        dtype = self.embed.weight.dtype
        heads = [DecodingCache([b.make_cache(batch_size, device, dtype) for b in blocks])
                 for blocks in self.heads if self.head_type == "block"]
        return CacheGroup(super().start_decoding(batch_size, device), *heads)

    def decode_forward(self, tokens: torch.Tensor, state: CacheGroup, **trunk_options):
        """Next-token logits [B, m, V] and drafting features: the head blocks' states [B, m, n-1, D] (their caches
        advance with the trunk's), or for MLP heads, which read one position, the trunk's hidden state [B, m, D]."""
        hidden = self.hidden(tokens, cache=state.caches[0], **trunk_options)
        if self.head_type == "mlp" or self.n_future == 1:
            return self.logits(hidden), hidden
        states = self.head_states(hidden, list(state.caches[1:]), **trunk_options)
        return self.logits(hidden), torch.stack(states[1:], dim=2)

    def draft_logits(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """Heads 2..k+1 at one position per row (features [B, ...] from `decode_forward`): logits [B, k, V],
        guesses of the tokens 2..k+1 ahead. Only these k rows are unembedded; k = 0 (one head: nothing to draft
        with) gives [B, 0, V], so every step is a plain step."""
        if k == 0:
            return features.new_zeros(features.shape[0], 0, self.unembedding.shape[0])
        if self.head_type == "mlp":
            states = torch.cat(self.head_states(features[:, None])[1 : k + 1], 1)
        else:
            states = features[:, :k]
        return self.logits(self.head_norm(states))

    def drafters(self, num_drafts: int) -> dict:
        def heads(tokens, state, features, temperature, top_k, max_drafts, width=0):
            logits = self.draft_logits(features, min(self.n_future - 1, max_drafts))
            if width:  # ranked candidates for a tree
                return logits.topk(min(width, logits.shape[-1]), -1).indices, None
            if temperature <= 0:
                return logits.argmax(-1), None
            q = token_probs(logits, temperature, top_k)
            return torch.multinomial(q.flatten(0, 1), 1).view(q.shape[:2]), q

        def heads_then_lookup(tokens, state, features, temperature, top_k, max_drafts, width=0):
            """Each row drafts the lookup continuation where it finds one as deep as the heads reach, else the
            heads' drafts; in a tree the lookup continuation is every depth's first candidate."""
            k = min(self.n_future - 1, max_drafts)
            found, counts = lookup_drafts(tokens, min(num_drafts, max_drafts), counts=True)
            drafts, q = heads(tokens, state, features, temperature, top_k, max_drafts, width)
            if found.shape[1] < k or k == 0:
                return drafts, q
            use = counts >= k
            found = found[:, :k]
            if width:
                ranked = torch.cat([found[..., None], drafts[..., : width - 1]], -1)
                return torch.where(use[:, None, None], ranked, drafts), None
            if q is not None:  # a row's lookup drafts are deterministic: their q is one-hot
                q = torch.where(use[:, None, None], F.one_hot(found, q.shape[-1]).to(q.dtype), q)
            return torch.where(use[:, None], found, drafts), q

        return {**super().drafters(num_drafts),
                "heads": Drafter(heads, reads_tokens=False, ranks_candidates=True),  # features alone: no history
                "heads+lookup": Drafter(heads_then_lookup, ranks_candidates=True)}
