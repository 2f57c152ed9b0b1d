"""Coconut: chain of continuous thought (Hao et al. 2024, "Training Large Language Models to Reason in a
Continuous Latent Space", arXiv:2412.06769; reference code facebookresearch/coconut).

A reasoning step is replaced by continuous thoughts: the last hidden state of the position before a thought is
fed back as the thought's input embedding, instead of the embedding of a sampled token. With the question x,
the begin- and end-of-thought markers <bot>, <eot>, and the steps s_1 .. s_K, curriculum stage k trains on

    x  <bot>  h_1 .. h_{k c}  <eot>  s_{k+1} .. s_K  answer                  h_t = H(e_{<t})[last position]

where c = `thoughts_per_step` and every h_t is the trunk's last hidden state at the position before it. Beyond
`max_latent_stage` every step is latent and the thoughts stay at max_latent_stage * c (ProsQA's "pad the
latents to the maximum"). The loss is next-token cross-entropy on the words that remain (steps s_{k+1}.. and the
answer), none on the question, the markers or the thoughts; gradients run through every thought.

Because h_t needs the hidden state at t - 1, the forward runs in (number of thoughts + 1) passes: the prefix up
to <bot>, one pass per thought, then the rest. With a trunk that takes ragged rows through a decoding cache
(per-row lengths, `padding_mask`, differentiable cached forwards) the passes share one cache, so the work is
about one forward; otherwise each pass recomputes the prefix it needs (the "recompute" path: a full causal
forward per pass over the sequence so far; exact, (thoughts + 1) times the work). Rows may have prompts of any
length: each row's thoughts sit right after its own question.

The curriculum stage is a function of the training step (or epoch): `start_stage + unit // stage_every`, applied
here from the batch's `segments`, so that data workers keep no state; it is logged as `train/coconut_stage`, and
`OptimizerReset` (added by `configure_callbacks`) clears the optimizer's state at each stage change, the schedule
running on, optionally re-warming the learning rate over `rewarm_steps` (the reference code instead builds a new
AdamW at every epoch at a constant 1e-4; see `OptimizerReset`). The baselines of the paper's table are configs:
"pause as thought" (`thought: pause`: the thoughts' positions read one learned <pause> embedding, the latent
placeholder's row, with the same curriculum), "w/o curriculum" (`start_stage` = max_latent_stage: every step latent
from the first step), and CoT / No-CoT (next-token prediction on the data with and without steps). A CoT warm start
(the paper's GSM8k recipe) is `--model.init_args.init_from CKPT`; the three new embedding rows then start as a copy
of an existing token's row (`init_special_from`, default <eos>), as the reference code copies one.

Generation appends <bot> to each prompt, produces the thoughts (as many as the current stage trains with, or
`num_thoughts`), then <eot>, then decodes the answer greedily or by sampling, a whole ragged batch at once. In the
returned ids a thought is written as the <latent> placeholder id (vocab_size + 2), <bot> and <eot> as
vocab_size and vocab_size + 1.
"""
from __future__ import annotations

from typing import Literal

import torch

from objectives.decoding.greedy import decode_after
from objectives.training.causal import CausalObjective
from objectives.training.losses import chunked_cross_entropy
from objectives.training.metrics import COCONUT_STAGE
from objectives.training.stages import OptimizerReset, Staged


