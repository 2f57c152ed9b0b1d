"""Planning tokens: a plan before each reasoning step (Wang et al. 2023, "Guiding Language Model Reasoning with
Planning Tokens", arXiv:2310.05707).

A reasoning sequence ``question | step_1 <step> | ... | <ans> answer <eos>`` becomes

    question | <plan_{t(1)}> step_1 <step> | ... | <plan_{t(K)}> step_K <step> | <ans> answer <eos>

where t(k) in {0..M-1} is the step's plan type, and the model is trained by next-token prediction on the
augmented sequence (the plan tokens are targets like the step tokens: p(x) = prod_t p(x_t | x_<t) over the
plan-augmented x). A plan is `general_tokens` tokens every plan shares followed by `plan_length` tokens of its
type (the released code's n_prefix general and n_special typed tokens, 3 and 3 there); by default one typed token.
The plan tokens are new embedding rows after the data's vocabulary: the general ones, then each type's in turn.
Plan types come from

* a rule on the step's text (`rule`): multiplication, the multiplier digit b_k of partial product k
  (a * b_k * 10**k); ProsQA, the kind of fact (the entity's own fact, an intermediate "Every X is a Y", the
  step that reaches the answer's concept); or the step's position;
* k-means over step embeddings (`kmeans`): the mean hidden state over each step's tokens under a trained
  chain-of-thought checkpoint (`kmeans_from`), M clusters fitted by Lloyd's algorithm from a seeded k-means++
  start on the first `kmeans_examples` training sequences, deterministic by `seed`; each sequence's assignments
  are cached;
* nothing (`general`): every step gets the same plan, the paper's "General" baseline, which adds the tokens
  without the types, so that typed plans can be told apart from extra tokens alone.

`generate` writes plan, step, ..., answer and returns the generation with the plan tokens removed, so that answer
scoring (and the tokens-per-question count) ignores them.
"""
from __future__ import annotations

import torch

from objectives.ntp import SEQUENCE_KEYS, NextTokenPrediction
from objectives.training.checkpoints import FrozenCompanion
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


RULES = {"multiplication": multiplication_rule, "prosqa": prosqa_rule, "position": position_rule}
PLANS = ("rule", "kmeans", "general", "none")
# answer scoring lets a family generate `generation_slack` tokens beyond the plan-free batch: room for the plans
# of this many steps (the project's tasks have at most 6)
MAX_PLANNED_STEPS = 20


# --- insertion and removal ---------------------------------------------------------------------------------------
def insert_plans(batch: dict, plans: list[list[list[int]]], pad_id: int) -> dict:
    """The batch with the tokens plans[b][k] before step k of row b (each takes the segment and loss weight of the
    step's first token); other keys (prompt_len, answer) are unchanged, the prompt comes first."""
    keys = [key for key in SEQUENCE_KEYS if key in batch]
    rows = []
    for b in range(batch["tokens"].shape[0]):
        given = {key: batch[key][b].tolist() for key in keys}
        opening = {start: plans[b][k] for k, (start, _) in enumerate(step_spans(given["segments"]))}
        row = {key: [] for key in keys}
        for t in range(sum(1 for g in given["segments"] if g >= 0)):
            for plan_token in opening.get(t, []):
                for key in keys:
                    row[key].append(plan_token if key in ("tokens", "inputs") else given[key][t])
            for key in keys:
                row[key].append(given[key][t])
        rows.append(row)
    width = max(len(r["tokens"]) for r in rows)
    fills = {"tokens": pad_id, "inputs": pad_id, "loss_mask": 0.0, "segments": -1}
    out = {k: v for k, v in batch.items() if k not in SEQUENCE_KEYS and k != "token_bytes"}
    for key in keys:
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


def chain_of_thought_companion(path: str, vocab_size: int) -> FrozenCompanion:
    """The frozen network whose step states k-means clusters, built from the checkpoint `kmeans_from`."""
    try:
        companion = FrozenCompanion(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"kmeans_from: {error}; train the chain-of-thought run first") from None
    if companion.model.vocab_size != vocab_size:
        raise ValueError(f"kmeans_from={path} was trained on a vocabulary of {companion.model.vocab_size} tokens, "
                         f"this data has {vocab_size}: give a chain-of-thought checkpoint of the same data")
    return companion


