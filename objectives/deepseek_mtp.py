"""DeepSeek-V3's sequential multi-token prediction (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section
2.2), and self-speculative decoding with its modules as the drafter.

Depth k's module reads the previous depth's hidden state at t and the embedding of token t+k, and predicts token
t+k+1: unlike Meta's parallel heads (`objectives/mtp.py`), the modules keep the full causal chain.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import RMSNorm
from objectives.decoding.drafters import Drafter
from objectives.decoding.greedy import token_probs
from objectives.training import metrics as M
from objectives.training.causal import CausalObjective
from objectives.training.losses import chunked_cross_entropy
from objectives.training.multi_token import head_metrics, shifted


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


class DeepSeekMTP(CausalObjective):
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
