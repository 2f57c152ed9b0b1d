"""The names every objective logs, defined once. The README lists them; benchmarks and tests read them back."""

TRAIN_LOSS = "train/loss"            # the objective's own training loss
VAL_LOSS = "val/loss"                # the objective's own loss on the val windows
VAL_NTP_LOSS = "val/ntp_loss"        # nats per token of the next-token distribution (causal families)
VAL_NLL_BOUND = "val/nll_bound"      # nats per token, an upper bound on the NLL (diffusion families)
VAL_BPB = "val/bpb"                  # bits per UTF-8 byte: the tokenizer-independent likelihood figure
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


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """nats/token -> bits/byte: divide by ln 2 and by the bytes each token covers."""
    import math
    return nats_per_token / math.log(2) / bytes_per_token


ACCEPT_LEN_TEACHER_FORCED = "val/accept_len_teacher_forced"  # tokens per greedy step from teacher-forced head argmaxes
