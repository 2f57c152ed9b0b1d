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
