"""Plan-then-generate: (a) planning tokens (Wang et al. 2023) against plain chain of thought, (b) the trainable
Skeleton-of-Thought's parallel against sequential expansion (Ning et al. 2023).

    python -m benchmarks.planning [--tasks multiplication,prosqa] [--seeds 0,1] [--steps 300] [--d_model 64]
        [--n_layers 2] [--test_size 200] [--skeleton_steps 300] [--modules 8] [--body_tokens 48] [--json F]

(a) For each task (3-digit multiplication, ProsQA-style questions) and seed: CoT (`plans: none`), planning tokens
with rule types, and planning tokens with k-means types clustered on the step embeddings of that seed's trained
CoT checkpoint (`kmeans_from`; the k-means run itself trains from scratch on the same budget). Rows: test accuracy
and generated tokens per question (plan tokens not counted), mean and spread (max - min) over seeds.
(b) The skeleton model (configs/experiments/skeleton_code.yaml, shrunk) trained on the code corpus; on held-out
test modules, each module's true skeleton is given and its points expanded greedily, in one batched decode from a
forked prefix cache (parallel) and one point at a time (sequential), alternated in one process. The speed rows
expand the first 4, 8 and 16 points of every test module that has that many, each body exactly `--body_tokens`
long (eos does not stop a body there), so that both ways do the same work, as SoT's speed-up is measured (Ning et
al. 2023, Figure 1: up to 2.39x); rows: seconds per module both ways and the speedup. The quality row expands
every module's whole skeleton as the model would (bodies end at eos): whether both ways gave the same tokens, the
model's next-token loss on the expanded bodies, and the share of assembled modules that `ast.parse` accepts.
"""
from __future__ import annotations

import ast
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import parser, report
from datamodules.skeleton import BODY, EXPAND, POINT
from lab import cli as train
from objectives.training import metrics as M

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
CONFIG = {"multiplication": "planning_multiplication_{}.yaml", "prosqa": "planning_prosqa_{}.yaml"}


def fit(config: str, args, save_dir: str, seed: int, extra: list[str], steps: int | None = None):
    """train.py fit of an experiment config, shrunk to the benchmark's trunk and step budget."""
    steps = steps or args.steps
    return train.main(["fit", "-c", str(EXPERIMENTS / config), "--seed_everything", str(seed),
                       "--trainer.max_steps", str(steps), "--trainer.num_sanity_val_steps", "0",
                       "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
                       "--trainer.logger.init_args.save_dir", save_dir, "--trainer.enable_progress_bar", "false",
                       "--model.init_args.trunk.init_args.d_model", str(args.d_model),
                       "--model.init_args.trunk.init_args.n_layers", str(args.n_layers),
                       "--model.init_args.trunk.init_args.n_heads", "2", "--model.init_args.eval_examples", "8", *extra])


def planning_table(args, save_dir: str) -> list[dict]:
    rows = []
    for task in args.tasks.split(","):
        results: dict[str, list[tuple[float, float]]] = {"cot": [], "rule": [], "kmeans": []}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for plans in ("cot", "rule", "kmeans"):
                config = CONFIG[task].format("kmeans" if plans == "kmeans" else "rule")
                extra = {"cot": ["--model.init_args.plans", "none"], "rule": [],
                         "kmeans": ["--model.init_args.kmeans_from", f"{save_dir}/{task}_cot_{seed}.ckpt"]}[plans]
                cli = fit(config, args, save_dir, seed, extra + ["--data.init_args.test_size", str(args.test_size)])
                if plans == "cot":
                    cli.trainer.save_checkpoint(f"{save_dir}/{task}_cot_{seed}.ckpt")
                tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
                results[plans].append((100 * tested[M.TEST_ACCURACY], tested[M.TEST_ANSWER_TOKENS]))
                print(task, plans, seed, results[plans][-1], flush=True)
        for plans, values in results.items():
            acc = [a for a, _ in values]
            rows.append({"task": task, "method": plans, "test acc % (mean)": statistics.mean(acc),
                         "spread": max(acc) - min(acc), "per seed": " / ".join(f"{a:.1f}" for a in acc),
                         "tokens/question": statistics.mean(t for _, t in values)})
    return rows


def expansion_seconds(model, prefix: list[int], headers: list[list[int]], body_tokens: int) -> dict[bool, float]:
    """Seconds to expand the points {parallel: ..., sequential: ...} with every body exactly body_tokens long
    (eos_id set aside for the timing), the better of two alternated rounds."""
    eos, model.eos_id = model.eos_id, None
    try:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(2):
            for parallel in (True, False):
                start = time.perf_counter()
                model.expand(prefix, headers, body_tokens, parallel=parallel)
                times[parallel].append(time.perf_counter() - start)
    finally:
        model.eos_id = eos
    return {parallel: min(t) for parallel, t in times.items()}


