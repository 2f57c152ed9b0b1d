"""Multi-token prediction: Meta's parallel (or causal) heads trained with the memory-saving per-head backward
(Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction"), DeepSeek-V3's
sequential MTP modules (DeepSeek-AI 2024, section 2.2), and self-speculative decoding with either as drafter.

Head k predicts token t+k from the prefix up to t. Head 1 is the trunk itself, so n_future=1 is exactly next-token
prediction, and `match_params` moves n-1 trunk layers into heads 2..n for a comparison at equal parameter count
(the NTP model's last layer plays head 1, as in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import DecodingCache, RMSNorm
from objectives.training import metrics as M
from objectives.training.base import Objective
from objectives.decoding.greedy import token_probs
from objectives.decoding.speculative import CacheGroup, Drafter, expected_accept_length, lookup_drafts
from objectives.training.losses import chunk_positions, chunked_cross_entropy


def shifted(tokens: torch.Tensor, mask: torch.Tensor, k: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets k positions ahead for positions 0..length-1 ([B, length]); positions past the end are masked."""
    targets, valid = tokens[:, k : k + length], mask[:, k : k + length].float()
    pad = length - targets.shape[1]
    return F.pad(targets, (0, pad)), F.pad(valid, (0, pad))


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


class MultiTokenPrediction(Objective):
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


def head_metrics(stats: dict) -> dict:
    """Next-token figures from head 1, per-head loss and accuracy, and the expected accepted length."""
    nll, count = stats[0][0], stats[0][1]
    metrics = {}
    for k, (head_nll, head_count, correct, _) in stats.items():
        metrics[M.head_loss(k + 1)] = (head_nll / head_count.clamp(min=1), int(head_count))
        metrics[M.head_acc(k + 1)] = (correct / head_count.clamp(min=1), int(head_count))
    if len(stats) > 1:
        total, positions = expected_accept_length([stats[k][3] for k in sorted(stats)])
        if positions:
            metrics[M.ACCEPT_LEN_TEACHER_FORCED] = (total / positions, positions)
    return {"ntp_nll": nll, "ntp_tokens": count, "metrics": metrics}


class MTPModule(nn.Module):
    """One DeepSeek-V3 MTP module: h_k = Block_k(M_k [RMSNorm(h_{k-1}); RMSNorm(Emb(x_{t+k}))]), then a norm
    before the shared output head."""

    def __init__(self, block: nn.Module, d_model: int):
        super().__init__()
        self.hidden_norm, self.embed_norm, self.out_norm = RMSNorm(d_model), RMSNorm(d_model), RMSNorm(d_model)
        self.merge = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block

    def forward(self, previous: torch.Tensor, embedded: torch.Tensor, cache=None) -> torch.Tensor:
        merged = self.merge(torch.cat([self.hidden_norm(previous), self.embed_norm(embedded)], -1))
        return self.block(merged) if cache is None else self.block(merged, cache=cache)


