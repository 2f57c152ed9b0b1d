"""The state-space trunks' speed, memory and length generalisation: Mamba's chunked selective scan, and the Mamba
and Mamba-2 trunks against the transformer.

    python -m benchmarks.ssm [--parts a b c d] [--repeats 5] [--threads N] [--json out.json]

(a) scan: forward of `models.selective_scan.selective_scan` (the chunked pure-PyTorch scan) against the step-by-step loop
    `selective_scan_reference` at L in {256, 1024, 4096}, d_inner 512, N 16, batch 2 (goal: >= 10x at L=1024
    on CPU); and one Mamba block's forward+backward at d_model 256, d_state 16, batch 2, L 1024 against
    `mambapy`'s block (its parallel scan; optional dependency: pip install mambapy), in the same process
    (goal: >= 2x its tokens/s); and one Mamba block's forward+backward with the scan's batch in row slices
    (the CPU default) against the whole batch at once, at zoo_recall's and the quickstart's shapes.
(b) train: NTP training tokens/s (one forward+backward+AdamW step, median of --repeats after a warm-up; bf16
    autocast where `auto_precision()` says bf16-mixed) and peak memory of the transformer (d 256 x 4, 3.21M),
    Mamba (d 256 x 7, 3.07M), Mamba-2 (d 256 x 7, 3.26M) and RWKV-7 (d 256 x 4, 3.22M), each as its
    configs/models/*-quickstart.yaml (--trunks picks some), V 4096, T in --train_lengths (default {1024, 4096, 16384}), batch
    --train_tokens / T (equal tokens per step). CPU: each case in a fresh subprocess reporting its peak RSS; GPU:
    max memory allocated.
(c) decode: per-token greedy decode latency at batch 1 after --contexts tokens of context (default up to 16384;
    prefill not timed), the trunks of (b) (--trunks), random weights (goal: flat for the state-space trunks).
(d) induction: configs/experiments/induction_heads_{transformer,mamba,mamba2}.yaml (2 layers, vocab 16, trained
    at 256) trained through the CLI, then the answer-token accuracy by one forward pass (the prediction at the
    last prompt position) on --eval_examples test examples at 1x, 4x, 16x and 64x the training length.
(e) trunk: one forward+backward of the trunk alone at batch 1 (--trunk_lengths, default 4096; bf16 autocast where
    `auto_precision()` says so) for the transformer, Mamba-2 as shipped and Mamba-2 without recompute, alternated
    in one process: the measurement of the trunks acceptance check, with the variant beside it.

Timings are the best of `--repeats` runs after a warm-up, the compared implementations alternating, so that
other load on the machine disturbs both alike. On a machine whose cores other processes also use, pass
`--threads 1`: OpenMP threads competing for the same cores stall every small op (both the scan's and the
loop's), by up to 100x.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import torch

from benchmarks.common import parser, random_batch, table
from models.mamba import MambaBlock
from models.selective_scan import selective_scan, selective_scan_reference


def alternating_times(fns: dict, repeats: int) -> dict:
    """{name: [seconds of each run]}, running the functions in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def best_of_alternating(fns: dict, repeats: int) -> dict:
    """{name: best seconds}, running the functions in turn `repeats` times after one warm-up each."""
    return {name: min(t) for name, t in alternating_times(fns, repeats).items()}


