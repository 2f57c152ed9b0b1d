"""Retrofitting a trained next-token model into a multi-token predictor by online self-distillation.

Two published recipes share the model and the training here:
- Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential"
  (arXiv 2507.11851): learned mask tokens appended after the prefix, gated LoRA that is active only at the mask
  positions (so the next-token path is the frozen model's, bit for bit), a small sampler head, and decoding that
  the model's own next-token path verifies in the same forward (lossless). Masks follow every draft token of the
  step ("quadratic decoding"), so whichever prefix is accepted, the next drafts were made after exactly it.
- Kirchenbauer et al. 2026 (arXiv 2602.06019): the model trained on its own greedy rollouts at k-1 mask positions,
  k drawn per region, and decoded with ConfAdapt: keep the longest prefix of drafts whose probability stays above
  a threshold tau, at least one token; no verification, so lossy.

The student (this objective) starts from an NTP checkpoint of the project (`init_from`, a warm start) whose network
stays frozen; the teacher is the same checkpoint as a frozen companion. Over a pretrained Hugging Face model
(`models.HFTrunk`, for the model types that take a mask tensor) the model is the network retrofitted, and its own
frozen network (adapters shut) is the teacher. Per training sequence x (tokens x_0..x_L-1):

  1. anchors t_1..t_R, sampled among the positions whose next token is a target; per region k_r ~ U{2, ..., k}
  2. the teacher's greedy rollout after each anchor, all regions of the batch at once through its cache:
         g^r_j = argmax_v p_T(v | x_<=t_r, g^r_<j),  j = 1..k
  3. the student reads x, then for each region the k-1 mask tokens m_1..m_k-1 at rotary positions t_r+1..t_r+k-1
     (the positions the continuation would have); m_s attends to x_<=t_r and to m_<=s of its own region, x
     attends causally to x alone, and the adapters act only at mask positions
  4. target "ce":  L = mean over counted (r, s), s < k_r, of  -log q_S(g^r_s+1 | x_<=t_r, m_<=s)
     target "kl":  L = mean of  KL( p_T(. | x_<=t_r, g^r_<=s) || q_S(. | x_<=t_r, m_<=s) )
     With the sampler head, q_S reads [the embedding of the token before the one it predicts (g^r_s; in decoding
     the draft before); the mask's hidden state].

Decoding (`generate(..., decoding=...)`): "verify" (lossless, through the project's speculative loop, per-row
acceptance), "confidence" (ConfAdapt with `tau`), or "greedy" (the next-token path alone, the teacher's output).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from objectives.decoding.drafters import Drafter
from objectives.decoding.greedy import sample_token
from objectives.decoding.speculative import speculative_generate
from objectives.training import metrics as M
from objectives.training.base import Objective
from objectives.training.causal import CausalObjective
from objectives.training.checkpoints import FrozenCompanion
from objectives.training.losses import chunked_cross_entropy


class Gate:
    """Where the adapters act: a bool [B, T] (True at mask positions) for the forward in progress, else None."""

    def __init__(self):
        self.open: torch.Tensor | None = None


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

    The low-rank delta is computed for the gated rows alone and added to the layer's own output there: the dense
    product W x runs once over all positions (it is the frozen network's), and the adapter's cost grows with the
    mask positions only, so that a verify step costs the next-token forward plus a small rank-r term (a merged
    dense product on every position, then a selection, would compute every linear twice)."""

    def __init__(self, linear: nn.Module, rank: int, alpha: float, gate: Gate):
        super().__init__()
        inputs, outputs = linear_shape(linear)
        self.a = nn.Parameter(torch.randn(rank, inputs) / math.sqrt(inputs))
        self.b = nn.Parameter(torch.zeros(outputs, rank))
        self.scale, self.gate = alpha / rank, gate
        linear.register_forward_hook(self.apply_to)

    def apply_to(self, linear: nn.Module, inputs: tuple, output: torch.Tensor):
        rows = self.gate.open
        if rows is None:
            return None
        delta = F.linear(F.linear(inputs[0][rows], self.a.to(output.dtype)), self.b.to(output.dtype)) * self.scale
        return output.index_put((rows,), output[rows] + delta)


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


