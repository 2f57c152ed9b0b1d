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
from objectives import metrics as M
from objectives.base import Objective
from objectives.decoding import CacheGroup, expected_accept_length, lookup_drafts, sample_token, token_probs
from objectives.losses import chunked_cross_entropy


def shifted(tokens: torch.Tensor, mask: torch.Tensor, k: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets k positions ahead for positions 0..length-1 ([B, length]); positions past the end are masked."""
    targets, valid = tokens[:, k : k + length], mask[:, k : k + length].float()
    pad = length - targets.shape[1]
    return F.pad(targets, (0, pad)), F.pad(valid, (0, pad))


class _PerHeadBackward(torch.autograd.Function):
    """The paper's memory order (Gloeckle et al. 2024, section 3.2 and Figure 2), inside one autograd node.

    Forward: given the trunk's output, for each head run forward and loss and backward down to the head's input,
    so only one head's logits (chunked, at that) are alive at a time; then one backward through the heads' blocks
    to the trunk output. The gradients are kept and handed out in `backward`, so Lightning's automatic
    optimization, gradient accumulation and DDP see a single ordinary backward per step.
    """

    @staticmethod
    def forward(ctx, hidden, objective, targets, masks, stats, *params):
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            states = objective.head_states(h)
            leaves = [z.detach().requires_grad_() for z in states]
            output_params = [objective.embed.weight, *objective.head_norm.parameters()]
            output_grads: list = [None] * len(output_params)
            state_grads, total = [], hidden.new_zeros((), dtype=torch.float32)
            for k, leaf in enumerate(leaves):
                loss_k = objective.head_loss(k, leaf, targets[k], masks[k], stats)
                grads = torch.autograd.grad(loss_k, [leaf, *output_params], allow_unused=True)
                state_grads.append(grads[0])
                # accumulate in place: one embedding-sized buffer, not one per head
                output_grads = [new if old is None else old if new is None else old.add_(new)
                                for old, new in zip(output_grads, grads[1:])]
                total = total + loss_k.detach()
            block_params = list(objective.heads.parameters())
            through_blocks = torch.autograd.grad(states, [h, *block_params], grad_outputs=state_grads,
                                                 allow_unused=True)
        by_param = {id(p): g for p, g in zip(output_params + block_params, output_grads + list(through_blocks[1:]))}
        grads = [by_param.get(id(p)) for p in params]
        ctx.save_for_backward(through_blocks[0], *[g if g is not None else torch.zeros_like(p)
                                                   for g, p in zip(grads, params)])
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grads = ctx.saved_tensors
        # scaled in place: the saved gradients are used once, and a copy would double their memory
        return (grad_hidden.mul_(grad_output), None, None, None, None, *(g.mul_(grad_output) for g in grads))


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
    def head_states(self, hidden: torch.Tensor, caches: list | None = None) -> list[torch.Tensor]:
        """[z_1 .. z_n]: z_1 is the trunk output; z_k the output of head k's blocks (pre-norm)."""
        states = [hidden]
        for k, blocks in enumerate(self.heads):
            x = states[-1] if self.topology == "causal" else hidden
            for j, block in enumerate(blocks):
                x = block(x, cache=caches[k].layers[j] if caches else None)
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

    def decode_forward(self, tokens: torch.Tensor, state: CacheGroup):
        states = self.head_states(self.hidden(tokens, cache=state.caches[0]), list(state.caches[1:]))
        return self.logits(states[0]), torch.stack(states[1:], dim=2) if len(states) > 1 else states[0][:, :, None, :0]

    def drafters(self, num_drafts: int) -> dict:
        def heads(tokens, state, features, temperature, top_k, max_drafts):
            k = min(self.n_future - 1, max_drafts)
            logits = self.logits(self.head_norm(features[:, :k]))  # [B, k, V]: guesses of tokens t+2 .. t+k+1
            if temperature <= 0:
                return logits.argmax(-1), None
            q = token_probs(logits, temperature, top_k)
            return torch.multinomial(q.flatten(0, 1), 1).view(q.shape[:2]), q

        def heads_then_lookup(tokens, state, features, temperature, top_k, max_drafts):
            found = lookup_drafts(tokens, min(num_drafts, max_drafts))
            if found.shape[1] >= self.n_future - 1:
                return found, None
            return heads(tokens, state, features, temperature, top_k, max_drafts)

        return {**super().drafters(num_drafts), "heads": heads, "heads+lookup": heads_then_lookup}


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

    def forward(self, previous: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return self.block(self.merge(torch.cat([self.hidden_norm(previous), self.embed_norm(embedded)], -1)))


class DeepSeekMTP(Objective):
    """Sequential multi-token prediction (DeepSeek-V3, section 2.2).

    Depth k's module reads the previous depth's hidden state at t and the embedding of token t+k, and predicts
    token t+k+1, keeping the full causal chain. Loss = L_main + (lambda / D) * sum_k CE_k.

    Args:
        depth: number of MTP modules D.
        mtp_weight: lambda.
        **kwargs: the base objective's arguments.
    """

    default_drafter = "modules"

    def __init__(self, *args, depth: int = 1, mtp_weight: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        if depth < 1 or mtp_weight < 0:
            raise ValueError(f"depth ({depth}) must be at least 1 and mtp_weight ({mtp_weight}) non-negative")
        self.depth, self.mtp_weight, self.draft_window = depth, mtp_weight, 64
        self.mtp_modules = nn.ModuleList(MTPModule(self.trunk.make_block(), self.trunk.d_model) for _ in range(depth))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        T = tokens.shape[1] - 1
        hidden = self.hidden(inputs[:, :-1])
        stats: dict = {}
        nll, count, correct, predictions = chunked_cross_entropy(
            hidden, self.unembedding, tokens[:, 1:], mask[:, 1:], self.hparams.ce_chunk_size, return_predictions=True)
        stats[0] = (nll.detach(), count, correct, predictions)
        loss = nll / count.clamp(min=1)
        previous = hidden
        for k, module in enumerate(self.mtp_modules, start=1):
            next_inputs, _ = shifted(inputs, mask, k, T)
            previous = module(previous, self.embed(next_inputs))
            targets, valid = shifted(tokens, mask, k + 1, T)
            nll_k, count_k, correct_k, predictions_k = chunked_cross_entropy(
                module.out_norm(previous), self.unembedding, targets, valid, self.hparams.ce_chunk_size,
                return_predictions=True)
            stats[k] = (nll_k.detach(), count_k, correct_k, predictions_k)
            loss = loss + self.mtp_weight / self.depth * nll_k / count_k.clamp(min=1)
        if len(self.summaries):
            loss = loss + self.summary_loss(hidden, batch)
        return {"loss": loss, **head_metrics(stats)}

    # --- decoding: the modules draft from the trunk's recent hidden states -----------------------------------------
    def start_decoding(self, batch_size: int, device):
        return HiddenHistory(super().start_decoding(batch_size, device))

    def decode_forward(self, tokens: torch.Tensor, state: "HiddenHistory"):
        hidden = self.hidden(tokens, cache=state.cache)
        state.append(hidden)
        return self.logits(hidden), hidden

    def drafters(self, num_drafts: int) -> dict:
        def modules(tokens, state, features, temperature, top_k, max_drafts):
            # tokens: [B, S], the last one not yet through the trunk; state.hidden: [B, S-1, D]
            window = min(self.draft_window, state.hidden.shape[1])
            previous = state.hidden[:, -window:]
            known = tokens[:, -window - 1 :]  # token i+1 for every window position i
            drafts, dists = [], []
            for module in self.mtp_modules[: max(0, max_drafts)]:
                next_embedded = self.embed(known[:, 1:])
                previous = module(previous, next_embedded)
                logits = self.logits(module.out_norm(previous[:, -1]))
                if temperature <= 0:
                    token, q = logits.argmax(-1), None
                else:
                    q = token_probs(logits, temperature, top_k)
                    token = torch.multinomial(q, 1)[:, 0]
                drafts.append(token)
                dists.append(q)
                known = torch.cat([known[:, 1:], token[:, None]], 1)  # the next depth reads token i+k+1
            if not drafts:
                return tokens.new_zeros(tokens.shape[0], 0), None
            return torch.stack(drafts, 1), (torch.stack(dists, 1) if temperature > 0 else None)

        return {**super().drafters(num_drafts), "modules": modules}


class HiddenHistory:
    """The trunk's cache plus its output hidden states for every position, cropped together."""

    def __init__(self, cache):
        self.cache, self.hidden = cache, None

    @property
    def length(self) -> int:
        return self.cache.length

    def append(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden], 1)

    def crop(self, length: int) -> None:
        self.cache.crop(length)
        self.hidden = self.hidden[:, :length]