def scan_inputs(batch: int, dim: int, n: int, length: int, seed: int = 0) -> dict:
    """Inputs shaped as in a Mamba block: softplus(delta + bias) with dt around 0.001..0.1, S4D-real A."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, n, length, generator=g),
        C=torch.randn(batch, n, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.log(torch.expm1(torch.exp(torch.empty(dim).uniform_(-6.9, -2.3, generator=g)))),
        delta_softplus=True,
    )


def bench_scan(lengths=(256, 1024, 4096), batch: int = 2, dim: int = 512, n: int = 16, repeats: int = 5) -> list[dict]:
    """Forward of the chunked scan against the sequential loop, inputs (batch, dim, L) contiguous."""
    rows = []
    for length in lengths:
        kw = scan_inputs(batch, dim, n, length)
        with torch.no_grad():
            t = best_of_alternating({"chunked": lambda: selective_scan(**kw),
                                     "loop": lambda: selective_scan_reference(**kw)},
                                    repeats if length <= 1024 else max(2, repeats // 2))
        rows.append({"benchmark": "scan forward", "L": length, "chunked ms": 1e3 * t["chunked"],
                     "loop ms": 1e3 * t["loop"], "chunked tok/s": batch * length / t["chunked"],
                     "loop tok/s": batch * length / t["loop"], "speedup": t["loop"] / t["chunked"]})
    return rows


def _mambapy_block(d_model: int, d_state: int):
    try:
        from mambapy.mamba import MambaBlock as MambaPyBlock, MambaConfig
    except ImportError:
        return None
    return MambaPyBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state))


def bench_block(d_model: int = 256, d_state: int = 16, batch: int = 2, length: int = 1024,
                repeats: int = 5) -> list[dict]:
    """One Mamba block (mixer) forward+backward, fp32, against mambapy's block in the same process."""
    torch.manual_seed(0)
    ours = MambaBlock(d_model, d_state=d_state)
    x = torch.randn(batch, length, d_model)

    def step(block):
        def run():
            block.zero_grad(set_to_none=True)
            inp = x.clone().requires_grad_()
            block(inp).square().mean().backward()
        return run

    fns = {"ours": step(ours)}
    other = _mambapy_block(d_model, d_state)
    if other is not None:
        fns["mambapy"] = step(other)
    t = best_of_alternating(fns, repeats)
    tokens = batch * length
    rows = [{"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "models.mamba (chunked scan)",
             "ms": 1e3 * t["ours"], "tok/s": tokens / t["ours"]}]
    if other is None:
        rows.append({"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "mambapy not installed"})
    else:
        rows.append({"benchmark": "Mamba block fwd+bwd", "L": length, "impl": "mambapy (pscan)",
                     "ms": 1e3 * t["mambapy"], "tok/s": tokens / t["mambapy"]})
        rows[0]["speedup"] = t["mambapy"] / t["ours"]
    return rows


ROW_SLICE_SHAPES = ((128, 64, 64, "MQAR d128"), (64, 32, 256, "induction heads d64"), (256, 16, 1024, "quickstart"))


def bench_row_slices(repeats: int = 5) -> list[dict]:
    """One Mamba block forward+backward (fp32) with the scan's batch in row slices (the default on a CPU) and
    as one slice, alternating, at the shapes of zoo_recall's MQAR and induction-heads runs and the quickstart."""
    import models.selective_scan as scan_module
    sliced = scan_module._rows_per_slice
    rows = []
    for d_model, batch, length, what in ROW_SLICE_SHAPES:
        torch.manual_seed(0)
        block, x = MambaBlock(d_model, d_state=16), torch.randn(batch, length, d_model)

        def run(rows_per_slice):
            def step():
                scan_module._rows_per_slice = rows_per_slice
                try:
                    block.zero_grad(set_to_none=True)
                    block(x.clone().requires_grad_()).square().mean().backward()
                finally:
                    scan_module._rows_per_slice = sliced
            return step

        t = best_of_alternating({"slices": run(sliced), "whole": run(lambda b, *_, **__: b)},
                                repeats if length < 1024 else max(2, repeats // 2))
        rows.append({"shape": what, "batch x L": f"{batch} x {length}", "d_inner": 2 * d_model,
                     "rows per slice": sliced(batch, length, 16, 2 * d_model), "whole batch ms": 1e3 * t["whole"],
                     "row slices ms": 1e3 * t["slices"], "speedup": t["whole"] / t["slices"]})
    return rows


def part_a(args) -> list[tuple[str, list[dict]]]:
    scan = bench_scan(repeats=args.repeats)
    block = bench_block(repeats=args.repeats)
    slices = bench_row_slices(repeats=args.repeats)
    return [(f"(a) selective scan forward: chunked vs step-by-step loop (d_inner 512, N 16, batch 2, fp32, "
             f"{torch.get_num_threads()} threads)", scan),
            (f"(a) Mamba block forward+backward (d_model 256, d_state 16, batch 2, L 1024, fp32, "
             f"{torch.get_num_threads()} threads)", block),
            (f"(a) Mamba block forward+backward, the scan's batch in row slices vs whole (d_state 16, fp32, "
             f"{torch.get_num_threads()} threads)", slices)]


# ---------------------------------------------------------------- (b) training speed and memory vs the transformer
TRUNKS = {"transformer": "Transformer d256 x4", "mamba": "Mamba d256 x7", "mamba2": "Mamba-2 d256 x7",
          "rwkv7": "RWKV-7 d256 x4"}
TRAIN_VOCAB = 4096


def quickstart_trunk(kind: str, max_seq_len: int, d_model: int = 256):
    """The trunk of configs/models/{kind}-quickstart.yaml (the transformer: configs/quickstart.yaml's, 4 x 256),
    all matched in parameters, so that the benchmark measures the shapes a user trains; another `d_model` only
    for the GPU suite's tiny smoke run."""
    import yaml
    import models
    if kind == "transformer":
        return models.Transformer(d_model=d_model, n_layers=4, n_heads=max(1, d_model // 64), max_seq_len=max_seq_len)
    with open(Path(__file__).resolve().parent.parent / "configs" / "models" / f"{kind}-quickstart.yaml") as f:
        config = yaml.safe_load(f)
    return getattr(models, config["class_path"].split(".")[-1])(**{**config.get("init_args", {}), "d_model": d_model})


def quickstart_model(kind: str, vocab: int, max_seq_len: int, d_model: int = 256):
    from objectives import NextTokenPrediction
    return NextTokenPrediction(quickstart_trunk(kind, max_seq_len, d_model), vocab_size=vocab)


def train_step_rate(kind: str, seq_len: int, batch: int, steps: int, device: str = "cpu", d_model: int = 256,
                    vocab: int = TRAIN_VOCAB, warmup: int = 1) -> dict:
    """Median seconds of one NTP forward+backward+AdamW step, tokens/s, parameters and the peak memory."""
    import resource
    import statistics
    from objectives.training.callbacks import auto_precision, compute_dtype
    torch.manual_seed(0)
    model = quickstart_model(kind, vocab, seq_len + 1, d_model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = random_batch(vocab, batch, seq_len, device)
    dtype = compute_dtype(auto_precision())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.loss(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0)
    return {"seconds": s, "tokens/s": batch * seq_len / s, "params": sum(p.numel() for p in model.trunk.parameters()),
            "peak": float(peak), "precision": str(dtype).replace("torch.", "")}


def part_b(args) -> list[tuple[str, list[dict]]]:
    import subprocess
    import sys
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for seq_len in args.train_lengths:
        batch = max(1, args.train_tokens // seq_len)
        for kind in args.trunks:
            if device == "cuda":
                r = train_step_rate(kind, seq_len, batch, args.repeats, device)
                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, "-m", "benchmarks.ssm", "--train_case", f"{kind},{seq_len},{batch}",
                       "--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"T": seq_len, "batch": batch, "trunk": TRUNKS[kind], "trunk params M": r["params"] / 1e6,
                         "step s": r["seconds"], "tokens/s": r["tokens/s"], "peak GiB": r["peak"] / 2**30,
                         "precision": r["precision"]})
        base = rows[-len(args.trunks)]
        for row in rows[-len(args.trunks) + 1:]:
            row["x transformer tok/s"] = row["tokens/s"] / base["tokens/s"]
            row["x transformer mem"] = row["peak GiB"] / base["peak GiB"]
        print(json.dumps(rows[-len(args.trunks):]), flush=True)
    what = "max memory allocated" if device == "cuda" else "peak RSS of a fresh process per case"
    return [(f"(b) NTP training step, V {TRAIN_VOCAB}, {args.train_tokens} tokens per batch, median of "
             f"{args.repeats} steps ({what}, {device}, {torch.get_num_threads()} threads)", rows)]


# ---------------------------------------------------------------- (c) decode latency against context length
@torch.no_grad()
def decode_latency(kind: str, context: int, new_tokens: int, vocab: int = TRAIN_VOCAB, device: str = "cpu",
                   repeats: int = 3) -> float:
    """Best-of-`repeats` mean seconds per greedy token at batch 1 after `context` tokens (prefill not timed)."""
    torch.manual_seed(0)
    model = quickstart_model(kind, vocab, context + new_tokens + 8).to(device).eval()
    prompt = torch.randint(0, vocab, (1, context), device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # first run: warm-up
        cache = model.trunk.make_cache(1, device=device)
        h = model.hidden(prompt, cache=cache)
        token = model.logits(h[:, -1:]).argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            h = model.hidden(token, cache=cache)
            token = model.logits(h[:, -1:]).argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / new_tokens)
    return best


def part_c(args) -> list[tuple[str, list[dict]]]:
    rows = []
    for context in args.contexts:
        row = {"context": context}
        for kind in args.trunks:
            row[f"{TRUNKS[kind]} ms/token"] = 1e3 * decode_latency(kind, context, args.new_tokens,
                                                                   repeats=args.repeats // 2 + 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for row in rows:
        for name in (TRUNKS[kind] for kind in args.trunks):
            row[f"{name} x first"] = row[f"{name} ms/token"] / rows[0][f"{name} ms/token"]
    return [(f"(c) greedy decode latency per token, batch 1, {args.new_tokens} tokens after the context, fp32, "
             f"random weights, V {TRAIN_VOCAB}, {torch.get_num_threads()} threads", rows)]


# ---------------------------------------------------------------- (d) induction heads, 1x to 64x the training length
INDUCTION_RECIPES = {kind: f"configs/experiments/induction_heads_{kind}.yaml"
                     for kind in ("transformer", "mamba", "mamba2")}


@torch.no_grad()
def answer_accuracy(model, dataset, batch_size: int = 32) -> float:
    """Accuracy of the greedy prediction at the last prompt position against the answer token."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        tokens = torch.stack([x["tokens"] for x in items])
        prompt_len = int(items[0]["prompt_len"])
        answer = torch.stack([x["answer"][0] for x in items])
        h = model.hidden(tokens[:, :prompt_len])
        pred = model.logits(h[:, -1]).argmax(-1)
        correct += int((pred == answer).sum())
        total += len(items)
    model.train(was_training)
    return correct / total


def induction_recipe(kind: str, lengths=(256, 1024, 4096, 16384), eval_examples: int = 128,
                     overrides: tuple[str, ...] = (), save_dir: str = "runs") -> dict:
    """Train configs/experiments/induction_heads_{kind}.yaml through the CLI (train.py, as a user would), then
    score the answer token on `eval_examples` test examples at each prompt length (one forward pass each)."""
    from lab import cli as train
    from datamodules.synthetic import SyntheticTaskDataset
    start = time.perf_counter()
    cli = train.main(["fit", "--config", INDUCTION_RECIPES[kind], "--trainer.enable_progress_bar", "false",
                      "--trainer.logger.init_args.save_dir", save_dir, *overrides])
    train_s = time.perf_counter() - start
    model, hp = cli.model, cli.datamodule.hparams
    row = {"trunk": f"{kind} {cli.model.trunk.n_layers} x d{cli.model.trunk.d_model}",
           "params K": sum(p.numel() for p in model.parameters()) / 1e3, "steps": cli.trainer.global_step,
           "train s": train_s, "val/loss": float(cli.trainer.callback_metrics.get("val/loss", float("nan")))}
    for n in lengths:
        data = SyntheticTaskDataset("induction_heads", n, num_examples=eval_examples, vocab=hp.vocab, split="test")
        row[f"acc @{n} ({n // hp.seq_len}x)"] = answer_accuracy(model, data, batch_size=max(1, 8192 // n))
    return row


def score_checkpoint(path: str, lengths=(256, 1024, 4096, 16384), eval_examples: int = 128, vocab: int = 16,
                     train_len: int = 256) -> dict:
    """The answer accuracy of a saved induction-heads model (e.g. the recipe's last.ckpt) at each prompt length,
    and for a Mamba its blocks' memory horizons and step selectivity at the value on a test prompt of the longest
    length (`memory_horizons`)."""
    from datamodules.synthetic import SyntheticTaskDataset
    from objectives.training.checkpoints import load_checkpoint, load_objective
    checkpoint = load_checkpoint(path)
    model = load_objective(path, checkpoint=checkpoint)
    row = {"trunk": f"{type(model.trunk).__name__} {model.trunk.n_layers} x d{model.trunk.d_model}",
           "params K": sum(p.numel() for p in model.parameters()) / 1e3, "steps": checkpoint.get("global_step")}
    for n in lengths:
        data = SyntheticTaskDataset("induction_heads", n, num_examples=eval_examples, vocab=vocab, split="test")
        row[f"acc @{n} ({n // train_len}x)"] = answer_accuracy(model, data, batch_size=max(1, 8192 // n))
    longest = SyntheticTaskDataset("induction_heads", max(lengths), num_examples=1, vocab=vocab, split="test")[0]
    value = int((longest["tokens"] == vocab - 1).nonzero()[0]) + 1  # the token after the key's first occurrence
    return {**row, **memory_horizons(model, longest["tokens"][None], marked=value)}


@torch.no_grad()
def memory_horizons(model, tokens: torch.Tensor, marked: int | None = None) -> dict:
    """For a Mamba trunk, per block: how many tokens back its longest-remembering channels reach on `tokens` (1,
    T). A channel with step sizes delta_t keeps exp(-|A_n| sum delta_t) of what it stored; its slowest state n
    forgets to 1/e after 1 / (mean delta * min_n |A_n|) tokens. Reported: the 90th percentile and the largest of
    that horizon over the block's channels (an induction head must bridge the gap from the pair to the query).
    With `marked` (a position, e.g. the value an induction head must store): the median over channels of delta
    there over delta's median elsewhere, how selective the block's steps are (a selective SSM that ignores the
    filler between pair and query, as in Gu & Dao's induction heads, would show a ratio far above 1)."""
    import torch.nn.functional as F
    from models import Mamba
    from models.selective_scan import _step_sizes
    if not isinstance(model.trunk, Mamba):
        return {}
    steps = {}

    def keep_steps(i, mixer):  # delta as the block's scan forms it from x_proj's output
        def hook(module, inputs, out):
            raw = F.linear(out[..., :mixer.dt_rank], mixer.dt_proj.weight)
            steps[i] = _step_sizes(raw, mixer.dt_proj.bias, True, torch.float32)[0]
        return hook

    hooks = [block.mixer.x_proj.register_forward_hook(keep_steps(i, block.mixer))
             for i, block in enumerate(model.trunk.blocks)]
    try:
        model.trunk(model.embed(tokens), mask="causal")
    finally:
        for hook in hooks:
            hook.remove()
    row = {}
    for i, block in enumerate(model.trunk.blocks):
        slowest = torch.exp(block.mixer.A_log.float()).min(1).values  # min_n |A_n| per channel
        horizon = 1 / (steps[i][0].mean(0) * slowest)
        row[f"layer {i} horizon p90 / max"] = f"{torch.quantile(horizon, 0.9):.0f} / {horizon.max():.0f}"
        if marked is not None:
            rest = torch.ones(tokens.shape[1], dtype=torch.bool)
            rest[marked] = False
            row[f"layer {i} step at marked / elsewhere"] = float(
                steps[i][0, marked].median() / steps[i][0, rest].median(0).values.median())
    return row


def part_d(args) -> list[tuple[str, list[dict]]]:
    rows = []
    if args.induction_ckpt:  # score saved models instead of training the recipes
        for path in args.induction_ckpt:
            rows.append(score_checkpoint(path, args.induction_lengths, args.eval_examples))
            print(json.dumps(rows[-1]), flush=True)
    for kind in [] if args.induction_ckpt else args.induction_trunks:
        rows.append(induction_recipe(kind, args.induction_lengths, args.eval_examples,
                                     tuple(shlex.split(args.induction_args))))
        print(json.dumps(rows[-1]), flush=True)
    return [("(d) induction heads (vocab 16), trained at 256 by configs/experiments/induction_heads_*.yaml "
             f"(bf16-mixed where the CPU has bf16), answer accuracy on {args.eval_examples} test examples per length "
             "(chance 1/15)", rows)]


# ---------------------------------------------------------------- (e) trunk forward+backward, alternated in one process
def trunk_step_rates(lengths=(4096,), repeats: int = 3) -> list[dict]:
    """Seconds of one forward+backward of the trunk alone (batch 1, the mean square of its output as the loss) for
    the transformer, Mamba-2 as configs/models/mamba2-quickstart.yaml and the same without recompute, alternated
    in one process (the measurement of ../shared/checks/trunks.sh, with the variant added): best and median."""
    import statistics
    from objectives.training.callbacks import auto_precision, compute_dtype
    dtype = compute_dtype(auto_precision())
    rows = []
    for seq_len in lengths:
        torch.manual_seed(0)
        shipped = quickstart_trunk("mamba2", seq_len)
        no_recompute = quickstart_trunk("mamba2", seq_len)
        for block in no_recompute.blocks:
            block.mixer.recompute = False
        trunks = {"Transformer d256 x4": quickstart_trunk("transformer", seq_len),
                  "Mamba-2 d256 x7 (recompute, as shipped)": shipped, "Mamba-2 d256 x7, no recompute": no_recompute}

        def step(trunk):
            def run():
                x = torch.randn(1, seq_len, 256, requires_grad=True)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    y = trunk(x, mask="causal")
                y.float().pow(2).mean().backward()
            return run
        times = alternating_times({name: step(trunk) for name, trunk in trunks.items()}, repeats)
        base = times["Transformer d256 x4"]
        for name, t in times.items():
            rows.append({"T": seq_len, "trunk": name, "best s": min(t), "median s": statistics.median(t),
                         "x transformer tok/s (best)": min(base) / min(t),
                         "x transformer tok/s (median)": statistics.median(base) / statistics.median(t),
                         "precision": str(dtype).replace("torch.", "")})
        print(json.dumps(rows[-len(trunks):]), flush=True)
    return rows


def part_e(args) -> list[tuple[str, list[dict]]]:
    rows = trunk_step_rates(args.trunk_lengths, args.repeats)
    return [(f"(e) trunk forward+backward, batch 1, alternated in one process, {args.repeats} rounds "
             f"({torch.get_num_threads()} threads)", rows)]


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", nargs="+", default=list(PARTS), help="which parts to run, e.g. a b (available: %s)"
                   % ",".join(PARTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--train_lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--trunks", nargs="+", default=list(TRUNKS), choices=list(TRUNKS),
                   help="(b, c) which trunks, the transformer first (the ratios are to it)")
    p.add_argument("--train_tokens", type=int, default=16384, help="(b) tokens per batch: batch = this / T")
    p.add_argument("--trunk_lengths", type=int, nargs="+", default=[4096], help="(e) sequence lengths")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    p.add_argument("--new_tokens", type=int, default=8)
    p.add_argument("--decode_threads", type=int, default=1, help="(c) torch threads while decoding")
    p.add_argument("--induction_trunks", nargs="+", default=list(INDUCTION_RECIPES), help="(d) which recipes")
    p.add_argument("--induction_lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--induction_ckpt", nargs="+", default=[], help="(d) score these saved models instead of training")
    p.add_argument("--induction_args", default="", help='(d) extra train.py flags for every recipe, one string: '
                   '--induction_args="--trainer.max_steps 500"')
    p.add_argument("--eval_examples", type=int, default=256)
    p.add_argument("--train_case", help="internal: run one (b) case 'kind,T,batch' in this process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_case:
        kind, seq_len, batch = args.train_case.split(",")
        print(json.dumps(train_step_rate(kind, int(seq_len), int(batch), args.repeats)))
        return
    tables = []
    for part in "".join(args.parts).replace(",", ""):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r} (available: {', '.join(PARTS)})")
        threads = torch.get_num_threads()
        if part == "c":
            torch.set_num_threads(args.decode_threads)
        tables += PARTS[part](args)
        torch.set_num_threads(threads)
    for title, rows in tables:
        print(table(rows, title), end="\n\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "repeats": args.repeats,
                       "tables": [{"title": title, "rows": rows} for title, rows in tables]}, f, indent=1)


if __name__ == "__main__":
    main()