class DeepSeekMTP(Objective):
    """Sequential multi-token prediction (DeepSeek-V3, section 2.2).

    Depth k's module reads the previous depth's hidden state at t and the embedding of token t+k, and predicts
    token t+k+1, keeping the full causal chain. Loss = L_main + (lambda / D) * sum_k CE_k.

    Args:
        depth: number of MTP modules D.
        mtp_weight: lambda.
        **kwargs: the base objective's arguments.
    """

    headline_metric = (M.ACCEPT_LEN_TEACHER_FORCED, "accepted length (teacher-forced)")

    default_drafter = "modules"

    def __init__(self, *args, depth: int = 1, mtp_weight: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        if depth < 1 or mtp_weight < 0:
            raise ValueError(f"depth ({depth}) must be at least 1 and mtp_weight ({mtp_weight}) non-negative")
        self.depth, self.mtp_weight = depth, mtp_weight
        self.mtp_modules = nn.ModuleList(MTPModule(self.trunk.make_block(), self.trunk.d_model) for _ in range(depth))

    def module_states(self, hidden: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """h_k for k = 1..D over the whole sequence,
        h_k(t) = Block_k(M_k [RMSNorm(h_{k-1}(t)); RMSNorm(Emb(x_{t+k}))]), h_0 the trunk's hidden states [B, T, D]:
        h_k(t) predicts token t+k+1 and has read no token after t+k."""
        states, previous = [], hidden
        for k, module in enumerate(self.mtp_modules, start=1):
            next_inputs, _ = shifted(inputs, mask, k, hidden.shape[1])
            previous = module(previous, self.embed(next_inputs))
            states.append(previous)
        return states

    def loss(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        T = tokens.shape[1] - 1
        hidden = self.hidden(inputs[:, :-1])
        stats: dict = {}
        nll, count, correct, predictions = chunked_cross_entropy(
            hidden, self.unembedding, tokens[:, 1:], mask[:, 1:], self.hparams.ce_chunk_size, return_predictions=True)
        stats[0] = (nll.detach(), count, correct, predictions)
        loss = nll / count.clamp(min=1)
        for k, (module, previous) in enumerate(zip(self.mtp_modules, self.module_states(hidden, inputs, mask)), 1):
            targets, valid = shifted(tokens, mask, k + 1, T)
            nll_k, count_k, correct_k, predictions_k = chunked_cross_entropy(
                module.out_norm(previous), self.unembedding, targets, valid, self.hparams.ce_chunk_size,
                return_predictions=True)
            stats[k] = (nll_k.detach(), count_k, correct_k, predictions_k)
            loss = loss + self.mtp_weight / self.depth * nll_k / count_k.clamp(min=1)
        if len(self.summaries):
            loss = loss + self.summary_loss(hidden, batch)
        return {"loss": loss, **head_metrics(stats)}

    # --- decoding: the modules draft, each with its own attention cache -------------------------------------------
    def start_decoding(self, batch_size: int, device) -> "ModuleChainState":
        dtype = self.embed.weight.dtype
        return ModuleChainState(super().start_decoding(batch_size, device),
                                [m.block.make_cache(batch_size, device, dtype) for m in self.mtp_modules])

    def decode_forward(self, tokens: torch.Tensor, state: "ModuleChainState", **trunk_options):
        hidden = self.hidden(tokens, cache=state.cache, **trunk_options)
        return self.logits(hidden), hidden

    def drafters(self, num_drafts: int) -> dict:
        def modules(tokens, state, features, temperature, top_k, max_drafts, width=0):
            """tokens [B, t+2]: the certain tokens, the last (t+1) not yet through the trunk."""
            t = tokens.shape[1] - 2
            drafts, ranked, dists, speculative = [], [], [], None
            for k, module in enumerate(self.mtp_modules[: max(0, max_drafts)], start=1):
                # module k at position i reads h_{k-1}(i) and token i+k; it commits the positions whose token
                # i+k is certain (i <= t+1-k) and runs on past them with the drafts, then forgets those
                start = state.committed[k - 1]
                previous = state.pending[k - 1] if speculative is None else torch.cat([state.pending[k - 1],
                                                                                       speculative], 1)
                known = tokens[:, start + k :]
                inputs = torch.cat([known, torch.stack(drafts, 1)], 1) if drafts else known
                out = module(previous, self.embed(inputs[:, : previous.shape[1]]), cache=state.caches[k - 1])
                commit = max(0, min(t + 2 - k - start, previous.shape[1]))
                state.caches[k - 1].crop(start + commit)
                state.committed[k - 1] = start + commit
                state.pending[k - 1] = state.pending[k - 1][:, commit:]
                if k < self.depth:
                    state.pending[k] = torch.cat([state.pending[k], out[:, :commit]], 1)
                speculative = out[:, commit:]
                logits = self.logits(module.out_norm(out[:, -1]))  # a guess of token t+k+1
                if temperature <= 0 or width:
                    token, q = logits.argmax(-1), None
                else:
                    q = token_probs(logits, temperature, top_k)
                    token = torch.multinomial(q, 1)[:, 0]
                if width:
                    ranked.append(logits.topk(min(width, logits.shape[-1]), -1).indices)
                drafts.append(token)
                dists.append(q)
            if width:
                return (torch.stack(ranked, 1) if ranked else tokens.new_zeros(tokens.shape[0], 0, width)), None
            if not drafts:
                return tokens.new_zeros(tokens.shape[0], 0), None
            return torch.stack(drafts, 1), (torch.stack(dists, 1) if temperature > 0 else None)

        return {**super().drafters(num_drafts), "modules": Drafter(modules, ranks_candidates=True)}


class ModuleChainState:
    """The trunk's decoding cache and the MTP modules' own attention caches (DeepSeek-V3's modules are causal
    over positions). `pending[k]` holds the committed outputs h_k (h_0: the trunk's) of the positions module k+1
    has not read yet, a few positions, never the whole history; `committed[k]` counts the positions in module
    k+1's cache. The modules draft for the whole batch at once (`per_row = False`)."""

    per_row = False

    def __init__(self, cache, module_caches: list):
        self.cache, self.caches = cache, module_caches
        self.committed = [0] * len(module_caches)
        self.pending: list = [None] * len(module_caches)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths

    def accept(self, hidden: torch.Tensor) -> None:
        """The trunk's outputs at the positions just made certain."""
        if self.pending[0] is None:  # the first call: every module's buffer starts empty
            self.pending = [hidden[:, :0] for _ in self.pending]
        self.pending[0] = torch.cat([self.pending[0], hidden], 1)

    def crop(self, length) -> None:
        self.cache.crop(length)

    def __iter__(self):
        return iter(self.cache)