class Layout(NamedTuple):
    """One forward over real tokens followed by groups of mask tokens: the attention mask [B, 1, T, S], the rotary
    positions [B, T], the gate [B, T] (mask positions) and each mask's slot [T] (1..slots; 0 for real tokens)."""
    mask: torch.Tensor
    positions: torch.Tensor
    gate: torch.Tensor
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
    return Layout(full[:, None], positions, is_mask[None].expand(B, T), slot)


class SelfDistillation(CausalObjective):
    """A trained NTP model retrofitted into a k-token predictor against its own frozen copy.

    Args:
        k: tokens per forward at most: the next token and k-1 mask positions.
        regions: anchors sampled per training sequence.
        lora_rank, lora_alpha: the gated adapters on every linear layer of the trunk.
        target: "ce" (cross-entropy to the teacher's greedy tokens) or "kl" (to its distributions).
        sampler_head: draft through Samragh et al.'s sampler head (previous token's embedding and hidden state).
        teacher: the teacher's checkpoint; default `init_from` (the model being retrofitted), or without one the
            objective's own frozen network (a pretrained model's, over `models.HFTrunk`).
        decoding: the default of `generate`: "verify" (lossless), "confidence" (ConfAdapt) or "greedy".
        tau: ConfAdapt's confidence threshold.
        **kwargs: the base objective's arguments (`init_from`: the NTP checkpoint to retrofit; over `HFTrunk`
            the pretrained model is the one retrofitted, and no `init_from` is needed).
    """

    required_masks = ("causal", "tensor")
    accepts_summaries = False
    takes_row_budgets = False
    decodings = ("verify", "confidence", "greedy")

    def __init__(self, *args, k: int = 4, regions: int = 16, lora_rank: int = 16, lora_alpha: float = 32.0,
                 target: str = "ce", sampler_head: bool = False, teacher: str | None = None,
                 decoding: str = "verify", tau: float = 0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if k < 2:
            raise ValueError(f"k={k}: a multi-token predictor drafts at least one token beyond the next (k >= 2)")
        if target not in ("ce", "kl"):
            raise ValueError(f"target {target!r}: use 'ce' (teacher's greedy tokens) or 'kl' (its distributions)")
        if decoding not in self.decodings:
            raise ValueError(f"decoding {decoding!r}: use one of {self.decodings}")
        self.check_tau(tau)
        self.k, self.regions, self.target = k, regions, target
        teacher = teacher or self.hparams.get("init_from")
        # without a checkpoint the teacher is the student's own frozen network read with the adapters shut (the
        # same function): a retrofit of an untrained network, for smoke tests
        self.teacher = FrozenCompanion(teacher) if teacher else None
        if self.teacher is not None and getattr(self.teacher.model, "reverse", False):
            raise ValueError(f"the teacher {teacher} is a right-to-left model: retrofit a left-to-right one")
        # the network being retrofitted stays frozen (a pretrained model's own output head too); the adapters,
        # mask embeddings and sampler train
        self.trunk.requires_grad_(False)
        self.embed.requires_grad_(False)
        if "lm_head" in self._modules:
            self.lm_head.requires_grad_(False)
        self.gate = Gate()
        linears = {n: m for n, m in self.trunk.named_modules() if linear_shape(m) is not None}
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
        """The frozen network runs as in evaluation also while the adapters train: no dropout in it (a pretrained
        GPT-2 has some), so that the next-token path, and the teacher where it is this network, stay the model's."""
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
        """The network whose greedy continuations the masks learn: the frozen companion, or this objective's own
        frozen network (adapters shut) when no checkpoint was given."""
        return self.teacher.model if self.teacher is not None else self

    @contextmanager
    def gated(self, where: torch.Tensor | None):
        self.gate.open = where
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
        with self.gated(layout.gate):
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
        logits = [teacher.logits(hidden.gather(1, anchors[..., None].expand(-1, -1, hidden.shape[-1])))]
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

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        B, L = tokens.shape
        slots = self.k - 1
        anchors, counted = self.sample_regions(batch)
        if L + anchors.shape[1] * slots > self.trunk.max_seq_len:
            raise ValueError(f"{L} tokens and {anchors.shape[1]} regions of {slots} mask tokens are more positions "
                             f"than the trunk's max_seq_len {self.trunk.max_seq_len}: lower model.init_args.regions "
                             f"or data.init_args.seq_len")
        rollout, teacher_logits = self.teacher_rollouts(tokens, anchors, self.k)
        layout = mask_layout(torch.full((B,), L, device=tokens.device), L, anchors, slots)
        hidden = self.masked_hidden(tokens, layout)
        # mask s of region r predicts g_{s+1}, after g_s (the sampler's previous token)
        logits = self.mask_logits(hidden[:, L:].reshape(B, -1, slots, hidden.shape[-1]), rollout[:, :, :-1]).float()
        target, weight = rollout[:, :, 1:], counted.float()
        if self.target == "ce":
            per_mask = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(weight)
        else:
            p_teacher = teacher_logits[:, :, 1:].float().log_softmax(-1)
            per_mask = F.kl_div(logits.log_softmax(-1), p_teacher, log_target=True, reduction="none").sum(-1)
        n = weight.sum().clamp(min=1)
        loss = (per_mask * weight).sum() / n
        # the next-token path is the teacher's: its NLL, the family-comparable likelihood
        nll, count, _ = chunked_cross_entropy(hidden[:, : L - 1], self.unembedding, tokens[:, 1:],
                                              batch["loss_mask"][:, 1:], self.hparams.ce_chunk_size)
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
        group_hidden = hidden[:, W:].reshape(B, G, slots, -1)
        if not slots:
            return logits, anchors.new_zeros(B, G, 0), logits.new_zeros(B, G, 0)
        if self.sampler is None:  # the slots are independent: all at once
            return (logits, *self.greedy_with_probability(self.logits(group_hidden)))
        drafts, probs = [], []
        for s in range(slots):  # the sampler reads the draft before
            previous, conf = self.greedy_with_probability(self.mask_logits(group_hidden[:, :, s], previous))
            drafts.append(previous)
            probs.append(conf)
        return logits, torch.stack(drafts, 2), torch.stack(probs, 2)

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

    def drafters(self, num_drafts: int) -> dict:
        def masks(tokens, state, features, temperature, top_k, max_drafts):
            return features[:, : max(min(num_drafts, max_drafts), 0)], None
        return {**super().drafters(num_drafts), "masks": Drafter(masks, reads_tokens=False)}

    default_drafter = "masks"

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, decoding: str | None = None, tau: float | None = None,
                 k: int | None = None, prompt_lengths: torch.Tensor | None = None, **options) -> torch.Tensor:
        """prompt [B, P] (rows right-padded to `prompt_lengths`) -> [B, P + max_new_tokens].

        decoding "verify": the masks after every token of a step draft, the next-token path verifies them in the
        same forward (the teacher's greedy output token for token; with temperature > 0, speculative sampling of
        its distribution). "confidence": ConfAdapt, greedy: the next token and then the drafts while their
        probability is above `tau` (tau = 1 is plain greedy decoding). "greedy": the next-token path alone (and
        the base objective's options, e.g. speculative with prompt lookup). `k` (at most the trained k) caps the
        tokens per forward: the first k-1 masks of each group (masks are causal, so these are what a model trained
        with that k would read). `self.decode_stats` holds the
        forwards after the prompt's ("steps") and the new tokens per row ("tokens").
        """
        decoding = decoding or self.hparams.decoding
        if decoding not in self.decodings:
            raise ValueError(f"decoding {decoding!r}: use one of {self.decodings}")
        extra = {"prompt_lengths": prompt_lengths} if prompt_lengths is not None else {}
        options = {name: value for name, value in options.items() if value is not None and value is not False}
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
                                                              self.drafters(self.k)["masks"], temperature, top_k,
                                                              prompt_lengths=prompt_lengths)
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
