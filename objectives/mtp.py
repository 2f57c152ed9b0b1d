"""Multi-token prediction: Meta's parallel (or causal) heads trained with the memory-saving per-head backward
(Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction"), and self-speculative
decoding with the heads as drafters. DeepSeek-V3's sequential modules are in `objectives/deepseek_mtp.py`.

Head k predicts token t+k from the prefix up to t. Head 1 is the trunk itself, so n_future=1 is exactly next-token
prediction, and `match_params` moves n-1 trunk layers into heads 2..n for a comparison at equal parameter count
(the NTP model's last layer plays head 1, as in the paper). Heads 2..n stack on the trunk's output, or
(`topology="siblings"`) stand beside its last layer as in Meta's released model. The heads learn the data's
tokens, or (`head_targets="self"`) the model's own greedy continuations, which are what a self-speculative decoder
accepts (Medusa-2's self-distillation).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.contracts import BranchingTrunk
from models.layers import DecodingCache, RMSNorm, linear
from objectives.decoding.drafters import CacheGroup, Drafter, PromptLookup, lookup_drafts
from objectives.decoding.greedy import greedy_token, left_to_right, token_probs
from objectives.training import metrics as M
from objectives.training.causal import CausalObjective
from objectives.training.losses import chunk_positions, chunked_cross_entropy
from objectives.training.multi_token import head_metrics, shifted


def head_cross_entropy_with_grads(hidden, weight, targets, mask, scale, grad_weight, chunk_mib: float, dtype):
    """Cross-entropy of one head over the tied unembedding with its gradients computed on the spot, chunk by chunk.

    hidden [N, D] (the head's normalised output), weight [V, D], targets [N], mask [N]; the loss's gradient is
    d(scale * sum mask * NLL): (softmax - onehot) * mask * scale per position, computed in `dtype`. The
    unembedding's share is added in place into grad_weight [V, D] (addmm_, no [V, D] temporary), so no
    embedding-sized buffer is ever allocated per head or per chunk; grad_weight None: a frozen unembedding, no
    share computed. Returns (summed NLL, correct count, argmax predictions [N], gradient for hidden [N, D]).
    """
    nll, correct = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    grad_hidden, predictions = torch.empty_like(hidden), torch.empty_like(targets)
    w = weight.to(dtype)
    chunk_size = chunk_positions(chunk_mib, weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_size):
        span = slice(start, start + chunk_size)
        h = hidden[span].to(dtype)
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
    grad = grad.mul_((mask * scale)[:, None]).to(h.dtype)
    del logits, probs  # under autocast the fp32 buffer goes before the matmuls (a no-op in fp32: it is grad)
    if grad_weight is not None:
        grad_weight.addmm_(grad.t(), h)
    predictions = predictions[:, 0]
    return nll, ((predictions == targets).float() * mask).sum(), predictions, grad @ w


class _PerHeadBackward(torch.autograd.Function):
    """The paper's memory order (Gloeckle et al. 2024, section 3.2 and Figure 2), inside one autograd node.

    Forward: given the trunk's output (and with sibling heads the input of its last layer, `branch`), for each head
    compute its loss and gradients on the spot (only one chunk of one head's logits alive at a time), the
    unembedding's gradient accumulated in place into one buffer of the compute dtype; then one backward through the
    heads' norm and blocks to the trunk output (and `branch`). The gradients are handed out in `backward`, so
    Lightning's automatic optimization, gradient accumulation and DDP see a single ordinary backward per step.
    Peak memory over NTP: that one buffer (half an fp32 gradient under bf16 autocast).
    """

    @staticmethod
    def forward(ctx, hidden, branch, objective, targets, masks, stats, *params):
        embed = objective.unembedding  # the output projection: tied, or an untied lm_head
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else embed.dtype
        # a frozen unembedding (head_targets "self", a frozen pretrained model) takes no gradient: none computed
        grad_embed = torch.zeros(embed.shape, dtype=dtype, device=embed.device) if embed.requires_grad else None
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            b = None if branch is None else branch.detach().requires_grad_()
            states = objective.head_states(h, branch=b)
            leaves = [z.detach().requires_grad_() for z in states]
            outputs = [objective.head_output(k, leaf) for k, leaf in enumerate(leaves)]
        total, output_grads = hidden.new_zeros((), dtype=torch.float32), []
        with torch.autocast(hidden.device.type, enabled=False):
            for k, out in enumerate(outputs):
                count = masks[k].sum()
                scale = objective.loss_weights[k] / count.clamp(min=1)
                nll, correct, predictions, grad = head_cross_entropy_with_grads(
                    out.detach().flatten(0, 1), embed, targets[k].flatten(), masks[k].flatten().float(), scale,
                    grad_embed, objective.hparams.ce_chunk_size, dtype)
                stats[k] = (nll, count, correct, predictions.view(targets[k].shape))
                output_grads.append(grad.view(out.shape).to(out.dtype))
                total = total + scale * nll
        with torch.enable_grad():
            norm_params = list(objective.shared_norm.parameters())
            pairs = [(o, g) for o, g in zip(outputs, output_grads) if o.requires_grad]
            normed = torch.autograd.grad([o for o, _ in pairs], [*leaves, *norm_params],
                                         grad_outputs=[g for _, g in pairs], allow_unused=True)
            state_grads = [g if g is not None else torch.zeros_like(z) for g, z in zip(normed, leaves)]
            block_params = list(objective.heads.parameters())
            inputs = [h] if b is None else [h, b]
            through_blocks = torch.autograd.grad(states, [*inputs, *block_params], grad_outputs=state_grads,
                                                 allow_unused=True)
        by_param = {id(embed): grad_embed,
                    **{id(p): g for p, g in zip(norm_params, normed[len(leaves):])},
                    **{id(p): g for p, g in zip(block_params, through_blocks[len(inputs):])}}
        # kept on ctx, not saved: backward releases them, so the gradients it returns are taken over, not copied
        ctx.grads = [through_blocks[0], through_blocks[1] if b is not None else None,
                     *(by_param.get(id(p)) for p in params)]
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        # scaled in place: the gradients are used once, and a copy would double their memory
        return (*(None if g is None else g.mul_(grad_output) for g in grads[:2]), None, None, None, None,
                *(None if g is None else g.mul_(grad_output) for g in grads[2:]))


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
    """n future tokens from one trunk (Gloeckle et al. 2024, "Better & Faster Large Language Models via
    Multi-token Prediction", arXiv:2404.19737).

    Loss = sum_k w_k CE(head_k(x_{<=t}), x_{t+k}), each CE the mean over the head's target positions. The paper's
    loss is the sum over heads (its section 2: -sum_t sum_k log P(x_{t+k} | z_t)): `head_reduction="sum"` takes
    the weights as given (all 1 by default: the sum of the n heads' losses); "mean", the default, normalises them
    to sum to 1 (the mean of the heads' losses by default), which keeps the loss on next-token prediction's scale
    whatever n, so a learning rate tuned for NTP carries over. Head 1's figures (val/ntp_loss) are the same either
    way.

    Topologies (heads 2..n; head 1 is always the whole trunk, so greedy decoding is the trunk's):
        "parallel": every head reads the trunk's output h (after its last layer and final norm): the heads stack
            on head 1's output and go through a norm of their own (`head_norm`).
        "causal": head k reads head k-1's output (head 2 reads h).
        "siblings": the wiring of Meta's released model (facebook/multi-token-prediction, llama/model.py): a
            shared trunk of n_layers - head_layers blocks gives z; the trunk's last head_layers blocks are head 1,
            and heads 2..n, head_layers blocks each, read the same z beside them; every head, head 1 included, goes
            through the trunk's one final norm, then the shared unembedding. With match_params and head_layers 1 the
            trunk keeps n_layers - n + 1 blocks, head 1 the last of them: NTP's parameter count, and no norm of the
            heads' own. Needs head_type "block" and a trunk that hands out z (`models.contracts.BranchingTrunk`:
            the project's trunks, not HFTrunk).

    Args:
        n_future: number of heads; head k predicts token t+k.
        head_layers: blocks per head (heads 2..n; with "siblings" also head 1's, the trunk's last ones).
        head_type: "block": each head block is a layer of the trunk's kind (`make_block()`; the paper's heads, and
            at decode time they need caches of their own); "mlp": Medusa's residual MLP on the trunk's last hidden
            state (no attention, no cache, about d_model^2 parameters a block).
        topology: "parallel", "causal" or "siblings" (above).
        loss_weights: one weight per head; default uniform.
        head_reduction: "mean" (weights normalised to sum to 1) or "sum" (weights as given: the paper's sum).
        match_params: move (n-1) * head_layers trunk blocks into the heads (equal parameters to NTP).
        per_head_backward: the paper's memory-saving order; false computes every head then one backward.
        head_targets: what heads 2..n learn to predict. "data": the data's tokens. "self": the model's own greedy
            continuation, Medusa-2's self-distillation (Cai et al. 2024, "Medusa", section 2.3.2; Samragh et al.
            2025 train on the model's rollout too). A self-speculative decoder accepts head k's draft only where it
            equals the model's greedy token k steps ahead, which the data's next tokens often are not. In training
            each row becomes its first `self_prefix` data tokens followed by the model's greedy continuation to the
            row's length, and a target counts only where its whole path is generated (position t >= self_prefix
            - 1). The trunk, the embedding and an untied lm_head are frozen (and the trunk kept in eval mode):
            only heads 2..n and their `head_norm` train. Start from a trained MTP or NTP checkpoint (`init_from`).
            Validation keeps the data's tokens, so its figures compare with other runs. Topology "parallel" or
            "causal" only.
        self_prefix: with head_targets "self", the data tokens each row keeps as the prompt of its continuation.
        **kwargs: the base objective's arguments.
    """

    headline_metric = (M.ACCEPT_LEN_TEACHER_FORCED, "accepted length (teacher-forced)")

    default_drafter = "heads"

    def __init__(self, *args, n_future: int = 4, head_layers: int = 1, head_type: str = "block",
                 topology: str = "parallel", loss_weights: list[float] | None = None, head_reduction: str = "mean",
                 match_params: bool = False, per_head_backward: bool = True, head_targets: str = "data",
                 self_prefix: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        if n_future < 1 or head_layers < 1:
            raise ValueError(f"n_future ({n_future}) and head_layers ({head_layers}) must be at least 1")
        if topology not in ("parallel", "causal", "siblings"):
            raise ValueError(f"topology {topology!r} is unknown: use 'parallel', 'causal' or 'siblings'")
        if head_type not in ("block", "mlp"):
            raise ValueError(f"head_type {head_type!r} is unknown: use 'block' (a trunk layer) or 'mlp' (Medusa's)")
        if head_reduction not in ("mean", "sum"):
            raise ValueError(f"head_reduction {head_reduction!r} is unknown: use 'mean' or 'sum' (the paper's)")
        if head_targets not in ("data", "self"):
            raise ValueError(f"head_targets {head_targets!r} is unknown: use 'data' (the data's tokens) or 'self' "
                             f"(the model's own greedy continuation, Medusa-2's self-distillation)")
        if self_prefix < 1:
            raise ValueError(f"self_prefix ({self_prefix}) must be at least 1: the continuation needs a prompt")
        if head_targets == "self":
            self.check_self_targets(n_future, topology)
        if topology == "siblings":
            self.check_siblings(head_type, head_layers, (n_future - 1) * head_layers if match_params else 0)
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
        self.head_type, self.head_layers = head_type, head_layers
        self.register_buffer("loss_weights", weights / weights.sum() if head_reduction == "mean" else weights,
                             persistent=False)
        make = self.trunk.make_block if head_type == "block" else lambda: ResidualMLP(self.trunk.d_model)
        self.heads = nn.ModuleList(nn.ModuleList(make() for _ in range(head_layers)) for _ in range(n_future - 1))
        if topology != "siblings":  # sibling heads share the trunk's final norm
            self.head_norm = RMSNorm(self.trunk.d_model)
        self.head_targets, self.self_prefix = head_targets, self_prefix
        if head_targets == "self":  # the model whose continuation the heads learn stays as it is
            for frozen in (self.trunk, self.embed, getattr(self, "lm_head", None)):
                if frozen is not None:
                    frozen.requires_grad_(False)
            self.trunk.eval()

    def check_self_targets(self, n_future: int, topology: str) -> None:
        """What head_targets "self" needs, refused at construction with the way out."""
        if n_future == 1:
            raise ValueError("head_targets 'self' trains heads 2..n on the model's own continuation, and n_future 1 "
                             "has none: raise n_future, or use head_targets 'data'")
        if topology == "siblings":
            raise ValueError("head_targets 'self' freezes the trunk, but sibling heads share its final norm and its "
                             "last layer is head 1: use topology 'parallel' or 'causal'")
        if len(self.summaries):
            raise ValueError("future summaries shape the trunk, which head_targets 'self' freezes: drop "
                             "model.init_args.summaries, or use head_targets 'data'")

    def train(self, mode: bool = True) -> "MultiTokenPrediction":
        super().train(mode)
        if self.head_targets == "self":  # a frozen trunk keeps any dropout off: its continuation is its greedy one
            self.trunk.eval()
        return self

    def check_siblings(self, head_type: str, head_layers: int, moved: int) -> None:
        """What sibling heads need, refused at construction with the way out."""
        if head_type != "block":
            raise ValueError("topology 'siblings' makes heads 2..n layers beside the trunk's last, which is head 1; "
                             "Medusa's MLP heads (head_type 'mlp') read the trunk's output: use head_type 'block', "
                             "or topology 'parallel' for MLP heads")
        if not isinstance(self.trunk, BranchingTrunk):
            raise ValueError(f"topology 'siblings' needs a trunk that hands out the input of its last layer and "
                             f"names its final norm (models.contracts.BranchingTrunk: Transformer, Mamba, Mamba2, "
                             f"RWKV7); {type(self.trunk).__name__} cannot: use topology 'parallel'")
        if self.trunk.n_layers - moved < head_layers:
            raise ValueError(f"topology 'siblings' makes the trunk's last {head_layers} blocks head 1, but the trunk "
                             f"has {self.trunk.n_layers - moved}" + (" after match_params" if moved else "")
                             + ": give it more layers, or lower head_layers or n_future")

    # --- heads ----------------------------------------------------------------------------------------------------
    @property
    def shared_norm(self) -> nn.Module:
        """The norm heads 2..n share before the unembedding: their own `head_norm`, or with siblings the trunk's
        final norm, which head 1 goes through too (one norm for every head)."""
        return self.trunk.norm if self.topology == "siblings" else self.head_norm

    def trunk_states(self, tokens: torch.Tensor, cache=None,
                     **trunk_options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, branch): the trunk's hidden states h [B, T, D] (head 1's, normalised: the next-token path is the
        whole trunk whatever the topology) and, for sibling heads, branch [B, T, D], the input of the trunk's last
        head_layers blocks, which heads 2..n read (else None: they read h)."""
        if self.topology != "siblings" or not len(self.heads):
            return self.hidden(tokens, cache=cache, **trunk_options), None
        trunk_options = {"mask": "causal", **trunk_options}
        return self.trunk(self.embed(tokens), cache=cache, branch=self.head_layers, **trunk_options)

    def head_states(self, hidden: torch.Tensor, caches: list | None = None, branch: torch.Tensor | None = None,
                    **block_options) -> list[torch.Tensor]:
        """[z_1 .. z_n]: z_1 is the trunk output; z_k the output of head k's blocks (pre-norm), which read the trunk
        output (parallel), head k-1's output (causal) or `branch` (siblings, from `trunk_states`).
        `block_options` (mask, positions, padding_mask) reach the blocks of transformer-layer heads."""
        if self.topology == "siblings" and branch is None and len(self.heads):
            raise ValueError("sibling heads read the input of the trunk's last layer: pass branch "
                             "(MultiTokenPrediction.trunk_states gives it with the trunk's output)")
        states = [hidden]
        for k, blocks in enumerate(self.heads):
            x = {"parallel": hidden, "causal": states[-1], "siblings": branch}[self.topology]
            for j, block in enumerate(blocks):
                if self.head_type == "mlp":
                    x = block(x)
                else:
                    x = block(x, cache=caches[k].layers[j] if caches else None, **block_options)
            states.append(x)
        return states

    def head_output(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """The hidden state the unembedding reads for head k+1 (0-based k; the trunk normalises head 1's)."""
        return state if k == 0 else self.shared_norm(state)

    def head_loss(self, k: int, state, targets, mask, stats: dict) -> torch.Tensor:
        nll, count, correct, predictions = chunked_cross_entropy(
            self.head_output(k, state), self.unembedding, targets, mask, self.hparams.ce_chunk_size,
            return_predictions=True)
        stats[k] = (nll.detach(), count, correct, predictions)
        return self.loss_weights[k] * nll / count.clamp(min=1)

    @torch.no_grad()
    def own_continuation(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What head_targets "self" trains on, from the data's tokens [B, L]: each row's first self_prefix tokens
        followed by the model's greedy continuation to length L, and per head k (1-based) a target mask [B, L]
        counting target j only where its whole greedy path is generated, i.e. its position j - k >= self_prefix - 1
        (for `shifted`, which reads head k's targets j = t + k). The data's loss_mask does not apply: every
        generated token is the model's."""
        B, L = tokens.shape
        if L < self.self_prefix + 2:
            raise ValueError(f"head_targets 'self' keeps each row's first self_prefix={self.self_prefix} tokens as "
                             f"its prompt, and rows of {L} tokens (the data's seq_len + 1) leave head 2 no generated "
                             f"target: lower self_prefix below {L - 1} or raise the data's seq_len")
        if L > self.trunk.max_seq_len:
            raise ValueError(f"head_targets 'self' generates each row to its full {L} tokens (the data's seq_len + "
                             f"1), more than the trunk's max_seq_len {self.trunk.max_seq_len}: raise max_seq_len")
        own = left_to_right(self, tokens[:, : self.self_prefix], L - self.self_prefix)
        position = torch.arange(L, device=tokens.device)
        masks = [(position >= self.self_prefix - 1 + k).float().expand(B, L) for k in range(1, self.n_future + 1)]
        return own, masks

    def loss(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens, inputs, mask = batch["tokens"], batch.get("inputs", batch["tokens"]), batch["loss_mask"]
        T = tokens.shape[1] - 1
        on_own_continuation = self.head_targets == "self" and self.training and torch.is_grad_enabled()
        if on_own_continuation:  # validation keeps the data's tokens: its figures compare with other runs
            if inputs is not tokens and not torch.equal(inputs, tokens):
                raise ValueError("head_targets 'self' replaces each row by the model's own continuation, which "
                                 "leaves no room for separate inputs (teacherless data): use head_targets 'data'")
            tokens, head_masks = self.own_continuation(tokens)
            with torch.no_grad():  # the frozen trunk: no activations to keep
                hidden, branch = self.trunk_states(tokens[:, :-1])
        else:
            head_masks = [mask] * self.n_future
            hidden, branch = self.trunk_states(inputs[:, :-1])
        targets, masks = zip(*(shifted(tokens, m, k, T) for k, m in enumerate(head_masks, start=1)))
        stats: dict = {}
        if self.per_head_backward and torch.is_grad_enabled():
            params = [self.unembedding, *self.shared_norm.parameters(), *self.heads.parameters()]
            loss = _PerHeadBackward.apply(hidden, branch, self, targets, masks, stats, *params)
        else:
            states = self.head_states(hidden, branch=branch)
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
        hidden, branch = self.trunk_states(tokens, cache=state.caches[0], **trunk_options)
        if self.head_type == "mlp" or self.n_future == 1:
            return self.logits(hidden), hidden
        states = self.head_states(hidden, list(state.caches[1:]), branch, **trunk_options)
        return self.logits(hidden), torch.stack(states[1:], dim=2)

    def draft_logits(self, features: torch.Tensor, k: int, stacked: tuple | None = None) -> torch.Tensor:
        """Heads 2..k+1 at one position per row (features [B, ...] from `decode_forward`): logits [B, k, V],
        guesses of the tokens 2..k+1 ahead. Only these k rows are unembedded; k = 0 (one head: nothing to draft
        with) gives [B, 0, V], so every step is a plain step. `stacked` (from `stacked_heads`): the parallel MLP
        heads as one matrix product."""
        if k == 0:
            return features.new_zeros(features.shape[0], 0, self.unembedding.shape[0])
        states = self.mlp_heads_at(features, k, stacked) if self.head_type == "mlp" else features[:, :k]
        return self.logits(self.shared_norm(states))

    def mlp_heads_at(self, x: torch.Tensor, k: int, stacked: tuple | None = None) -> torch.Tensor:
        """MLP heads 2..k+1 on hidden states x [N, D]: their states [N, k, D] (before the norm)."""
        if stacked is None:
            return torch.cat(self.head_states(x[:, None])[1 : k + 1], 1)
        weight, bias = stacked  # head j: x + SiLU(W_j x + b_j), every head in one product
        D = x.shape[-1]
        return x[:, None] + F.silu(linear(x, weight[: k * D], bias[: k * D])).view(-1, k, D)

    def stacked_heads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Parallel MLP heads of one block each all read the trunk's hidden state x, so their weights stacked
        [(n-1) D, D] and biases [(n-1) D] draft with one matrix product instead of n-1 (Medusa's heads are such
        blocks). None for other heads. Made once per decode: a copy of the weights, not a view."""
        if self.head_type != "mlp" or self.topology != "parallel" or not len(self.heads) or len(self.heads[0]) != 1:
            return None
        linears = [blocks[0].linear for blocks in self.heads]
        return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])

    def drafters(self, num_drafts: int, min_confidence: float = 0.25) -> dict:
        """Prompt lookup (every family's), and the heads' drafters:

        - "heads": heads 2..n, up to num_drafts of them, each drafting its argmax (Medusa, Cai et al. 2024; the
          self-speculative decoding of Gloeckle et al. 2024), or a sample for speculative sampling.
        - "confident heads": the same, stopping at the first head whose top probability is below `min_confidence`,
          so the forward carries only likely tokens (on a CPU core a carried token costs a tenth of a plain step or
          so, 0.05-0.15 at 2-8 tokens, so at a speedup near 2 a draft that is right less than about a quarter of the
          time costs more than it brings: hence the default 0.25).
        - "heads+lookup": prompt lookup first, up to num_drafts tokens while its match continues; the heads where
          lookup finds nothing, and after a match shorter than the heads reach. A tree takes lookup's token as the
          first candidate of every depth it covers.

        Each has a batch-1 greedy form for the lean loop (`Drafter.chain`) that drafts the same tokens.
        """
        reach = min(self.n_future - 1, num_drafts)
        floor = math.log(min_confidence) if min_confidence > 0 else -math.inf
        stacked = []  # the heads' stacked weights, made on first use, kept for this decode

        def head_logits(features, k):
            if not stacked:
                stacked.append(self.stacked_heads())
            return self.draft_logits(features, k, stacked[0])

        def heads(tokens, state, features, temperature, top_k, max_drafts, width=0, gate=False):
            logits = head_logits(features, max(0, min(reach, max_drafts)))
            if gate and logits.shape[1]:  # a batch carries the most confident row's count
                logits = logits[:, : int(confident_heads(logits, floor).max())]
            if width:  # ranked candidates for a tree
                return logits.topk(min(width, logits.shape[-1]), -1).indices, None
            if temperature <= 0:
                return greedy_token(logits), None
            q = token_probs(logits, temperature, top_k)
            return torch.multinomial(q.flatten(0, 1), 1).view(q.shape[:2]), q

        def lookup_then_heads(tokens, state, features, temperature, top_k, max_drafts, width=0):
            found, counts = lookup_drafts(tokens, min(num_drafts, max_drafts), counts=True)
            drafts, q = heads(tokens, state, features, temperature, top_k, max_drafts, width)
            h = drafts.shape[1]
            if width:  # a tree keeps the heads' depth; lookup's token leads each depth it covers
                j = min(found.shape[1], h)
                ranked = drafts.clone()
                ranked[:, :j] = torch.cat([found[:, :j, None], drafts[:, :j, : width - 1]], -1)
                use = torch.arange(h, device=drafts.device) < counts[:, None]
                return torch.where(use[..., None], ranked, drafts), None
            K = max(found.shape[1], h)
            # per row: lookup's drafts, then the heads' beyond them, then padding (the row's last lookup draft)
            found = torch.cat([found, found[:, -1:].expand(-1, K - found.shape[1])], 1) if found.shape[1] else found
            position = torch.arange(K, device=drafts.device)
            use_lookup = position < counts[:, None]
            from_heads = ~use_lookup & (position < h)
            padded = F.pad(drafts, (0, K - h))
            merged = torch.where(from_heads, padded, found if found.shape[1] else padded)
            if q is not None:  # lookup's drafts and the padding are deterministic: their q is one-hot
                q = torch.where(from_heads[..., None], F.pad(q, (0, 0, 0, K - h)),
                                F.one_hot(merged, q.shape[-1]).to(q.dtype))
            return merged, q

        def chain(**options):  # the batch-1 greedy forms (`HeadsChain`)
            def start(tokens):
                if not stacked:
                    stacked.append(self.stacked_heads())
                return HeadsChain(self, tokens, reach, stacked[0], **options)
            return start

        return {**super().drafters(num_drafts),
                "heads": Drafter(heads, reads_tokens=False, ranks_candidates=True,  # features alone: no history
                                 chain=chain()),
                "confident heads": Drafter(functools.partial(heads, gate=True), reads_tokens=False,
                                           ranks_candidates=True, chain=chain(floor=floor)),
                "heads+lookup": Drafter(lookup_then_heads, ranks_candidates=True, chain=chain(lookup=num_drafts))}


def confident_heads(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """Per row of heads' logits [..., k, V], how many leading heads have a top probability of at least exp(floor)."""
    top = logits.float().max(-1).values - logits.float().logsumexp(-1)  # log of each head's top probability
    return (top >= floor).long().cumprod(-1).sum(-1)


class HeadsChain:
    """The heads' drafters at batch 1, greedy (`objectives.decoding.drafters.ChainDrafter`), for the lean loop.

    In bf16 the verify forward unembeds, at every fed position, the next-token state and heads 2..k+1's states in
    one product, and the next step drafts from the accepted position's row: a bf16 product of 2 or 3 rows costs
    more than one of 4, so a drafting pass of its own at the accepted position costs more than the extra rows (d256,
    V 4096, 4 fed tokens, AVX-512 bf16 EPYC: 0.7 ms for the 4 verify rows alone, 1.3 ms with the 12 head rows,
    1.4-2.0 ms with a heads pass after). In fp32 on a CPU the heads draft in that pass of their own instead
    (`heads_after`): a few fp32 rows go through `models.layers.linear`'s transposed product, and 4 rows then 3 cost
    less than 16 in one product (cold unembedding, AVX2-only EPYC: 0.62 + 0.55 against 1.50 ms; BENCHMARKS.md,
    "fp32 decoding"). `floor` (log of the confidence threshold): each row also says how many leading heads are
    confident. `lookup` (drafts): prompt lookup first, the heads where it finds nothing or beyond a short match;
    while lookup drafts a whole continuation (a loop, say) the forward leaves the heads out, and should lookup fall
    short after all, the heads draft in a pass of their own at the accepted position.
    """

    def __init__(self, model: "MultiTokenPrediction", tokens: list[int], reach: int, stacked: tuple | None,
                 floor: float | None = None, lookup: int = 0):
        self.model, self.reach, self.stacked, self.floor = model, reach, stacked, floor
        self.lookup, self.lookup_drafts = (PromptLookup(tokens) if lookup else None), lookup
        self.with_heads, self.kept = True, None  # the next forward unembeds the heads; else its head states
        self.heads_after = model.unembedding.dtype == torch.float32 and model.unembedding.device.type == "cpu"

    def forward(self, ids: torch.Tensor, state: CacheGroup, last: bool = False) -> torch.Tensor:
        """ids [1, m] -> [m, 1 + k (+ 1)]: the argmax of the next token and of each head (then the confident
        heads' count) at each position; with `last`, at the last position only (a prefill)."""
        model, k = self.model, self.reach
        hidden, branch = model.trunk_states(ids, cache=state.caches[0])
        if model.head_type == "block" and model.n_future > 1:  # every head block's cache advances with the trunk
            states = torch.stack(model.head_states(hidden, list(state.caches[1:]), branch)[1:], 2)[0, :, :k]
        hidden = hidden[0, -1:] if last else hidden[0]
        if model.head_type == "block" and k:
            states = states[-1:] if last else states
        if not last and (self.heads_after or not self.with_heads):  # keep what the heads read, unembed the argmax
            self.kept = states if model.head_type == "block" else hidden
            return greedy_token(model.logits(hidden), keepdim=True)
        if k == 0:  # nothing to draft with
            states = hidden[:, None][:, :0]
        elif model.head_type == "mlp":
            states = model.mlp_heads_at(hidden, k, self.stacked)
        logits = model.logits(torch.cat([hidden[:, None], model.shared_norm(states)], 1))  # [m, 1 + k, V]
        return self.rows(logits)

    def rows(self, logits: torch.Tensor, skip: int = 1) -> torch.Tensor:
        """Argmax rows [m, c] of logits [m, c, V], then (gated) the count of confident heads among those from
        `skip` on (1: the first is the next token's)."""
        rows = greedy_token(logits)
        if self.floor is not None:
            rows = torch.cat([rows, confident_heads(logits[:, skip:], self.floor)[:, None]], 1)
        return rows

    def drafts(self, rows: list[list[int]], at: int, max_drafts: int) -> list[int]:
        found = self.lookup(min(self.lookup_drafts, max_drafts)) if self.lookup is not None else []
        h = min(self.reach, max_drafts)
        self.with_heads = self.lookup is None or len(found) < h  # the heads for the step after a short lookup
        if not self.with_heads:
            return found
        if h and len(rows[at]) == 1:  # the forward left the heads out: they draft here, at the accepted position
            logits = self.model.draft_logits(self.kept[at : at + 1], h, self.stacked)
            row = [rows[at][0]] + self.rows(logits, skip=0).tolist()[0]
        else:
            row = rows[at]
        if self.floor is not None:
            h = min(h, row[-1])
        return found + row[1 + len(found) : 1 + h]
