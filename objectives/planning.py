"""Planning tokens: a plan token before each reasoning step (Wang et al. 2023, "Guiding Language Model Reasoning
with Planning Tokens", arXiv:2310.05707).

A reasoning sequence ``question | step_1 <step> | ... | <ans> answer <eos>`` becomes

    question | <plan_{t(1)}> step_1 <step> | ... | <plan_{t(K)}> step_K <step> | <ans> answer <eos>

where t(k) in {0..M-1} is the step's plan type, and the model is trained by next-token prediction on the
augmented sequence (the plan tokens are targets like the step tokens: p(x) = prod_t p(x_t | x_<t) over the
plan-augmented x). The M plan tokens are new embedding rows after the data's vocabulary. Plan types come from

* a rule on the step's text (`rule`): multiplication, the multiplier digit b_k of partial product k
  (a * b_k * 10**k); ProsQA, the kind of fact (the entity's own fact, an intermediate "Every X is a Y", the
  step that reaches the answer's concept); elsewhere the step's position;
* k-means over step embeddings (`kmeans`): the mean hidden state over each step's tokens under a trained project
  checkpoint (`plan_from`, or the weights a fit starts from, e.g. `init_from`), M clusters fitted by Lloyd's algorithm from a seeded k-means++ start on the first
  `kmeans_examples` training steps, deterministic by `seed`; each sequence's assignments are cached.

`generate` writes plan, step, ..., answer and returns the generation with the plan tokens removed, so that answer
scoring (and the tokens-per-question count) ignores them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from objectives.ntp import NextTokenPrediction
from objectives.training.segments import step_spans


# --- rules ------------------------------------------------------------------------------------------------------
def _number(words: list[str], reverse: bool) -> int | None:
    digits = words[::-1] if reverse else words
    return int("".join(digits)) if digits and all(w.isdigit() for w in digits) else None


def multiplication_rule(question: list[str], k: int, step: list[str], num_steps: int) -> int:
    """The multiplier digit d of partial product k = a * d * 10**k (read in either digit order)."""
    if "*" not in question:
        return 0
    i = question.index("*")
    for reverse in (True, False):
        a, value = _number(question[:i], reverse), _number(step, reverse)
        if a and value is not None and value % (a * 10**k) == 0 and value // (a * 10**k) < 10:
            return value // (a * 10**k)
    return 0


def prosqa_rule(question: list[str], k: int, step: list[str], num_steps: int) -> int:
    """0: the entity's own fact ("Tom is a X"), 1: an intermediate "Every X is a Y", 2: the step reaching the
    answer's concept (the last one)."""
    if k == num_steps - 1:
        return 2
    return 1 if step[:1] == ["Every"] else 0


def position_rule(question: list[str], k: int, step: list[str], num_steps: int) -> int:
    return k


RULES = {"multiplication": multiplication_rule, "prosqa": prosqa_rule, "prosqa_alg1": prosqa_rule,
         "file": prosqa_rule, "position": position_rule}


# --- insertion and removal ---------------------------------------------------------------------------------------
def insert_plans(batch: dict, types: list[list[int]], plan_base: int, pad_id: int) -> dict:
    """The batch with plan token plan_base + types[b][k] before step k of row b (its segment and loss weight are
    the step's first token's); other keys (prompt_len, answer) are unchanged, the prompt comes first."""
    rows = []
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segments"][b].tolist()
        spans = step_spans(seg)
        starts = {s: k for k, (s, _) in enumerate(spans)}
        row = {key: [] for key in ("tokens", "loss_mask", "segments", "inputs") if key in batch}
        n = sum(1 for g in seg if g >= 0)
        for t in range(n):
            if t in starts:
                k = starts[t]
                for key in row:
                    value = {"tokens": plan_base + types[b][k], "inputs": plan_base + types[b][k]}.get(key)
                    row[key].append(batch[key][b, t].item() if value is None else value)
            for key in row:
                row[key].append(batch[key][b, t].item())
        rows.append(row)
    width = max(len(r["tokens"]) for r in rows)
    fills = {"tokens": pad_id, "inputs": pad_id, "loss_mask": 0.0, "segments": -1}
    out = {k: v for k, v in batch.items() if k not in ("tokens", "loss_mask", "segments", "inputs", "token_bytes")}
    for key in rows[0]:
        out[key] = torch.tensor([r[key] + [fills[key]] * (width - len(r[key])) for r in rows],
                                dtype=batch[key].dtype, device=batch[key].device)
    return out