class PlanningTokens(NextTokenPrediction):
    """Next-token prediction on plan-augmented reasoning sequences (Wang et al. 2023).

    Args:
        plans: "rule" (a rule on the step's text, `rule`), "kmeans" (clusters of step embeddings under the
            checkpoint `kmeans_from`), "general" (every step the same plan: the paper's untyped "General"
            baseline) or "none" (plain chain of thought).
        num_plan_types: M, the plan types (a rule's types beyond M-1 are folded into M-1); "general" has one.
        rule: with plans "rule", the rule's name: "multiplication", "prosqa" or "position" (RULES). Other plans
            do not read it, so that one config can carry it for every arm.
        plan_length: the tokens of each type's own part of a plan (the released code's n_special).
        general_tokens: the tokens every plan starts with, whatever its type (the released code's n_prefix; it
            uses 3 with plan_length 3).
        kmeans_from: with plans "kmeans" (and only then), required: the checkpoint of a trained chain-of-thought
            run (e.g. runs/<name>/.../checkpoints/last.ckpt of objectives.NextTokenPrediction on the same data)
            whose step states are clustered, held as a frozen companion (the paper clusters the mean step states
            of a pretrained LM, for which a trained CoT model stands in here; an untrained network's states carry
            no step types).
        kmeans_examples: training sequences the clusters are fitted on.
        seed: k-means' seed.
        **kwargs: the next-token objective's arguments (not `reverse`).
    """

    def __init__(self, *args, plans: str = "rule", num_plan_types: int = 10, rule: str | None = None,
                 plan_length: int = 1, general_tokens: int = 0, kmeans_from: str | None = None,
                 kmeans_examples: int = 256, seed: int = 0, **kwargs):
        if plans not in PLANS:
            raise ValueError(f"plans must be one of {', '.join(PLANS)} ('none': plain chain of thought), got {plans!r}")
        if rule is not None and rule not in RULES:
            raise ValueError(f"unknown plan rule {rule!r}: choose one of {sorted(RULES)}")
        if plans == "rule" and rule is None:
            raise ValueError(f"plans: rule needs the rule that types each step: set rule to one of {sorted(RULES)}")
        if plans == "kmeans" and not kmeans_from:
            raise ValueError("plans: kmeans clusters the step states of a trained chain-of-thought model: set "
                             "kmeans_from to its checkpoint (runs/<name>/.../checkpoints/last.ckpt)")
        if kmeans_from and plans != "kmeans":
            raise ValueError(f"kmeans_from is read only by plans: kmeans, not plans: {plans}: leave it out")
        if plan_length < 1 or general_tokens < 0:
            raise ValueError(f"plan_length must be >= 1 and general_tokens >= 0, got {plan_length} and "
                             f"{general_tokens}")
        self.num_types = 1 if plans == "general" else num_plan_types
        self.extra_tokens = general_tokens + self.num_types * plan_length
        super().__init__(*args, **kwargs)
        self.generation_slack = 8 + MAX_PLANNED_STEPS * (general_tokens + plan_length)
        self.words: list[str] | None = None  # the token strings a rule reads (the datamodule's tokenizer)
        self.rule_fn = RULES[rule] if plans == "rule" else None
        self.centroids: torch.Tensor | None = None
        self.plan_cache: dict[tuple[int, ...], list[int]] = {}
        self.kmeans_embedder = chain_of_thought_companion(kmeans_from, self.vocab_size) if kmeans_from else None

    @property
    def plan_base(self) -> int:
        return self.vocab_size

    def plan_tokens(self, plan_type: int) -> list[int]:
        """The tokens of a plan of type `plan_type`: the general tokens, then the type's own."""
        general, length = self.hparams.general_tokens, self.hparams.plan_length
        typed = self.plan_base + general + plan_type * length
        return list(range(self.plan_base, self.plan_base + general)) + list(range(typed, typed + length))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            self.words = [tok.id_to_token(i) for i in range(self.vocab_size)]
        if self.hparams.plans == "kmeans" and self.centroids is None and stage == "fit" and dm is not None:
            self.fit_plan_clusters(iter(dm.train_dataloader()))

    # --- plan types -------------------------------------------------------------------------------------------
    def fit_plan_clusters(self, batches) -> torch.Tensor:
        """Fit the k-means centroids on the step embeddings of `batches` under the checkpoint `kmeans_from`."""
        vectors: list[torch.Tensor] = []
        for batch in batches:
            vectors += [v for row in step_embeddings(self.kmeans_embedder.model, batch) for v in row]
            if len(vectors) >= self.hparams.kmeans_examples:
                break
        self.centroids = kmeans(torch.stack(vectors), self.num_types, self.hparams.seed)
        self.plan_cache.clear()
        return self.centroids

    def plan_types(self, batch: dict) -> list[list[int]]:
        """Per row, per step, the plan type in {0..M-1}."""
        if self.hparams.plans == "kmeans":
            return self.cluster_types(batch)
        if self.hparams.plans == "general":
            return [[0] * len(step_spans(seg.tolist())) for seg in batch["segments"]]
        return self.rule_types(batch)

    def cluster_types(self, batch: dict) -> list[list[int]]:
        """Each step's nearest centroid (cached per sequence)."""
        if self.centroids is None:
            raise RuntimeError("k-means plan types are not fitted: call fit_plan_clusters(batches) first")
        keys = [tuple(row.tolist()) for row in batch["tokens"]]
        missing = [b for b, key in enumerate(keys) if key not in self.plan_cache]
        if missing:
            sub = {k: batch[k][missing] for k in ("tokens", "segments")}
            for b, row in zip(missing, step_embeddings(self.kmeans_embedder.model, sub)):
                self.plan_cache[keys[b]] = ([] if not row else
                                            torch.cdist(torch.stack(row).cpu(), self.centroids).argmin(1).tolist())
        return [self.plan_cache[key] for key in keys]

    def rule_types(self, batch: dict) -> list[list[int]]:
        """The rule's type of each step, read from the question's and the step's words."""
        if self.words is None and self.rule_fn is not position_rule:
            raise RuntimeError(f"rule {self.hparams.rule!r} reads the steps' words, but this model has no vocabulary: "
                               f"fit it through train.py (the datamodule's tokenizer) or set model.words")
        out = []
        for ids, seg in zip(batch["tokens"].tolist(), batch["segments"].tolist()):
            words = [self.words[i] for i in ids] if self.words else [str(i) for i in ids]
            question = [w for w, g in zip(words, seg) if g == 0]
            spans = step_spans(seg)
            out.append([min(self.rule_fn(question, k, words[s:e - 1], len(spans)), self.num_types - 1)
                        for k, (s, e) in enumerate(spans)])
        return out

    def augment(self, batch: dict) -> dict:
        if "segments" not in batch or self.hparams.plans == "none":  # text data has no steps: plain NTP
            return batch
        plans = [[self.plan_tokens(t) for t in row] for row in self.plan_types(batch)]
        return insert_plans(batch, plans, self.eos_id if self.eos_id is not None else 0)

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
