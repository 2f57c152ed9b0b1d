"""The causal tier: families that read left to right and decode with the trunk's cache (next-token and multi-token
prediction, the retrofit, planning tokens, Skeleton-of-Thought, Coconut, LaDiR).

What they share beyond `Objective`: future summaries on their hidden states, the next-token loss, the positions
their likelihood counts (tokens 1..L-1), and `generate`: left-to-right decoding of a ragged batch
(`objectives/decoding/greedy.py`) or, with `speculative`, draft-then-verify decoding
(`objectives/decoding/speculative.py`) through the decoding interface `start_decoding`, `decode_forward` and
`drafters`, which a family with drafters of its own (multi-token heads, DeepSeek's modules, mask drafts)
overrides.
"""
from __future__ import annotations

import torch

from objectives.decoding.drafters import Drafter, LookupChain, lookup_drafts
from objectives.decoding.greedy import left_to_right
from objectives.decoding.speculative import speculative_generate
from objectives.training import metrics as M
from objectives.training.base import Objective
from objectives.training.losses import chunked_cross_entropy


class CausalObjective(Objective):
    """A family that reads left to right: summaries may attach, and `generate` decodes with the trunk's cache."""

    accepts_summaries = True

    def summary_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """sum_i weight_i * L_i over the attached summaries (`objectives/summaries.py`), given the trunk's hidden
        states [B, T, D] for the batch's tokens read in the order the objective reads them. Each unweighted L_i is
        logged as train/<name>_loss in training and val/<name>_loss in validation."""
        total = hidden.new_zeros((), dtype=torch.float32)
        stage = "train" if self.training else "val"
        for summary in self.summaries:
            value = summary(hidden, batch, self)
            self.log(f"{stage}/{summary.name}_loss", value, batch_size=int(batch["tokens"].shape[0]),
                     sync_dist=stage == "val")
            total = total + summary.weight * value
        return total

    def next_token_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy of a batch, what the families made for reasoning steps (Coconut, LaDiR) train
        on plain text, which has none."""
        hidden = self.hidden(batch["tokens"][:, :-1])
        nll, count, _ = chunked_cross_entropy(hidden, self.unembedding, batch["tokens"][:, 1:],
                                              batch["loss_mask"][:, 1:], self.hparams.ce_chunk_size)
        return {"loss": nll / count.clamp(min=1), "ntp_nll": nll.detach(), "ntp_tokens": count}

    def likelihood_positions(self) -> slice:
        return slice(1, None)  # the next-token targets tokens[:, 1:]

    # --- scoring one-token answers inside the sequence (recall data) --------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if "answer_mask" in batch:
            self.score_answer_tokens(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if "answer_mask" in batch:
            self.score_answer_tokens(batch, "test")

    @torch.no_grad()
    def score_answer_tokens(self, batch: dict, stage: str) -> None:
        """{stage}/accuracy where the data's answers are single tokens inside the sequence (`answer_mask` [B, L];
        MQAR's queries): each is a question, right when the greedy next token before it is the answer. One forward
        reads every answer of a row, the earlier ones as given (teacher forcing; Zoology's accuracy), which is what
        greedy decoding answers when every earlier answer is right. Broken down by the batch's ACCURACY_GROUPS
        keys (val/accuracy_<k>_pairs)."""
        tokens, answers = batch["tokens"], batch["answer_mask"][:, 1:].bool()
        if not answers.any():
            return
        hidden = self.hidden(tokens[:, :-1])
        right = self.logits(hidden[answers]).argmax(-1) == tokens[:, 1:][answers]
        rows = answers.nonzero()[:, 0]  # the row of each answer, for its group
        groups = {key: batch[key][rows] for key in M.ACCURACY_GROUPS if key in batch}
        self.scorer.log_accuracy(self, stage, right, groups)

    # --- generation ------------------------------------------------------------------------------------------------
    default_drafter = "lookup"

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int | torch.Tensor, temperature: float = 0.0,
                 top_k: int | None = None, speculative: bool = False, drafter: str | None = None,
                 num_drafts: int = 4, teacherless: tuple[int, int] | None = None, tree=None,
                 prompt_lengths: torch.Tensor | None = None, drafter_options: dict | None = None) -> torch.Tensor:
        """Left-to-right decoding with the trunk's cache: prompt [B, P] -> [B, P + max_new_tokens].

        `prompt_lengths` [B]: the prompts are right-padded, row b's being its first prompt_lengths[b] tokens; row b
        of the result is its prompt, then its own generation, then padding, token for token what it gives alone
        (greedy). Plain decoding also takes per-row budgets (max_new_tokens a [B] tensor; see
        `objectives.decoding.greedy.left_to_right`). Rows that reach `eos_id` keep emitting it and finish on their own;
        decoding stops when every row has. With `speculative`,
        a drafter (`drafters`; prompt lookup for every objective) proposes up to `num_drafts` tokens per step and
        one forward verifies them: the same output as plain decoding (greedy) or the same distribution
        (sampling), in fewer forwards; `tree` (widths per depth, or rank paths) verifies a tree of the drafter's
        ranked candidates instead (objectives/decoding/speculative.py). `drafter_options` go to `drafters` (say the
        heads' `min_confidence`). `self.decode_stats` then holds the forwards and tokens of the last call.
        `teacherless` = (marker_id, dummy_id): once a row has emitted the answer marker, the model reads the dummy
        token instead of its own output (Bachmann & Nagarajan 2024's teacherless models are decoded this way).
        """
        if drafter_options and not speculative:
            raise ValueError("drafter_options are options of speculative decoding: pass speculative=True")
        if speculative and teacherless is not None:
            raise ValueError("speculative decoding verifies the model's own tokens; it cannot decode teacherless")
        if speculative:
            propose = self.drafters(num_drafts, **(drafter_options or {})).get(drafter or self.default_drafter)
            if propose is None:
                raise ValueError(f"unknown drafter {drafter!r}: {type(self).__name__} offers {sorted(self.drafters(1))}")
            ids, self.decode_stats = speculative_generate(self, prompt_ids, max_new_tokens, propose, temperature, top_k,
                                                          tree=tree, prompt_lengths=prompt_lengths)
            return ids
        return left_to_right(self, prompt_ids, max_new_tokens, temperature, top_k, teacherless, prompt_lengths)

    # --- the decoding interface of speculative decoding ------------------------------------------------------------
    def start_decoding(self, batch_size: int, device) -> object:
        """A decoding state with `length` and `crop(n)`: here the trunk's cache."""
        return self.trunk.make_cache(batch_size, device=device, dtype=self.embed.weight.dtype)

    def decode_forward(self, tokens: torch.Tensor, state, **trunk_options) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the state by tokens [B, m] (`trunk_options`: mask, positions, padding_mask): next-token logits
        [B, m, V] and drafting features [B, m, ...]."""
        hidden = self.hidden(tokens, cache=state, **trunk_options)
        return self.logits(hidden), hidden

    def drafters(self, num_drafts: int) -> dict:
        """Drafting strategies by name (`objectives.decoding.drafters.Drafter`): each maps (tokens, state, features,
        temperature, top_k, max_drafts) to (drafts [B, k], draft distributions [B, k, V] or None when drafts are
        deterministic). Prompt lookup drafts up to num_drafts tokens while its match continues (cyclically in a
        loop), so num_drafts = 8 lets a long match fill a long verify."""
        def lookup(tokens, state, features, temperature, top_k, max_drafts):
            return lookup_drafts(tokens, min(num_drafts, max_drafts)), None
        return {"lookup": Drafter(lookup, chain=lambda tokens: LookupChain(self, tokens, num_drafts))}

    def after_eos(self, token: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Rows already finished emit eos again; marks rows that just emitted eos as finished (in place)."""
        if self.eos_id is None:
            return token
        token = torch.where(done, torch.full_like(token, self.eos_id), token)
        done |= token == self.eos_id
        return token
