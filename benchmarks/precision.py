"""Training tokens/s of the quickstart model in fp32 and in bf16 autocast on this machine, alternating in one
process (bare loop, so only the arithmetic differs); and `PhaseTimer`, where a real run's time goes.

    python -m benchmarks.precision [--rounds 3] [--steps 6] [--json out.json]
    python train.py fit -c configs/quickstart.yaml --trainer.callbacks+=benchmarks.precision.PhaseTimer \
        [--trainer.callbacks.json phases.json]

`PhaseTimer` prints wall and CPU seconds (all threads of the process) of start-up with data preparation,
training steps, validation (the sanity check apart) and the generated samples within it. CPU seconds are the
figure to compare on a shared machine, where wall time mostly measures the other jobs.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RandomTokens, attach_trainer_for_optimizers, bare_seconds_per_step, parser, report
from models import Transformer
from objectives import NextTokenPrediction

BATCH, SEQ_LEN, VOCAB = 16, 256, 4096


def _clock() -> tuple[float, float]:
    cpu = os.times()
    return time.perf_counter(), cpu.user + cpu.system


def process_age() -> float:
    """Wall seconds since this process started (Linux /proc), NaN elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, StopIteration):
        return float("nan")


class PhaseTimer(L.Callback):
    """Wall and CPU seconds per phase of a fit, printed (and written to `json`) when it ends."""

    def __init__(self, json: str | None = None):
        self.path = json
        self.seconds = {k: [0.0, 0.0] for k in ("start-up and data preparation", "training steps",
                                                 "sanity check", "validation", "generated samples (in validation)")}
        self.steps = self.validations = 0
        self._mark = None

    def _add(self, phase: str, since: tuple[float, float]) -> None:
        now = _clock()
        self.seconds[phase][0] += now[0] - since[0]
        self.seconds[phase][1] += now[1] - since[1]

    def on_fit_start(self, trainer, pl_module) -> None:
        wall, cpu = _clock()
        self.seconds["start-up and data preparation"] = [process_age(), cpu]
        self._begin = (wall, cpu)
        generate = pl_module.generate

        def timed_generate(*args, **kwargs):
            since = _clock()
            try:
                return generate(*args, **kwargs)
            finally:
                self._add("generated samples (in validation)", since)
        pl_module.generate = timed_generate

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark = _clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._add("training steps", self._mark)
        self.steps += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val = _clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._add("sanity check" if trainer.sanity_checking else "validation", self._val)
        self.validations += not trainer.sanity_checking

    def on_fit_end(self, trainer, pl_module) -> None:
        wall, cpu = _clock()
        total = [self.seconds["start-up and data preparation"][0] + wall - self._begin[0], cpu]
        counted = [sum(v[i] for k, v in self.seconds.items() if not k.startswith("generated")) for i in (0, 1)]
        rows = [{"phase": k, "wall s": v[0], "CPU s": v[1]} for k, v in self.seconds.items()]
        rows.append({"phase": "other (checkpoints, logging, loop)", "wall s": total[0] - counted[0],
                     "CPU s": total[1] - counted[1]})
        rows.append({"phase": "total", "wall s": total[0], "CPU s": total[1]})
        if trainer.is_global_zero:
            print(f"PhaseTimer: {self.steps} training steps, {self.validations} validations, precision "
                  f"{trainer.precision}, {torch.get_num_threads()} threads")
            for row in rows:
                print(f"  {row['phase']:<40} wall {row['wall s']:8.1f} s   CPU {row['CPU s']:8.1f} s")
            if self.path:
                with open(self.path, "w") as f:
                    json.dump({"steps": self.steps, "validations": self.validations,
                               "precision": str(trainer.precision), "rows": rows}, f, indent=1)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=256, n_layers=4, n_heads=4, max_seq_len=512), vocab_size=VOCAB)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    attach_trainer_for_optimizers(model, total_steps=10_000)
    loader = DataLoader(RandomTokens(VOCAB, SEQ_LEN + 1), batch_size=BATCH)
    seconds = {"32-true": [], "bf16-mixed": []}
    for _ in range(args.rounds):
        for precision in seconds:
            seconds[precision].append(bare_seconds_per_step(model, loader, args.steps, precision))
    rows = [{"precision": p, "tokens/s": BATCH * SEQ_LEN / statistics.median(s)} for p, s in seconds.items()]
    rows.append({"precision": "bf16 / fp32", "tokens/s": statistics.median(seconds["32-true"]) / statistics.median(seconds["bf16-mixed"])})
    report(rows, f"quickstart model training throughput by precision ({device}, batch {BATCH} x {SEQ_LEN})", args.json)


if __name__ == "__main__":
    main()