def remove_plans(ids: torch.Tensor, plan_base: int, fill: int) -> torch.Tensor:
    """Rows of ids without their plan tokens (ids >= plan_base), left-packed and right-filled with `fill`."""
    keep = ids < plan_base
    order = torch.argsort((~keep).int(), dim=1, stable=True)
    packed = ids.gather(1, order)
    return packed.masked_fill(torch.arange(ids.shape[1], device=ids.device) >= keep.sum(1, keepdim=True), fill)


# --- k-means ----------------------------------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """Centroids [k, D] of x [N, D]: Lloyd's algorithm from a k-means++ start drawn with `seed` (deterministic)."""
    if x.shape[0] < k:
        raise ValueError(f"k-means plan types need at least {k} step embeddings, got {x.shape[0]}: "
                         f"raise kmeans_examples or lower num_plan_types")
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    centroids = x[torch.randint(x.shape[0], (1,), generator=g)]
    while centroids.shape[0] < k:
        d2 = torch.cdist(x, centroids).min(1).values.pow(2)
        centroids = torch.cat([centroids, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centroids[j] for j in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids


def step_embeddings(model, batch: dict) -> list[list[torch.Tensor]]:
    """Per row, per step: the mean of `model`'s last hidden states over the step's tokens."""
    device = next(model.parameters()).device
    with torch.no_grad():
        hidden = model.hidden(batch["tokens"].to(device)).float().cpu()
    return [[hidden[b, s:e].mean(0) for s, e in step_spans(batch["segments"][b].tolist())]
            for b in range(hidden.shape[0])]


class _FrozenCopy(nn.Module):
    """Copies of a model's embedding and trunk, in eval mode, with its `hidden`."""

    def __init__(self, model):
        super().__init__()
        self.embed, self.trunk = copy.deepcopy(model.embed), copy.deepcopy(model.trunk)
        self.eval()

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.embed(tokens), mask="causal")


class PlanningTokens(NextTokenPrediction):
    """Next-token prediction on plan-augmented reasoning sequences (Wang et al. 2023).

    Args:
        plans: "rule" (a rule on the step's text, chosen by the data's task), "kmeans" (clusters of step
            embeddings under the checkpoint `plan_from`) or "none" (plain chain of thought, the baseline).
        num_plan_types: M, the plan tokens added to the vocabulary (a rule's types are folded into them).
        rule: the rule's name (RULES); by default the reasoning data's task.
        plan_from: the trained project checkpoint whose step embeddings k-means clusters (default: this model's
            weights when fitting starts, i.e. the checkpoint given as `init_from`).
        kmeans_examples: training sequences the clusters are fitted on.
        seed: k-means' seed.
        **kwargs: the next-token objective's arguments (not `reverse`).
    """

    def __init__(self, *args, plans: str = "rule", num_plan_types: int = 10, rule: str | None = None,
                 plan_from: str | None = None, kmeans_examples: int = 256, seed: int = 0, **kwargs):
        if plans not in ("rule", "kmeans", "none"):
            raise ValueError(f"plans must be 'rule', 'kmeans' or 'none' (plain chain of thought), got {plans!r}")
        if rule is not None and rule not in RULES:
            raise ValueError(f"unknown plan rule {rule!r}: choose one of {sorted(RULES)}")
        self.extra_tokens = num_plan_types
        super().__init__(*args, **kwargs)
        self.generation_slack = 8 + 2 * num_plan_types
        self.words: list[str] | None = None
        self.rule_fn = RULES[rule] if rule else None
        self.centroids: torch.Tensor | None = None
        self.plan_cache: dict[tuple[int, ...], list[int]] = {}
        self._embedder = None

    @property
    def plan_base(self) -> int:
        return self.vocab_size

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            self.words = [tok.id_to_token(i) for i in range(self.vocab_size)]
        if self.rule_fn is None:
            task = getattr(dm, "hparams", {}).get("task") if dm is not None else None
            self.rule_fn = RULES.get(task, position_rule)
        if self.hparams.plans == "kmeans" and self.centroids is None and stage == "fit" and dm is not None:
            self.fit_plan_clusters(iter(dm.train_dataloader()))

    # --- plan types -------------------------------------------------------------------------------------------
    def fit_plan_clusters(self, batches) -> torch.Tensor:
        """Fit the k-means centroids on the step embeddings of `batches` under the checkpoint `plan_from`."""
        vectors: list[torch.Tensor] = []
        for batch in batches:
            vectors += [v for row in step_embeddings(self.embedder(), batch) for v in row]
            if len(vectors) >= self.hparams.kmeans_examples:
                break
        self.centroids = kmeans(torch.stack(vectors), self.hparams.num_plan_types, self.hparams.seed)
        self.plan_cache.clear()
        return self.centroids

    def embedder(self):
        """The frozen network whose step embeddings are clustered: the checkpoint `plan_from`, or else a frozen
        copy of this model's weights when clustering starts (after a warm start `init_from`, the trained model)."""
        if self._embedder is None:
            if self.hparams.plan_from:
                from objectives.training.checkpoints import load_objective
                net = load_objective(self.hparams.plan_from).eval()
            else:
                net = _FrozenCopy(self)
            for p in net.parameters():
                p.requires_grad_(False)
            object.__setattr__(self, "_embedder", net)  # not a submodule: outside the optimizer and state dict
        return self._embedder

    def plan_types(self, batch: dict) -> list[list[int]]:
        """Per row, per step, the plan type in {0..M-1} (cached per sequence for k-means)."""
        M = self.hparams.num_plan_types
        if self.hparams.plans == "kmeans":
            if self.centroids is None:
                raise RuntimeError("k-means plan types are not fitted: call fit_plan_clusters(batches) first")
            keys = [tuple(row.tolist()) for row in batch["tokens"]]
            missing = [b for b, key in enumerate(keys) if key not in self.plan_cache]
            if missing:
                sub = {k: batch[k][missing] for k in ("tokens", "segments")}
                for b, row in zip(missing, step_embeddings(self.embedder(), sub)):
                    self.plan_cache[keys[b]] = ([] if not row else
                                                torch.cdist(torch.stack(row).cpu(), self.centroids).argmin(1).tolist())
            return [self.plan_cache[key] for key in keys]
        rule = self.rule_fn or position_rule
        out = []
        for b in range(batch["tokens"].shape[0]):
            ids, seg = batch["tokens"][b].tolist(), batch["segments"][b].tolist()
            words = [self.words[i] if self.words and i < len(self.words) else str(i) for i in ids]
            question = [w for w, g in zip(words, seg) if g == 0]
            spans = step_spans(seg)
            out.append([min(rule(question, k, words[s:e - 1], len(spans)), M - 1) for k, (s, e) in enumerate(spans)])
        return out

    def augment(self, batch: dict) -> dict:
        if "segments" not in batch or self.hparams.plans == "none":  # text data has no steps: plain NTP
            return batch
        pad = self.eos_id if self.eos_id is not None else 0
        return insert_plans(batch, self.plan_types(batch), self.plan_base, pad)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().loss(self.augment(batch))

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int | torch.Tensor, temperature: float = 0.0,
                 top_k: int | None = None, prompt_lengths: torch.Tensor | None = None, keep_plans: bool = False,
                 **kwargs) -> torch.Tensor:
        """Plan, step, ..., answer; without `keep_plans` the plan tokens are removed from the result."""
        ids = super().generate(prompt_ids, max_new_tokens, temperature, top_k, prompt_lengths=prompt_lengths, **kwargs)
        fill = self.eos_id if self.eos_id is not None else 0
        return ids if keep_plans else remove_plans(ids, self.plan_base, fill)
