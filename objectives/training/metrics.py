"""The names every objective logs, defined once. The README lists them; benchmarks and tests read them back."""

TRAIN_LOSS = "train/loss"            # the objective's own training loss
VAL_LOSS = "val/loss"                # the objective's own loss on the val windows
VAL_NTP_LOSS = "val/ntp_loss"        # nats per token of the next-token distribution (causal families)
VAL_NLL_BOUND = "val/nll_bound"      # nats per token, an upper bound on the NLL (diffusion families)
VAL_BPB = "val/bpb"                  # bits per UTF-8 byte of the counted tokens (byte-level BPE text only)
VAL_ACCURACY = "val/accuracy"        # exact match of the family's own generated answer (reasoning data)
VAL_ANSWER_TOKENS = "val/answer_tokens"  # tokens generated per question, reasoning included
TEST_ACCURACY = "test/accuracy"      # the same two on the whole test split (`train.py test`, benchmarks)
TEST_ANSWER_TOKENS = "test/answer_tokens"
TOKENS_PER_SEC = "perf/tokens_per_sec"   # training tokens per second (all devices)
MFU = "perf/mfu"                     # model FLOPs utilisation, where the device's peak is known
HP_METRIC = "hp/val_nats_per_token"  # the HParams tab's metric: val/ntp_loss or val/nll_bound


def head_loss(k: int) -> str:
    return f"val/head{k}_loss"


def head_acc(k: int) -> str:
    return f"val/head{k}_acc"


ACCEPT_LEN_TEACHER_FORCED = "val/accept_len_teacher_forced"  # tokens per greedy step from teacher-forced head argmaxes


def distill_acc(k: int) -> str:
    """Multi-token retrofit: how often the mask slot for token t+k picks the teacher's token there (its rollout's,
    or under student forcing its label after the student's earlier proposals)."""
    return f"val/distill_acc{k}"


# Diffusion-LM (continuous embeddings)
VAL_MSE = "val/mse"                      # the denoiser's mean squared error against the clean embeddings x0
VAL_ROUNDING_NLL = "val/rounding_nll"    # nats per token of the rounding step p(w | x0) back to the tokens
VAL_ROUNDING_ACC = "val/rounding_acc"    # fraction of the counted tokens that rounding x0 gives back
# MDLM
VAL_MASKED_FRACTION = "val/masked_fraction"  # fraction of the maskable tokens the drawn times masked
# Coconut and LaDiR
COCONUT_STAGE = "train/coconut_stage"    # the curriculum stage: the first k reasoning steps are continuous thoughts
LADIR_STAGE = "train/ladir_stage"        # 0: the VAE trains, 1: the latent model trains on the frozen VAE
VAL_VAE_TOKEN_ACCURACY = "val/vae_token_accuracy"  # greedy reconstruction of held-out steps, per token
VAL_VAE_STEP_ACCURACY = "val/vae_step_accuracy"    # the same, whole steps exact


def vae_reconstruction(stage: str) -> str:
    """LaDiR's VAE: nats per token of a step decoded from a sample of its posterior (stage: "train", "val")."""
    return f"{stage}/vae_reconstruction"


def vae_kl(stage: str) -> str:
    """LaDiR's VAE: the KL of a step's posterior from N(0, I), per step (before the weight beta)."""
    return f"{stage}/vae_kl"


def flow_loss(stage: str) -> str:
    """LaDiR's latent model: the flow-matching loss of its blocks."""
    return f"{stage}/flow_loss"


def answer_nll(stage: str) -> str:
    """LaDiR's latent model: the cross-entropy of the <bob>/<ans> decisions and the answer."""
    return f"{stage}/answer_nll"


# per-row batch keys that break {stage}/accuracy down, and the word their tags end with: the reasoning steps of a
# question's worked solution (ProsQA-mini's hops), the key-value pairs of an MQAR example, a synthetic prompt's length
ACCURACY_GROUPS = {"num_steps": "steps", "num_kv_pairs": "pairs", "seq_len": "tokens"}


def accuracy_by(stage: str, key: str, k: int) -> str:
    """Accuracy on the questions whose batch value of `key` (one of ACCURACY_GROUPS) is k: val/accuracy_8_pairs."""
    return f"{stage}/accuracy_{k}_{ACCURACY_GROUPS[key]}"


def accuracy_with_steps(stage: str, k: int) -> str:
    """Accuracy on the questions whose worked solution has k reasoning steps (ProsQA-mini's hops)."""
    return accuracy_by(stage, "num_steps", k)


def answer_format(stage: str) -> str:
    """The share of generations that write an answer of the gold's shape: an answer marker, then as many tokens
    as the gold answer before eos (right or wrong), against answers that are missing or malformed."""
    return f"{stage}/answer_format"


def pass_at(stage: str, n: int) -> str:
    """Whether any of n sampled trajectories answers right (LaDiR with n > 1)."""
    return f"{stage}/pass_at_{n}"


def counted_bytes(batch: dict, positions: slice, count) -> int | None:
    """UTF-8 bytes of the tokens a likelihood counted: the batch's `token_bytes` [B, L] weighted by its `loss_mask`
    over `positions` (next-token targets are positions 1:), times r where the family counted each token r times
    (a bound estimated from r draws per sequence). None where the data gives no bytes (word-level task
    vocabularies, synthetic tokens) or where `count` is not a whole multiple of those weights: then no
    bits-per-byte figure is logged rather than one over other tokens than the loss."""
    if "token_bytes" not in batch:
        return None
    weights = batch["loss_mask"][:, positions]
    total = float(weights.sum())
    repeats = float(count) / total if total > 0 else 0.0
    if round(repeats) < 1 or abs(repeats - round(repeats)) > 1e-6:
        return None
    return round(repeats) * int(round(float((batch["token_bytes"][:, positions] * weights).sum())))