def skeleton_speed_rows(model, dm, args) -> list[dict]:
    """Parallel against sequential expansion of the first P points of each test module with at least P, at a fixed
    body length: the work is the same both ways."""
    limit = model.trunk.max_seq_len - args.body_tokens
    rows = []
    for points in [int(p) for p in args.points.split(",")]:
        par, seq, used = 0.0, 0.0, 0
        for skel in dm.modules("test"):
            prefix = dm.encode(EXPAND) + dm.encode(skel.text)[:96] + dm.encode(POINT)
            headers = [dm.encode(h)[-24:] + dm.encode(BODY) for h in skel.headers]
            headers = [h for h in headers if len(prefix) + len(h) <= limit][:points]
            if len(headers) < points:
                continue
            seconds = expansion_seconds(model, prefix, headers, args.body_tokens)
            par, seq, used = par + seconds[True], seq + seconds[False], used + 1
            if used == args.modules:
                break
        rows.append({"points": points, "modules": used, "body tokens": args.body_tokens,
                     "parallel s/module": par / max(used, 1), "sequential s/module": seq / max(used, 1),
                     "speedup": seq / par if par else float("nan")})
    return rows


def skeleton_table(args, save_dir: str) -> list[dict]:
    cli = fit("skeleton_code.yaml", args, save_dir, 0, ["--data.init_args.seq_len", "192"], args.skeleton_steps)
    model, dm = cli.model.eval(), cli.datamodule
    torch.set_num_threads(args.threads)
    report(skeleton_speed_rows(model, dm, args), f"skeleton: parallel vs sequential expansion at a fixed body "
           f"length ({args.threads} thread(s), batch 1 module)", args.json and args.json.replace(".json", "_sot_speed.json"))
    limit = model.trunk.max_seq_len - args.body_tokens
    par_s, seq_s, same, losses, parsed, points = [], [], True, [], 0, 0
    modules = dm.modules("test")[: args.modules]
    for skel in modules:
        head = dm.encode(skel.text)[:96]
        prefix = dm.encode(EXPAND) + head + dm.encode(POINT)
        headers = [dm.encode(h)[-24:] + dm.encode(BODY) for h in skel.headers]
        headers = [h for h in headers if len(prefix) + len(h) <= limit][:16]
        points += len(headers)
        times = {True: [], False: []}
        for _ in range(2):  # alternated, so that load from other jobs hits both alike
            for parallel in (True, False):
                start = time.perf_counter()
                out = model.expand(prefix, headers, args.body_tokens, parallel=parallel)
                times[parallel].append(time.perf_counter() - start)
                if parallel:
                    par_out = out
                else:
                    same &= out == par_out
        par_s.append(min(times[True]))
        seq_s.append(min(times[False]))
        with torch.no_grad():  # the model's next-token loss on its own expanded bodies
            for h, body in zip(headers, par_out):
                if body:
                    ids = torch.tensor([prefix + h + body])
                    logits = model.logits(model.hidden(ids[:, :-1]))[0, -len(body):]
                    losses.append(float(torch.nn.functional.cross_entropy(logits, ids[0, -len(body):])))
        bodies = [dm.decode(b) for b in par_out] + [""] * (len(skel.headers) - len(par_out))
        try:
            ast.parse(model.assemble(skel.preamble, skel.headers, bodies))
            parsed += 1
        except SyntaxError:
            pass
    return [{"modules": len(modules), "points": points, "parallel s/module": statistics.mean(par_s),
             "sequential s/module": statistics.mean(seq_s), "speedup": sum(seq_s) / sum(par_s),
             "same tokens": same, "NTP loss on bodies": statistics.mean(losses) if losses else float("nan"),
             "ast.parse ok %": 100 * parsed / max(len(modules), 1)}]


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--tasks", default="multiplication,prosqa")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--skeleton_steps", type=int, default=300)
    p.add_argument("--modules", type=int, default=8)
    p.add_argument("--points", default="4,8,16", help="points per module of the speed rows")
    p.add_argument("--body_tokens", type=int, default=48)
    p.add_argument("--skip", default="", help="'planning' or 'skeleton' to leave a part out")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing the expansion")
    args = p.parse_args(argv)
    save_dir = tempfile.mkdtemp(prefix="planning-bench-")
    if "skeleton" not in args.skip:
        report(skeleton_table(args, save_dir), "skeleton: parallel vs sequential expansion",
               args.json and args.json.replace(".json", "_skeleton.json"))
    if "planning" not in args.skip:
        report(planning_table(args, save_dir), "planning tokens vs CoT", args.json)


if __name__ == "__main__":
    main()