class Coconut(Staged, CausalObjective):
    """Continuous thoughts in place of the first reasoning steps, with the staged curriculum.

    Args:
        thought: "continuous" (Coconut: the previous position's last hidden state) or "pause" (one learned
            <pause> embedding at every thought position: the paper's pause-as-thought baseline).
        thoughts_per_step: thoughts c per replaced step; 0 is the "w/o thought" control (Hao et al. 2024, Table 1):
            the same curriculum removes the first k steps and nothing takes their place but <bot> <eot>.
        max_latent_stage: beyond this stage every step is latent, with max_latent_stage * c thoughts (the
            reference's last stage): on data with more steps than max_latent_stage, the steps beyond them are then
            dropped, and only the answer is written. A run that should keep writing its last steps stops its
            curriculum at max_latent_stage (from stage 0: max_steps <= stage_every * (max_latent_stage + 1)).
        stage_every: training steps (or epochs, see `stage_unit`) per curriculum stage; 0 keeps `start_stage`.
        stage_unit: "step" or "epoch".
        first_stage: steps (or epochs) of the first stage, where it should last longer than the others (0: as long
            as the others). Stage 0 is plain chain-of-thought training; a model trained from scratch must learn it
            before steps can be replaced (the paper fine-tunes a pretrained GPT-2, which reads facts already).
        start_stage: the stage of the first step (max_latent_stage: the "w/o curriculum" baseline).
        pad_latent_to_max: beyond max_latent_stage, every question gets max_latent_stage * c thoughts (the
            reference code's ProsQA setting); False: min(its steps, max_latent_stage) * c. Generation always uses
            the padded count, since the number of steps is not known from the question.
        reset_optimizer: clear the optimizer's state at each stage change (`OptimizerReset`).
        rewarm_steps: after each reset, ramp the learning rate linearly from 1/rewarm_steps of the schedule's back
            to it over this many optimizer steps; 0 (the default, and what every shipped recipe uses): none.
        passes: "auto" or "cache" (one shared cache: every trunk takes ragged rows through its cache) or
            "recompute" (each pass recomputes the prefix it needs; the reference's way, kept as a check).
        init_special_from: the token whose embedding row a warm start copies into <bot>, <eot> and <latent>
            (default: eos_id).
        **kwargs: the base objective's arguments.
    """

    headline_metric = (COCONUT_STAGE, "latent stage")

    stage_metric = COCONUT_STAGE
    extra_tokens = 3  # <bot>, <eot>, <latent> (also <pause>), after the data's vocabulary
    accepts_summaries = False
    takes_row_budgets = False

    def __init__(self, *args, thought: Literal["continuous", "pause"] = "continuous", thoughts_per_step: int = 1,
                 max_latent_stage: int = 6, stage_every: int = 0, stage_unit: Literal["step", "epoch"] = "step",
                 first_stage: int = 0, start_stage: int = 0, pad_latent_to_max: bool = True, reset_optimizer: bool = True,
                 rewarm_steps: int = 0, passes: Literal["auto", "cache", "recompute"] = "auto",
                 init_special_from: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if thought not in ("continuous", "pause"):
            raise ValueError(f"thought must be 'continuous' or 'pause', got {thought!r}")
        if stage_unit not in ("step", "epoch"):
            raise ValueError(f"stage_unit must be 'step' or 'epoch', got {stage_unit!r}")
        if passes not in ("auto", "cache", "recompute"):
            raise ValueError(f"passes must be 'auto', 'cache' or 'recompute', got {passes!r}")
        if min(thoughts_per_step, max_latent_stage, stage_every, first_stage, start_stage, rewarm_steps) < 0:
            raise ValueError("Coconut needs thoughts_per_step, max_latent_stage, stage_every, first_stage, "
                             "start_stage and rewarm_steps >= 0")
        self.thought, self.c = thought, thoughts_per_step
        self.max_latent_stage, self.stage_every, self.stage_unit = max_latent_stage, stage_every, stage_unit
        self.first_stage = first_stage
        self.start_stage, self.pad_latent_to_max, self.reset_optimizer = start_stage, pad_latent_to_max, reset_optimizer
        self.rewarm_steps = rewarm_steps
        # every trunk takes ragged rows through its cache (models.contracts.Trunk: padding_mask with a cache)
        self.use_cache = passes != "recompute"
        self.bot_id, self.eot_id, self.latent_id = self.vocab_size, self.vocab_size + 1, self.vocab_size + 2
        self.init_special_from = init_special_from
        self.stage = start_stage  # the stage generation uses; follows training, saved in checkpoints

    # --- the curriculum -------------------------------------------------------------------------------------------
    def stage_at(self, step: int, epoch: int) -> int:
        """The curriculum stage at a training step / epoch."""
        if self.stage_every <= 0:
            return self.start_stage
        t = step if self.stage_unit == "step" else epoch
        if self.first_stage and t < self.first_stage:
            return self.start_stage
        if self.first_stage:  # the first stage ends at first_stage; every later one lasts stage_every
            return self.start_stage + 1 + (t - self.first_stage) // self.stage_every
        return self.start_stage + t // self.stage_every

    def thoughts_at(self, stage: int, num_steps: int | None = None) -> int:
        """Thoughts of a question at a stage (`num_steps`: its reasoning steps; None = unknown, padded count)."""
        if stage <= self.max_latent_stage:
            return stage * self.c
        if self.pad_latent_to_max or num_steps is None:
            return self.max_latent_stage * self.c
        return min(num_steps, self.max_latent_stage) * self.c

    def latent_batch(self, batch: dict, stage: int) -> dict[str, torch.Tensor]:
        """The stage's sequences from a reasoning batch: question, <bot>, thoughts, <eot>, the steps that stay
        in words and the answer, right-padded.

        Returns ids [B, T] (thoughts hold the <latent> id), loss_mask [B, T], lengths [B], first [B] (position
        of the first thought = question length + 1), n_thoughts [B], and source [B, T] (the position in the
        input batch each token came from, -1 for what was inserted).
        """
        tokens, segments, mask = batch["tokens"], batch["segments"], batch["loss_mask"]
        rows = []
        for b in range(tokens.shape[0]):
            seg = segments[b]
            question = (seg == 0).nonzero().flatten()
            num_steps = int((seg.max() - 1).clamp(min=0))  # step k has segment 2 + k
            skip = num_steps if stage > self.max_latent_stage else stage
            n = self.thoughts_at(stage, num_steps)
            kept = ((seg == 1) | (seg >= 2 + skip)).nonzero().flatten()
            inserted = torch.full((n + 2,), -1, dtype=torch.long, device=tokens.device)
            rows.append((torch.cat([question, inserted, kept]), len(question), n))
        B, T = len(rows), max(len(r[0]) for r in rows)
        source = torch.full((B, T), -1, dtype=torch.long, device=tokens.device)
        ids = torch.full((B, T), self.eos_id if self.eos_id is not None else 0, dtype=torch.long, device=tokens.device)
        loss_mask = torch.zeros(B, T, dtype=mask.dtype, device=tokens.device)
        for b, (src, q, n) in enumerate(rows):
            L_b = len(src)
            source[b, :L_b] = src
            real = src >= 0
            ids[b, :L_b] = torch.where(real, tokens[b, src.clamp(min=0)], self.latent_id)
            ids[b, q], ids[b, q + n + 1] = self.bot_id, self.eot_id
            loss_mask[b, :L_b] = torch.where(real, mask[b, src.clamp(min=0)], 0)
            loss_mask[b, : q + n + 2] = 0  # no loss on the question, the markers or the thoughts
        device = tokens.device
        return {"ids": ids, "loss_mask": loss_mask, "source": source,
                "lengths": torch.tensor([len(r[0]) for r in rows], device=device),
                "first": torch.tensor([r[1] + 1 for r in rows], device=device),
                "n_thoughts": torch.tensor([r[2] for r in rows], device=device)}

    # --- the multi-pass forward -------------------------------------------------------------------------------------
    def thought_forward(self, lb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states of a latent batch with every thought filled in.

        Returns (hidden [B, R, D], targets [B, R], weights [B, R], embeddings [B, T, D]): hidden states of the
        positions whose next token can carry loss, their next tokens and loss weights, and the input embeddings
        with the thoughts in place (the thoughts themselves, differentiable).
        """
        ids, n = lb["ids"], lb["n_thoughts"]
        embeds = self.embed(ids)
        if self.thought == "pause" or int(n.max()) == 0:
            return self.trunk(embeds)[:, :-1], ids[:, 1:], lb["loss_mask"][:, 1:], embeds
        if self.use_cache and bool((n == n[0]).all()):
            return self._cached_passes(lb, embeds)
        return self._recomputed_passes(lb, embeds)

    def _recomputed_passes(self, lb: dict, embeds: torch.Tensor):
        """Pass i runs a causal forward over the prefix up to the i-th thought of every row and writes each
        row's hidden state at the position before its thought into the thought's input (out of place)."""
        ids, first, n = lb["ids"], lb["first"], lb["n_thoughts"]
        for i in range(int(n.max())):
            rows = (n > i).nonzero().flatten()
            at = first[rows] + i
            hidden = self.trunk(embeds[:, : int(at.max())])
            embeds = embeds.index_put((rows, at), hidden[rows, at - 1])
        return self.trunk(embeds)[:, :-1], ids[:, 1:], lb["loss_mask"][:, 1:], embeds

    def _cached_passes(self, lb: dict, embeds: torch.Tensor):
        """One shared cache: the prefix through <bot> (ragged, right-padded), then one position per thought,
        then each row's rest, starting at its last thought (ragged)."""
        ids, first, lengths, n = lb["ids"], lb["first"], lb["lengths"], int(lb["n_thoughts"][0])
        B, T, D = embeds.shape
        arange = torch.arange(T, device=ids.device)
        cache = self.trunk.make_cache(B, device=ids.device, dtype=self.cache_dtype(ids.device))
        prefix = int(first.max())
        hidden = self.trunk(embeds[:, :prefix], cache=cache, padding_mask=arange[:prefix] < first[:, None])
        rows = torch.arange(B, device=ids.device)
        thought = hidden[rows, first - 1]
        thoughts = [thought]
        for _ in range(n - 1):
            thought = self.trunk(thought[:, None], cache=cache)[:, 0]
            thoughts.append(thought)
        start = first + n - 1  # each row's last thought
        width = int((lengths - start).max())
        index = (start[:, None] + arange[:width]).clamp(max=T - 1)
        rest = embeds.gather(1, index[..., None].expand(B, width, D))
        rest = torch.cat([thought[:, None], rest[:, 1:]], 1)
        real = start[:, None] + arange[:width] < lengths[:, None]
        hidden = self.trunk(rest, cache=cache, padding_mask=real)
        target_index = (index + 1).clamp(max=T - 1)
        has_target = start[:, None] + arange[:width] + 1 < lengths[:, None]
        weights = lb["loss_mask"].gather(1, target_index) * has_target
        at = first[:, None] + torch.arange(n, device=ids.device)
        embeds = embeds.index_put((rows[:, None].expand(B, n), at), torch.stack(thoughts, 1))
        return hidden, ids.gather(1, target_index), weights, embeds

    def cache_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the trunk's keys and states come in: autocast's where it is on (bf16-mixed), else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.embed.weight.dtype

    # --- training ---------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "segments" not in batch:  # plain text: no steps to replace, next-token prediction
            return self.next_token_loss(batch)
        lb = self.latent_batch(batch, self.current_stage())
        hidden, targets, weights, _ = self.thought_forward(lb)
        nll, count, _ = chunked_cross_entropy(hidden, self.unembedding, targets, weights, self.hparams.ce_chunk_size)
        out = {"loss": nll / count.clamp(min=1), "ntp_nll": nll.detach(), "ntp_tokens": count, "ntp_bytes": None}
        if "token_bytes" in batch:  # the bytes of the tokens still written in words, for val/bpb
            kept = batch["token_bytes"].gather(1, lb["source"].clamp(min=0)) * (lb["source"] >= 0)
            out["ntp_bytes"] = int((kept[:, 1:] * lb["loss_mask"][:, 1:]).sum())
        return out

    def configure_callbacks(self):
        return [OptimizerReset(self.rewarm_steps)] if self.reset_optimizer and self.stage_every > 0 else []

    def extra_token_sources(self) -> list[int | None]:
        source = self.init_special_from if self.init_special_from is not None else self.eos_id
        return [source] * self.extra_tokens

    # --- generation ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, prompt_lengths: torch.Tensor | None = None,
                 num_thoughts: int | None = None, **options) -> torch.Tensor:
        """<bot>, the thoughts, <eot>, then the answer: prompt [B, P] -> [B, P + max_new_tokens].

        Prompts are right-padded, row b's first `prompt_lengths[b]` tokens (default: all P); row b's output
        continues right after its own prompt and is filled with eos after it ends. The markers and thoughts
        count in max_new_tokens. Each row gives what it gives alone.
        """
        self.refuse_options(options, "generates thoughts, then the answer left to right")
        if isinstance(max_new_tokens, torch.Tensor):  # per-row budgets: decode the largest, callers cut each row
            max_new_tokens = int(max_new_tokens.max())
        B, P = prompt_ids.shape
        device = prompt_ids.device
        lengths = (torch.full((B,), P, dtype=torch.long, device=device) if prompt_lengths is None
                   else prompt_lengths.to(device=device, dtype=torch.long))
        n = self.thoughts_at(self.stage) if num_thoughts is None else num_thoughts
        self.check_generation_length(int(lengths.max()) + max_new_tokens)
        fill = self.eos_id if self.eos_id is not None else 0
        out = torch.full((B, P + max_new_tokens), fill, dtype=torch.long, device=device)
        out[:, :P] = prompt_ids
        written = self._thoughts_then_answer(prompt_ids, lengths, n, max_new_tokens, temperature, top_k)
        arange = torch.arange(written.shape[1], device=device)
        out.scatter_(1, lengths[:, None] + arange, written)
        return out

    def _thoughts_then_answer(self, prompt_ids, lengths, n, max_new_tokens, temperature, top_k) -> torch.Tensor:
        """The generated part of each row [B, max_new_tokens]: <bot>, n thoughts, <eot>, the decoded tokens."""
        B, P = prompt_ids.shape
        device = prompt_ids.device
        rows = torch.arange(B, device=device)
        ids = torch.cat([prompt_ids, prompt_ids.new_zeros(B, 1)], 1)
        ids[rows, lengths] = self.bot_id
        cache = self.trunk.make_cache(B, device=device, dtype=self.cache_dtype(device))
        if bool((lengths != P).any()):
            real = torch.arange(P + 1, device=device) <= lengths[:, None]
            last = self.trunk(self.embed(ids), cache=cache, padding_mask=real)[rows, lengths]
        else:
            last = self.trunk(self.embed(ids), cache=cache)[:, -1]
        pause = self.embed.weight[self.latent_id].expand(B, 1, -1)
        for _ in range(n):  # each thought is the last hidden state (pause: the learned pause embedding)
            last = self.trunk(last[:, None] if self.thought == "continuous" else pause, cache=cache)[:, 0]
        eot = self.embed.weight[self.eot_id].expand(B, 1, -1)
        logits = self.logits(self.trunk(eot, cache=cache)[:, 0])
        written = [torch.full((B, 1), self.bot_id, device=device, dtype=torch.long),
                   torch.full((B, n), self.latent_id, device=device, dtype=torch.long),
                   torch.full((B, 1), self.eot_id, device=device, dtype=torch.long)]
        written.append(decode_after(self, logits, cache, max_new_tokens - n - 2, temperature, top_k))
        return self.pad_to(torch.cat(written, 1), max_new_tokens)

