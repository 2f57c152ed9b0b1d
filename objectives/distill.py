"""Retrofitting a trained next-token model into a multi-token predictor by online self-distillation.

The model and decoding follow Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its Multi-Token
Prediction Potential" (arXiv 2507.11851): learned mask tokens appended after the prefix, gated LoRA that is active
only at the mask positions (so the next-token path is the frozen model's, bit for bit), a small sampler head, and
decoding that the model's own next-token path verifies in the same forward (lossless). Masks follow every draft
token of the step ("quadratic decoding"), so whichever prefix is accepted, the next drafts were made after exactly it.
Kirchenbauer et al. 2026, "Multi-Token Prediction via Self-Distillation" (arXiv 2602.06019) add ConfAdapt decoding:
keep the longest prefix of drafts whose probability stays above a threshold tau, at least one token; no
verification, so lossy.

Two training objectives (`objective`), each against a frozen teacher:
- "teacher_rollout": the masks learn the teacher's own greedy continuation, the self-distilled target of Samragh et
  al. 2025 and FastMTP (Cai et al. 2025); only the adapters, mask embeddings and sampler train.
- "student_forced": Kirchenbauer et al. 2026's objective. The student proposes its k tokens in one forward (its
  argmax at the prefix's last token and at each mask), the teacher reads the prefix followed by those proposals
  (student forcing) and labels each position with its own argmax there (the "hard teacher"); the whole student
  (network, mask embeddings, adapters) trains on those labels, so its next-token path moves too.

The student starts from an NTP checkpoint of the project (`init_from`, a warm start); the teacher is the same
checkpoint as a frozen companion. Over a pretrained Hugging Face model (`models.HFTrunk`, for the model types that
take a mask tensor) the model is the network retrofitted, and its teacher is that network frozen: its own network
with the adapters shut ("teacher_rollout", where the network does not train), or a frozen copy of it as it starts
("student_forced"). Per training sequence x (tokens x_0..x_L-1):

  1. anchors t_1..t_R, sampled among the positions whose next token is a target; per region k_r ~ U{2, ..., k}
     (Kirchenbauer et al.'s randomised k)
  2. the student reads x, then for each region the k-1 mask tokens m_1..m_k-1 at rotary positions t_r+1..t_r+k-1
     (the positions the continuation would have); m_s attends to x_<=t_r and to m_<=s of its own region, x
     attends causally to x alone, and the adapters act only at mask positions
  3. "teacher_rollout": the teacher's greedy rollout after each anchor, all regions of the batch at once through
     its cache:
         g^r_j = argmax_v p_T(v | x_<=t_r, g^r_<j),  j = 1..k
     target "ce":  L = mean over counted (r, s), s < k_r, of  -log q_S(g^r_s+1 | x_<=t_r, m_<=s)
     target "kl":  L = mean of  KL( p_T(. | x_<=t_r, g^r_<=s) || q_S(. | x_<=t_r, m_<=s) )
     With the sampler head, q_S reads [the embedding of the token before the one it predicts (g^r_s; in decoding
     the draft before); the mask's hidden state].
  3'. "student_forced": the student's own proposals from the forward of step 2, with q^r_1 = q_S(. | x_<=t_r) (its
     next-token distribution) and q^r_s+1 = q_S(. | x_<=t_r, m_<=s),
         y^r_j = argmax_v q^r_j(v)                          (detached),  j = 1..k
     the teacher reads x and y^r_1..y^r_k-1 in the masks' places (one no-grad forward, the same layout) and labels
         h^r_j = argmax_v p_T(v | x_<=t_r, y^r_<j)
     target "ce" (hard teacher):  L = mean over counted (r, j), j <= k_r, of  -log q^r_j(h^r_j)
     target "kl" (soft teacher):  L = mean of  KL( p_T(. | x_<=t_r, y^r_<j) || q^r_j )
     Where this may differ from the paper: it has one <MTP> token (an embedding and an unembedding row) for every
     mask and no adapters, here each slot has its own mask embedding and the adapters stay unless lora_rank is 0
     (configs/objectives/distill_student_forced.yaml sets 0); its soft teacher is written as a sequence-level
     product, here per position; its regions are strided with random offsets, here sampled anchors; and the
     network runs without dropout here.

Decoding (`generate(..., decoding=...)`): "verify" (lossless with respect to the model's own next-token path: the
teacher's where the network stays frozen; through the project's speculative loop, per-row acceptance; one greedy row
through its lean loop, `MaskChain`, which unembeds only the mask group the next step drafts from and can carry
groups after a step's two ends only, `groups="ends"`, a departure from the paper's quadratic layout for a CPU),
"confidence" (ConfAdapt with `tau`), or "greedy" (the next-token path alone).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from objectives.decoding.drafters import Drafter, PromptLookup
from objectives.decoding.greedy import greedy_token, sample_token
from objectives.decoding.speculative import speculative_generate
from objectives.training import metrics as M
from objectives.training.base import Objective
from objectives.training.causal import CausalObjective
from objectives.training.checkpoints import FrozenCompanion
from objectives.training.losses import chunked_cross_entropy


class Gate:
    """Where the adapters act: for the forward in progress, the first mask position (the mask tokens follow the
    real ones, so the adapters act on every position from it on), else None."""

    def __init__(self):
        self.open: int | None = None


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear layer the adapters act on: nn.Linear, or transformers' Conv1D (GPT-2's
    linear layers, weight [inputs, outputs]); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nx", None), int):
        return module.nx, module.nf
    return None


class GatedLoRA(nn.Module):
    """y = W x + gate * (alpha / r) B A x on a frozen linear layer, as a forward hook, so that the layer and its
    state-dict names stay the network's own. B starts at zero; where the gate is shut, y is W x exactly.

    The low-rank delta is computed for the gated positions alone (a slice: they are the sequence's tail) and added
    to the layer's own output there: the dense product W x runs once over all positions (it is the frozen
    network's), and the adapter's cost grows with the mask positions only, so that a verify step costs the
    next-token forward plus a small rank-r term (a merged dense product on every position, then a selection, would
    compute every linear twice; a boolean selection of the rows would cost three index searches per layer)."""

    def __init__(self, linear: nn.Module, rank: int, alpha: float, gate: Gate):
        super().__init__()
        inputs, outputs = linear_shape(linear)
        self.a = nn.Parameter(torch.randn(rank, inputs) / math.sqrt(inputs))
        self.b = nn.Parameter(torch.zeros(outputs, rank))
        self.scale, self.gate = alpha / rank, gate
        linear.register_forward_hook(self.apply_to)

    def apply_to(self, linear: nn.Module, inputs: tuple, output: torch.Tensor):
        start = self.gate.open
        if start is None:
            return None
        # added in place by one fused product (the linear's backward does not read its output): on a CPU, separate
        # products, a scaling and an addition cost about twice as much for a step's few mask rows (per d256 layer
        # of a quickstart trunk, 1 thread, fp32, AVX2-only AMD EPYC: 17-70 against 90-160 us on top of the layer's
        # own 110-160)
        rows, dtype = output[:, start:], output.dtype
        projected = inputs[0][:, start:].to(dtype) @ self.a.to(dtype).t()  # [B, m, r]
        if rows.shape[0] == 1:
            rows[0].addmm_(projected[0], self.b.to(dtype).t(), alpha=self.scale)
        else:
            rows.baddbmm_(projected, self.b.to(dtype).t().expand(rows.shape[0], -1, -1), alpha=self.scale)
        return output


class SamplerHead(nn.Module):
    """Samragh et al.'s sampler: z = h + W2 silu(W1 [e_prev; h]), logits = z E^T (W2 zero-initialised, so it starts
    as the plain mask prediction); e_prev embeds the token before the one predicted."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(2 * d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.weight)

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(F.silu(self.up(torch.cat([previous, hidden], -1))))


def rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, r]] for every row: [B, T, D] and [B, R] -> [B, R, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class FrozenStart(nn.Module):
    """The owner's network as it starts (trunk, embedding, output head), frozen and in eval mode: the teacher of a
    student-forced retrofit given no teacher checkpoint, where the owner's own network trains. Unlike a
    FrozenCompanion it stays in the state dict, as there is no file to rebuild it from on a resume."""

    def __init__(self, owner: Objective):
        super().__init__()
        self.trunk, self.embed = copy.deepcopy(owner.trunk), copy.deepcopy(owner.embed)
        if "lm_head" in owner._modules:
            self.lm_head = copy.deepcopy(owner.lm_head)
        self.requires_grad_(False)
        super().train(False)

    # the objective's own forward, over these copies
    unembedding, hidden, logits = Objective.unembedding, Objective.hidden, Objective.logits

    @property
    def model(self) -> "FrozenStart":
        """Read as a FrozenCompanion's objective is (`teacher.model`)."""
        return self

    def train(self, mode: bool = True) -> "FrozenStart":
        return super().train(False)


class Layout(NamedTuple):
    """One forward over real tokens followed by groups of mask tokens: the attention mask [B, 1, T, S], the rotary
    positions [B, T] and each mask's slot [T] (1..slots; 0 for real tokens)."""
    mask: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor


def mask_layout(n_real: torch.Tensor, width: int, anchors: torch.Tensor, slots: int,
                cached: torch.Tensor | None = None) -> Layout:
    """`width` real-token places (row b's first n_real[b] are tokens, the rest padding), then G = anchors.shape[1]
    groups of `slots` mask tokens; group g of row b follows the real token anchors[b, g]: its mask s sits at that
    token's position + s, attends to the real tokens up to the anchor (and to everything cached) and to the masks
    1..s of its group. Real tokens attend causally to real tokens; padding attends to itself. The step's keys
    follow each row's `cached` ones (the key index of a position is its cache index)."""
    B, G = anchors.shape
    device = anchors.device
    T = width + G * slots
    cached = torch.zeros(B, dtype=torch.long, device=device) if cached is None else cached
    i = torch.arange(T, device=device)
    is_mask = i >= width
    group = ((i - width) // max(slots, 1)).clamp(0, max(G - 1, 0))
    slot = torch.where(is_mask, (i - width) % max(slots, 1) + 1, 0)
    anchor = torch.where(is_mask[None], anchors[:, group] if G else i[None].expand(B, -1), i[None])  # [B, T]
    positions = cached[:, None] + anchor + slot[None]
    key, key_is_mask = i[None, None, :], is_mask[None, None, :]  # [1, 1, T] against queries [B, T, 1]
    sees_real = ~key_is_mask & (key <= anchor[:, :, None]) & (key < n_real[:, None, None])
    same_group = (is_mask[:, None] & is_mask[None, :] & (group[:, None] == group[None, :])
                  & (slot[None, :] <= slot[:, None]))  # [T, T]: a mask sees the masks up to it in its group
    pad_query = (~is_mask[None]) & (i[None] >= n_real[:, None])  # [B, T]
    within = sees_real | same_group[None] | (pad_query[:, :, None] & torch.eye(T, dtype=torch.bool, device=device))
    S = int(cached.max()) + T if B else T
    offset = torch.arange(S, device=device)[None] - cached[:, None]  # [B, S]: a key's index within the step
    step = within.gather(2, offset.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    full = (offset < 0)[:, None, :] | ((offset < T)[:, None, :] & step)
    return Layout(full[:, None], positions, slot)


class SelfDistillation(CausalObjective):
    """A trained NTP model retrofitted into a k-token predictor against its own frozen copy.

    Args:
        k: tokens per forward at most: the next token and k-1 mask positions.
        regions: anchors sampled per training sequence.
        lora_rank, lora_alpha: the gated adapters on every linear layer of the trunk (rank 0: none).
        objective: "teacher_rollout" (the masks learn the teacher's greedy rollout, the network frozen: Samragh et
            al. 2025, FastMTP) or "student_forced" (the whole student learns the teacher's labels of its own
            argmax proposals: Kirchenbauer et al. 2026).
        target: "ce" (cross-entropy to the teacher's argmax tokens: its rollout, or under student forcing the hard
            teacher's labels) or "kl" (to its distributions at the same places; under student forcing the soft
            teacher).
        sampler_head: draft through Samragh et al.'s sampler head (previous token's embedding and hidden state);
            "teacher_rollout" only.
        teacher: the teacher's checkpoint; default `init_from` (the model being retrofitted), or without one the
            objective's own network, frozen (a pretrained model's, over `models.HFTrunk`): read with the adapters
            shut ("teacher_rollout"), or a frozen copy of it as it starts ("student_forced").
        decoding: the default of `generate`: "verify" (lossless), "confidence" (ConfAdapt) or "greedy".
        tau: ConfAdapt's confidence threshold.
        **kwargs: the base objective's arguments (`init_from`: the NTP checkpoint to retrofit; over `HFTrunk`
            the pretrained model is the one retrofitted, and no `init_from` is needed).
    """

    required_masks = ("causal", "tensor")
    accepts_summaries = False
    takes_row_budgets = False
    decodings = ("verify", "confidence", "greedy")

    objectives = ("teacher_rollout", "student_forced")

    def __init__(self, *args, k: int = 4, regions: int = 16, lora_rank: int = 16, lora_alpha: float = 32.0,
                 objective: str = "teacher_rollout", target: str = "ce", sampler_head: bool = False,
                 teacher: str | None = None, decoding: str = "verify", tau: float = 0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if k < 2:
            raise ValueError(f"k={k}: a multi-token predictor drafts at least one token beyond the next (k >= 2)")
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank}: the adapters' rank is 0 (none) or more")
        if objective not in self.objectives:
            raise ValueError(f"objective {objective!r}: use 'teacher_rollout' (the teacher's greedy rollout) or "
                             f"'student_forced' (the teacher's labels of the student's own proposals)")
        if target not in ("ce", "kl"):
            raise ValueError(f"target {target!r}: use 'ce' (teacher's argmax tokens) or 'kl' (its distributions)")
        if objective == "student_forced" and sampler_head:
            raise ValueError("sampler_head is Samragh et al.'s, trained on the teacher's rollout: the student-forced "
                             "objective has none (use objective 'teacher_rollout')")
        if decoding not in self.decodings:
            raise ValueError(f"decoding {decoding!r}: use one of {self.decodings}")
        self.check_tau(tau)
        self.k, self.regions, self.objective, self.target = k, regions, objective, target
        teacher = teacher or self.hparams.get("init_from")
        # without a checkpoint the teacher is the student's own network, frozen: read with the adapters shut (the
        # same function) where that network does not train; a copy taken before the adapters hook into it where
        # it does. Over an untrained network this is a smoke test; over HFTrunk, the pretrained model
        self.teacher = FrozenCompanion(teacher) if teacher else None
        if self.teacher is None and objective == "student_forced":
            self.teacher = FrozenStart(self)
        if self.teacher is not None and getattr(self.teacher.model, "reverse", False):
            raise ValueError(f"the teacher {teacher} is a right-to-left model: retrofit a left-to-right one")
        if objective == "teacher_rollout":
            # the network being retrofitted stays frozen (a pretrained model's own output head too); the adapters,
            # mask embeddings and sampler train
            self.trunk.requires_grad_(False)
            self.embed.requires_grad_(False)
            if "lm_head" in self._modules:
                self.lm_head.requires_grad_(False)
        self.gate = Gate()
        linears = {n: m for n, m in self.trunk.named_modules() if linear_shape(m) is not None} if lora_rank else {}
        self.adapters = nn.ModuleDict({n.replace(".", "_"): GatedLoRA(m, lora_rank, lora_alpha, self.gate)
                                       for n, m in linears.items()})
        self.mask_embed = nn.Embedding(k - 1, self.embedding_width())
        nn.init.normal_(self.mask_embed.weight, std=0.02)
        self.sampler = SamplerHead(self.embedding_width(), 2 * self.embedding_width()) if sampler_head else None

    @staticmethod
    def check_tau(tau: float) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau}: ConfAdapt's threshold is a probability in [0, 1]")

    def train(self, mode: bool = True) -> "SelfDistillation":
        """The network runs as in evaluation also while training: no dropout in it (a pretrained GPT-2 has some), so
        that where it is frozen the next-token path, and the teacher where it is this network, stay the model's,
        and where it trains (student forcing) the proposals are the argmaxes it decodes with."""
        super().train(mode)
        self.trunk.eval()
        return self

    def setup(self, stage: str) -> None:
        if (stage == "fit" and not self.hparams.get("init_from") and not self.trainer.ckpt_path
                and self.pretrained_report is None):
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn("SelfDistillation without --model.init_args.init_from retrofits an untrained network "
                           "(a smoke test): give the next-token checkpoint to retrofit")
        super().setup(stage)

    @property
    def teacher_model(self) -> Objective:
        """The frozen network the student learns from: the companion checkpoint, or without one this objective's
        own network (adapters shut; "teacher_rollout") or a frozen copy of it as it started ("student_forced")."""
        return self.teacher.model if self.teacher is not None else self

    @contextmanager
    def gated(self, first_mask: int | None):
        """The adapters on from position `first_mask` on during the block (None: off)."""
        self.gate.open = first_mask
        try:
            yield
        finally:
            self.gate.open = None

    # --- the student's forward with mask tokens -------------------------------------------------------------------
    def masked_hidden(self, tokens: torch.Tensor, layout: Layout, cache=None) -> torch.Tensor:
        """Hidden states of real tokens [B, W] followed by the layout's mask tokens, the adapters on at the masks."""
        B, W = tokens.shape
        masks = self.mask_embed.weight[(layout.slot[W:] - 1).clamp(min=0)]
        x = torch.cat([self.embed(tokens), masks[None].expand(B, -1, -1).to(self.embed.weight.dtype)], 1)
        with self.gated(W):
            return self.trunk(x, mask=layout.mask, cache=cache, positions=layout.positions)

    def mask_logits(self, hidden: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Logits at mask positions [..., D]; `previous` [...] the token before each predicted one (sampler head)."""
        if self.sampler is not None:
            hidden = self.sampler(hidden, self.embed(previous).to(hidden.dtype))
        return self.logits(hidden)

    # --- training ---------------------------------------------------------------------------------------------------
    def sample_regions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors [B, R] among the positions whose next token is counted, and per region the mask slots counted
        [B, R, k-1] (slot s < k_r with k_r ~ U{2..k}); regions a row could not fill count nothing."""
        tokens, counted = batch["tokens"], batch["loss_mask"] > 0
        B, L = tokens.shape
        limit = self.trunk.max_seq_len - (self.k - 1)
        valid = torch.zeros_like(counted)
        valid[:, :-1] = counted[:, 1:]
        valid[:, limit:] = False
        R = min(self.regions, L - 1)
        score = torch.rand(B, L, device=tokens.device).masked_fill(~valid, -1.0)
        top = score.topk(R, dim=1)
        filled = top.values >= 0
        anchors = torch.where(filled, top.indices, 0)
        k_r = torch.randint(2, self.k + 1, (B, R), device=tokens.device)
        slots = torch.arange(1, self.k, device=tokens.device)
        return anchors, filled[..., None] & (slots < k_r[..., None])

    @torch.no_grad()
    def teacher_rollouts(self, tokens: torch.Tensor, anchors: torch.Tensor, steps: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's greedy continuation of every anchor's prefix: tokens [B, R, steps] and the logits each
        was chosen from [B, R, steps, V]. One cached prefill of x; then each step feeds every region's last token
        at once (at position t_r + j, attending to x_<=t_r and its own region's earlier tokens)."""
        teacher = self.teacher_model
        B, L = tokens.shape
        R = anchors.shape[1]
        cache = teacher.trunk.make_cache(B, device=tokens.device, dtype=teacher.embed.weight.dtype)
        hidden = teacher.hidden(tokens, cache=cache)
        logits = [teacher.logits(rows_at(hidden, anchors))]
        out = [logits[0].argmax(-1)]
        region = torch.arange(R, device=tokens.device)
        for j in range(1, steps):
            key = torch.arange(L + j * R, device=tokens.device)
            prefix = (key[None, None] < L) & (key[None, None] <= anchors[..., None])  # [B, R, S]
            rollout = (key >= L) & ((key - L) % R == region[:, None])  # [R, S]: the region's own tokens so far
            mask = (prefix | rollout[None])[:, None]
            hidden = teacher.trunk(teacher.embed(out[-1]), mask=mask, cache=cache, positions=anchors + j)
            logits.append(teacher.logits(hidden))
            out.append(logits[-1].argmax(-1))
        return torch.stack(out, 2), torch.stack(logits, 2)

    @torch.no_grad()
    def teacher_scores(self, tokens: torch.Tensor, proposals: torch.Tensor, anchors: torch.Tensor, layout: Layout
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student forcing: the teacher reads x [B, L] and, after each anchor, the student's proposals y_1..y_k-1
        (of proposals [B, R, k]) in the places of the masks of `layout` (the student's), so that y_s sits at
        t_r + s and sees x_<=t_r and y_<=s of its region. Returns its argmax after x_<=t_r, y_<j for j = 1..k (the
        hard teacher's labels) [B, R, k] and the logits they come from [B, R, k, V]."""
        teacher = self.teacher_model
        B, L = tokens.shape
        R, slots = proposals.shape[1], proposals.shape[2] - 1
        read = torch.cat([tokens, proposals[:, :, :slots].flatten(1)], 1)
        hidden = teacher.hidden(read, mask=layout.mask, positions=layout.positions)
        # after the anchor: the label of y_1; after y_s: the label of y_s+1
        after = torch.cat([rows_at(hidden, anchors)[:, :, None], hidden[:, L:].view(B, R, slots, -1)], 2)
        logits = teacher.logits(after)
        return logits.argmax(-1), logits

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        B, L = tokens.shape
        slots = self.k - 1
        anchors, counted = self.sample_regions(batch)
        if L + anchors.shape[1] * slots > self.trunk.max_seq_len:
            raise ValueError(f"{L} tokens and {anchors.shape[1]} regions of {slots} mask tokens are more positions "
                             f"than the trunk's max_seq_len {self.trunk.max_seq_len}: lower model.init_args.regions "
                             f"or data.init_args.seq_len")
        layout = mask_layout(torch.full((B,), L, device=tokens.device), L, anchors, slots)
        hidden = self.masked_hidden(tokens, layout)
        masks = hidden[:, L:].reshape(B, -1, slots, hidden.shape[-1])
        if self.objective == "teacher_rollout":
            rollout, teacher_logits = self.teacher_rollouts(tokens, anchors, self.k)
            # mask s of region r predicts g_{s+1}, after g_s (the sampler's previous token)
            logits = self.mask_logits(masks, rollout[:, :, :-1]).float()
            target, teacher_logits, weight = rollout[:, :, 1:], teacher_logits[:, :, 1:], counted.float()
        else:
            # the student's k distributions from this one forward: its next token at the anchor, then the masks'
            logits = torch.cat([self.logits(rows_at(hidden, anchors))[:, :, None], self.mask_logits(masks, None)],
                               2).float()
            # argmaxes: the proposals carry no gradient
            target, teacher_logits = self.teacher_scores(tokens, logits.argmax(-1), anchors, layout)
            # the next token counts wherever its region does (slot 1 always does: k_r >= 2)
            weight = torch.cat([counted[..., :1], counted], 2).float()
        if self.target == "ce":
            per_place = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(weight)
        else:
            p_teacher = teacher_logits.float().log_softmax(-1)
            per_place = F.kl_div(logits.log_softmax(-1), p_teacher, log_target=True, reduction="none").sum(-1)
        n = weight.sum().clamp(min=1)
        loss = (per_place * weight).sum() / n
        # the next-token path (the teacher's where the network is frozen): its NLL, the family-comparable likelihood
        nll, count, _ = chunked_cross_entropy(hidden[:, : L - 1], self.unembedding, tokens[:, 1:],
                                              batch["loss_mask"][:, 1:], self.hparams.ce_chunk_size)
        # per mask slot: its argmax is the teacher's token there (its rollout's, or its label under student forcing)
        logits, target, weight = logits[:, :, -slots:], target[:, :, -slots:], weight[:, :, -slots:]
        agree = (logits.argmax(-1) == target).float() * weight
        metrics = {M.distill_acc(s + 2): (agree[..., s].sum() / weight[..., s].sum().clamp(min=1),
                                               weight[..., s].sum()) for s in range(slots)}
        out = {"loss": loss, "ntp_nll": nll.detach(), "ntp_tokens": count}
        if not self.training:
            out["metrics"] = metrics
        return out

    # --- decoding -----------------------------------------------------------------------------------------------
    def step_forward(self, tokens: torch.Tensor, n_real: torch.Tensor, anchors: torch.Tensor, cache, slots: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One cached forward of real tokens [B, W] (row b's first n_real[b]) and a group of `slots` masks after
        each anchor; the cache keeps only the real tokens. Returns the next-token logits of the real tokens
        [B, W, V], and per group the greedy drafts and their probabilities [B, G, slots]."""
        B, W = tokens.shape
        start = cache.lengths.clone()
        layout = mask_layout(n_real, W, anchors, slots, start)
        hidden = self.masked_hidden(tokens, layout, cache)
        cache.crop(start + n_real)
        logits = self.logits(hidden[:, :W])
        G = anchors.shape[1]
        previous = logits.gather(1, anchors[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)  # [B, G]
        return (logits, *self.group_drafts(hidden[:, W:].reshape(B, G, slots, -1), previous))

    def group_drafts(self, group_hidden: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy drafts of mask groups [..., slots, D] and their probabilities [..., slots]; `previous` [...]
        is the token each group's first draft follows (the sampler head reads it)."""
        if not group_hidden.shape[-2]:
            return previous.new_zeros(previous.shape + (0,)), group_hidden.new_zeros(previous.shape + (0,))
        if self.sampler is None:  # the slots are independent: all at once
            return self.greedy_with_probability(self.logits(group_hidden))
        drafts, probs = [], []
        for s in range(group_hidden.shape[-2]):  # the sampler reads the draft before
            previous, conf = self.greedy_with_probability(self.mask_logits(group_hidden[..., s, :], previous))
            drafts.append(previous)
            probs.append(conf)
        return torch.stack(drafts, -1), torch.stack(probs, -1)

    @staticmethod
    def greedy_with_probability(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax of logits [..., V] and its probability, exp(max - logsumexp)."""
        logits = logits.float()
        top, token = logits.max(-1)
        return token, (top - logits.logsumexp(-1)).exp()

    def slots_that_fit(self, cache, width: int, groups: int) -> int:
        """Mask tokens per group: k-1 (or the `k` given to `generate`), fewer where the trunk's length ends."""
        room = self.trunk.max_seq_len - cache.length - width
        return max(0, min(getattr(self, "decode_k", self.k) - 1, room // max(groups, 1)))

    def start_decoding(self, batch_size: int, device):
        return self.trunk.make_cache(batch_size, device=device, dtype=self.embed.weight.dtype)

    def decode_forward(self, tokens: torch.Tensor, state, padding_mask: torch.Tensor | None = None, **options):
        """The speculative loop's forward: next-token logits of the tokens and, as drafting features, the drafts
        of a mask group after each of them [B, m, k-1] (after the prompt's last token only, at the prefill)."""
        if options:
            raise ValueError(f"{type(self).__name__} verifies a chain of mask drafts; {sorted(options)} (tree drafts) "
                             f"are not among its decoding options")
        B, W = tokens.shape
        n_real = padding_mask.sum(1) if padding_mask is not None else torch.full((B,), W, device=tokens.device)
        if state.length == 0:  # the prompt: one group, after each row's last token
            slots = self.slots_that_fit(state, W, 1)
            logits, drafts, _ = self.step_forward(tokens, n_real, (n_real - 1)[:, None], state, slots)
            features = drafts.new_zeros(B, W, slots)
            features.scatter_(1, (n_real - 1)[:, None, None].expand(-1, 1, slots), drafts)
            return logits, features
        slots = self.slots_that_fit(state, W, W)
        anchors = torch.arange(W, device=tokens.device).expand(B, W)
        logits, drafts, _ = self.step_forward(tokens, n_real, anchors, state, slots)
        return logits, drafts

    def drafters(self, num_drafts: int, groups: str = "every", lookup: int = 0) -> dict:
        """The base objective's drafters and "masks": a group of masks after every fed token (Samragh et al.'s
        quadratic decoding), or with `groups` "ends" (batch 1, greedy) after the next token and the last draft
        only; with `lookup` (batch 1, greedy), prompt lookup's drafts first (`MaskChain`)."""
        def masks(tokens, state, features, temperature, top_k, max_drafts):
            return features[:, : max(min(num_drafts, max_drafts), 0)], None

        def chain(tokens):
            return MaskChain(self, num_drafts, groups, PromptLookup(tokens) if lookup else None, lookup)
        return {**super().drafters(num_drafts), "masks": Drafter(masks, reads_tokens=False, chain=chain)}

    default_drafter = "masks"

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, decoding: str | None = None, tau: float | None = None,
                 k: int | None = None, prompt_lengths: torch.Tensor | None = None, groups: str = "every",
                 lookup: int = 0, **options) -> torch.Tensor:
        """prompt [B, P] (rows right-padded to `prompt_lengths`) -> [B, P + max_new_tokens].

        decoding "verify": the masks after every token of a step draft, the next-token path verifies them in the
        same forward (that path's greedy output token for token, the teacher's where the network stays frozen;
        with temperature > 0, speculative sampling of its distribution). "confidence": ConfAdapt, greedy: the next
        token and then the drafts while their probability is above `tau` (tau = 1 is plain greedy decoding).
        "greedy": the next-token path alone (and the base objective's options, e.g. speculative with prompt
        lookup). `k` (at most the trained k) caps the
        tokens per forward: the first k-1 masks of each group (masks are causal, so these are what a model trained
        with that k would read). `groups` ("verify" at batch 1, greedy): "every" (a group of masks after every
        fed token, so the next drafts exist whatever is accepted) or "ends" (groups after the next token and the
        last draft only: k + 2(k-1) positions a step instead of k^2; where a step stops in between, the next one
        feeds its one certain token and drafts after it). `self.decode_stats` holds the forwards after the prompt's
        ("steps") and the new tokens per row ("tokens"). `lookup` ("verify" at batch 1, greedy): prompt lookup
        drafts first, up to `lookup` tokens while its match continues, the masks where it finds nothing or beyond
        a shorter match.
        """
        decoding = decoding or self.hparams.decoding
        if decoding not in self.decodings:
            raise ValueError(f"decoding {decoding!r}: use one of {self.decodings}")
        extra = {"prompt_lengths": prompt_lengths} if prompt_lengths is not None else {}
        options = {name: value for name, value in options.items() if value is not None and value is not False}
        if groups not in MaskChain.groupings:
            raise ValueError(f"groups {groups!r}: use one of {MaskChain.groupings}")
        one_row = prompt_ids.shape[0] == 1 and (
            prompt_lengths is None or int(torch.as_tensor(prompt_lengths).reshape(-1)[0]) == prompt_ids.shape[1])
        if (groups != "every" or lookup) and not (decoding == "verify" and temperature <= 0 and one_row):
            raise ValueError(f"groups {groups!r} and lookup {lookup} are forms of greedy 'verify' decoding of one "
                             f"row (batch 1, temperature 0): use groups 'every' and lookup 0")
        if decoding == "greedy" or "teacherless" in options:
            return super().generate(prompt_ids, max_new_tokens, temperature, top_k, **extra, **options)
        if options:
            raise ValueError(f"{sorted(options)}: not options of decoding {decoding!r} (they belong to 'greedy')")
        if k is not None and not 1 <= k <= self.k:
            raise ValueError(f"k={k}: this model drafts at most {self.k} tokens per forward (k from 1 to {self.k})")
        self.decode_k = k or self.k
        if decoding == "confidence" and temperature > 0:
            raise ValueError("confidence decoding (ConfAdapt) is greedy: use temperature 0, or decoding 'verify' to "
                             "sample")
        # in the weights' precision, also inside a validation under autocast (as plain greedy decoding of the
        # teacher runs outside training)
        with torch.autocast(prompt_ids.device.type, enabled=False):
            if decoding == "verify":
                ids, self.decode_stats = speculative_generate(self, prompt_ids, max_new_tokens,
                                                              self.drafters(self.k, groups, lookup)["masks"],
                                                              temperature, top_k, prompt_lengths=prompt_lengths)
                return ids
            return self.confidence_generate(prompt_ids, max_new_tokens, self.hparams.tau if tau is None else tau,
                                            prompt_lengths)

    def confidence_generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, tau: float,
                            prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ConfAdapt: every forward emits the next token and the longest prefix of the drafts whose probability is
        above `tau`; those tokens are the next forward's input. Rows accept their own numbers of tokens."""
        self.check_tau(tau)
        B, P = prompt_ids.shape
        device = prompt_ids.device
        self.check_generation_length(P + max_new_tokens)
        lengths = (torch.full((B,), P, dtype=torch.long, device=device) if prompt_lengths is None
                   else torch.as_tensor(prompt_lengths, dtype=torch.long, device=device))
        pad = self.eos_id if self.eos_id is not None else 0
        out = torch.full((B, P + max_new_tokens + self.k), pad, dtype=prompt_ids.dtype, device=device)
        out[:, :P] = prompt_ids
        cache = self.start_decoding(B, device)
        written = torch.zeros(B, dtype=torch.long, device=device)  # new tokens per row so far
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, n_real, steps = prompt_ids, lengths, -1
        while True:
            slots = self.slots_that_fit(cache, tokens.shape[1], 1)
            logits, drafts, probs = self.step_forward(tokens, n_real, (n_real - 1)[:, None], cache, slots)
            steps += 1
            first = sample_token(logits.gather(1, (n_real - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0])
            confident = (probs[:, 0] > tau).long().cumprod(1).sum(1)  # drafts kept
            new = torch.cat([first[:, None], drafts[:, 0]], 1)  # [B, 1 + slots]
            take = torch.minimum(confident + 1, max_new_tokens - written)
            take = torch.where(done, 0, take)
            column = torch.arange(new.shape[1], device=device)
            keep = column[None] < take[:, None]
            if self.eos_id is not None:  # a row ends at its first eos
                hit = (new == self.eos_id) & keep
                done |= hit.any(1)
            index = (lengths + written)[:, None] + column
            out.scatter_(1, index, torch.where(keep, new, out.gather(1, index)))
            written = written + take
            done |= written >= max_new_tokens
            if bool(done.all()):
                break
            tokens, n_real = new[:, : int(take.max())], take.clamp(min=1)
        self.decode_stats = {"steps": steps, "tokens": max_new_tokens}
        ids = out[:, : P + max_new_tokens]
        arange = torch.arange(ids.shape[1], device=device)
        generated = (arange >= lengths[:, None]) & (arange < lengths[:, None] + max_new_tokens)
        if self.eos_id is not None:
            after_eos = ((ids == self.eos_id) & generated).long().cumsum(1) > 0
            ids = ids.masked_fill(after_eos & generated, self.eos_id)
        return ids.masked_fill(arange >= lengths[:, None] + max_new_tokens, pad)


class MaskChain:
    """The masks' drafter at batch 1, greedy (`objectives.decoding.drafters.ChainDrafter`), for the lean loop.

    With `groups` "every", the drafts of the general loop's `decode_forward` (a group of masks after every fed
    token), for less work a step: the verify forward counts the accepted drafts on the device and unembeds only the
    mask group after the last accepted token, the one the next step drafts from (the general loop unembeds every
    group: at k = 4, 12 mask rows for the 3 it uses); a step's layout is made once per token count and shifted to
    the cache's end; and each fed position's row holds the model's argmax, then the accepted group's drafts (the
    loop reads them at the accepted position, which it counts on the host as the forward did on the device).

    With "ends", groups follow the next token and the last draft only, the two places a step most often stops
    (every draft rejected, or every one kept): k + 2(k-1) positions instead of k^2, which on a CPU cost nearly in
    proportion. A step that stops in between has no drafts for the next (its row says -1), which then feeds its
    certain token alone with a group after it.

    With `lookup` (a `PromptLookup` over the decode's tokens), its drafts come first, up to `lookup_drafts`, and the
    masks' only where it finds nothing or beyond a shorter match (as the MTP heads' "heads+lookup").
    """

    groupings = ("every", "ends")

    def __init__(self, model: SelfDistillation, num_drafts: int, groups: str = "every",
                 lookup: PromptLookup | None = None, lookup_drafts: int = 0):
        self.model, self.num_drafts, self.groups, self.layouts = model, num_drafts, groups, {}
        self.lookup, self.lookup_drafts = lookup, lookup_drafts

    def layout(self, width: int, anchors: tuple[int, ...], slots: int, cached: int, device) -> Layout:
        """`width` tokens with a group of `slots` masks after each of `anchors`, after `cached` keys."""
        key = (width, anchors, slots)
        if key not in self.layouts:
            self.layouts[key] = mask_layout(torch.tensor([width], device=device), width,
                                            torch.tensor([anchors], device=device), slots)
        step = self.layouts[key]
        return Layout(F.pad(step.mask, (cached, 0), value=True), step.positions + cached, step.slot)

    def forward(self, ids: torch.Tensor, state, last: bool = False) -> torch.Tensor:
        """ids [1, m] -> [m, 1 + slots] (with `last`, a prefill: [1, 1 + slots] at the last position)."""
        model = self.model
        W = ids.shape[1]
        if last or W == 1:
            anchors = (W - 1,)
        else:
            anchors = tuple(range(W)) if self.groups == "every" or W == 2 else (0, W - 1)
        slots = model.slots_that_fit(state, W, len(anchors))
        start = state.length
        hidden = model.masked_hidden(ids, self.layout(W, anchors, slots, start, ids.device), state)[0]
        state.crop(start + W)
        predicted = greedy_token(model.logits(hidden[W - 1 :] if last else hidden[:W]))  # [1] or [W]
        if len(anchors) == 1:
            accepted = group = predicted.new_zeros(1)
        else:  # the drafts the model agrees with, as the loop counts them
            accepted = (ids[0, 1:] == predicted[:-1]).long().cumprod(0).sum().view(1)
            group = accepted if len(anchors) == W else (accepted == W - 1).long()
        hidden = hidden[W:].view(len(anchors), slots, hidden.shape[-1]).index_select(0, group)  # [1, slots, D]
        drafts, _ = model.group_drafts(hidden, predicted.index_select(0, accepted))
        if len(anchors) not in (1, W):  # no group after where the step stopped: no drafts
            drafts = drafts.masked_fill(((accepted > 0) & (accepted < W - 1))[:, None], -1)
        return torch.cat([predicted[:, None], drafts.expand(predicted.shape[0], -1)], 1)

    def drafts(self, rows: list[list[int]], at: int, max_drafts: int) -> list[int]:
        drafts = rows[at][1 : 1 + min(self.num_drafts, max_drafts)]
        drafts = [] if drafts and drafts[0] < 0 else drafts
        if self.lookup is None:
            return drafts
        found = self.lookup(min(self.lookup_drafts, max_drafts))
        return found + drafts[len(found) :]
