"""Plan-then-generate: (a) planning tokens (Wang et al. 2023) against plain chain of thought, (b) the trainable
Skeleton-of-Thought's parallel against sequential expansion, and its quality against plain next-token decoding of
whole modules (Ning et al. 2023).

    python -m benchmarks.planning [--tasks multiplication,prosqa] [--seeds 0,1] [--steps 300] [--d_model 64]
        [--n_layers 2] [--test_size 200] [--skeleton_steps 300] [--modules 8] [--body_tokens 48]
        [--write_body_tokens 64] [--module_tokens 512] [--skip planning,skeleton,whole] [--json F]

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
(c) Does point-wise expansion cost quality against decoding the whole answer? (SoT's own question, answered in the
paper by LLM judges of prose answers, Ning et al. 2023, Section 3.2.) A plain next-token model
(configs/experiments/skeleton_code_ntp.yaml) is trained at the skeleton model's trunk shape, step budget, batch,
sequence length and seed on the same modules' whole texts (`Skeleton.assemble()`, the text the skeleton examples
are cut from) with the same tokenizer; the markers are plain text to that BPE, so both models see a module's text
as the same tokens. (`TextDataModule` on stdlib-code with the same split has the same tokenizer, the same cache,
but trains on every train-split file, not the skeleton model's `max_files` modules; hence `whole_modules`.) On
the first `--modules` held-out test modules, one row per model:
  - body NLL, on the same bodies: SoT's p(body_i | skeleton, header_i) (the training prompt: the true skeleton's
    first seq_len // 2 tokens, the header) against NTP's p(body_i | every token before it in the module). Both are
    read in windows of the training length (seq_len): SoT's window always keeps its prompt and slides over the
    body, NTP's slides over the module; tokens are scored once, with at least half a window of context. nats per
    token counts each model's own tokens (SoT: the body encoded alone, eos left out; NTP: the module's tokens that
    overlap the body's characters, so a token joining the header's newline and the body's indentation counts);
    bits per byte divides by the UTF-8 bytes those tokens cover, the figure that does not depend on where tokens
    split. Points whose SoT prompt leaves less than a quarter window for the body, and empty bodies, are left out
    of both.
  - ast.parse ok %: each model writes the module from its preamble, greedy; the output is the true preamble
    followed by what it wrote. SoT: `write` (its own skeleton, cut at eos or seq_len // 2 tokens as trained, then
    every point expanded in parallel, `--write_body_tokens` each). NTP: continuation of eos + preamble, cut at eos
    or `--module_tokens`, its context kept to the last seq_len tokens (re-read every seq_len // 4 tokens) so that it
    decodes at the lengths it was trained on. A module with nothing written parses (it is its preamble), so
    the next column counts only outputs that parse with at least one point (def or class) written.
  - signature P / R / F1 %: the signature lines (decorator, def and class lines with their continuation lines,
    stripped) of SoT's split skeleton, and of what `split_skeleton` finds in NTP's output, against the true
    module's (exact line match after strip, counted with multiplicity, summed over modules). NTP's count also
    takes any def it nests inside a function, which the true skeleton does not list.
  - seconds and tokens generated per module (`--threads` threads, fp32).
Departures from the paper: SoT prompts API models on prose questions and judges answers with GPT-4; here both
models are small, trained from scratch on Python, and scored with likelihood, the parser and signature matches.
"""
from __future__ import annotations

import ast
import bisect
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import parser, report
from datamodules.skeleton import BODY, EXPAND, POINT, split_skeleton
from lab import cli as train
from objectives.skeleton import cut_at
from objectives.training import metrics as M

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
SEQ_LEN = 192  # the skeleton runs' training length, and the window their scoring and decoding read
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


@torch.no_grad()
def token_nll(model, prompt: list[int], ids: list[int], window: int, keep_prompt: bool = True) -> list[float]:
    """The NLL (nats) of each of `ids` given `prompt` and the ids before it, read in windows of at most `window`
    tokens: the first window scores as many ids as fit, each later one the next half of its room, so that every id
    sees at least half a window of what comes before it. `keep_prompt`: every window begins with the whole prompt
    (and slides over the ids); otherwise the windows slide over prompt + ids alike."""
    fixed, seq = (prompt, ids) if keep_prompt else ([], prompt + ids)
    a, room = len(seq) - len(ids), window - len(fixed)  # a: the first position of seq to score
    if not prompt or room < 2 or a >= room:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room to score in a window of {window}")
    out, first_window = [], True
    while a < len(seq):
        b = min(len(seq), room if first_window else a + room // 2)
        lo, first_window = max(0, b - room), False
        x = torch.tensor([fixed + seq[lo:b]], device=model.device)
        logits = model.logits(model.hidden(x[:, :-1]))[0]
        first = len(fixed) + a - lo - 1  # the position whose logits predict seq[a]
        out += F.cross_entropy(logits[first:first + b - a].float(), x[0, first + 1:first + 1 + b - a],
                               reduction="none").tolist()
        a = b
    return out


def ntp_body_nll(model, dm, skel, window: int) -> list[tuple[float, int, int]]:
    """(nats, tokens, bytes) of each body of the module under the next-token model: the module's tokens (after an
    eos, as it was trained) that overlap the body's characters, and the UTF-8 bytes those tokens cover."""
    text = skel.assemble()
    enc = dm.tokenizer.encode(text)
    nll = token_nll(model, [dm.eos_id], enc.ids, window, keep_prompt=False)
    starts, ends = [s for s, _ in enc.offsets], [e for _, e in enc.offsets]
    out, at = [], len(skel.preamble)
    for header, body in zip(skel.headers, skel.bodies):
        at += len(header)
        first, last = bisect.bisect_right(ends, at), bisect.bisect_left(starts, at + len(body))
        covered = text[starts[first]:ends[last - 1]] if last > first else ""
        out.append((sum(nll[first:last]), last - first, len(covered.encode())))
        at += len(body)
    return out


@torch.no_grad()
def ntp_write(model, prompt: list[int], budget: int, window: int) -> list[int]:
    """Greedy continuation of `prompt`, cut at eos or after `budget` tokens, the context kept to the last `window`
    tokens: every window // 4 tokens `generate` starts again from the latest window - window // 4."""
    chunk, out = window // 4, []
    while len(out) < budget:
        context = (prompt + out)[-(window - chunk):]
        n = min(chunk, budget - len(out))
        new = model.generate(torch.tensor([context], device=model.device), n)[0, len(context):].tolist()
        out += cut_at(new, model.eos_id)
        if model.eos_id in new:
            break
    return out


def signature_lines(headers: list[str]) -> Counter:
    """The stripped decorator, def, class and signature-continuation lines of some headers, with multiplicity."""
    return Counter(ln.strip() for h in headers for ln in h.splitlines() if ln.strip() and not ln.strip().startswith("#"))


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def whole_module_rows(sot, ntp, dm, args) -> list[dict]:
    """SoT against plain next-token decoding of whole modules (the module docstring's (c)): one row per model."""
    fmt, window = dm.format, dm.hparams.seq_len
    names = {"sot": "SoT: own skeleton, points in parallel", "ntp": "NTP: whole module, left to right"}
    keys = ("nats", "tokens", "bytes", "parsed", "parsed_points", "seconds", "generated", "points", "hits", "written",
            "true")
    tally = {name: dict.fromkeys(keys, 0) for name in names}
    modules, bodies = dm.modules("test")[: args.modules], 0
    for skel in modules:
        prefix = fmt.expand_prefix(fmt.skeleton_ids(skel.text))
        for header, body, by_ntp in zip(skel.headers, skel.bodies, ntp_body_nll(ntp, dm, skel, window)):
            prompt = prefix + fmt.point_prompt(header)
            if not body.strip() or len(prompt) > window - window // 4:
                continue
            ids = dm.encode(body)
            by_sot = (sum(token_nll(sot, prompt, ids, window)), len(ids), len(body.encode()))
            for name, (nats, tokens, n_bytes) in (("sot", by_sot), ("ntp", by_ntp)):
                tally[name]["nats"] += nats
                tally[name]["tokens"] += tokens
                tally[name]["bytes"] += n_bytes
            bodies += 1

        start = time.perf_counter()
        written = sot.write(skel.preamble, fmt, max_body_tokens=args.write_body_tokens)
        sot_seconds = time.perf_counter() - start
        start = time.perf_counter()
        continuation = ntp_write(ntp, [dm.eos_id] + dm.encode(skel.preamble), args.module_tokens, window)
        ntp_seconds = time.perf_counter() - start
        continued = dm.decode(continuation)
        true = signature_lines(skel.headers)
        for name, text, headers, seconds, generated in (
                ("sot", written.text, written.headers, sot_seconds, written.tokens),
                ("ntp", skel.preamble + continued, split_skeleton(continued), ntp_seconds, len(continuation))):
            t, lines = tally[name], signature_lines(headers)
            t["parsed"] += parses(text)
            t["parsed_points"] += bool(headers) and parses(text)
            t["seconds"] += seconds
            t["generated"] += generated
            t["points"] += len(headers)
            t["hits"] += sum((lines & true).values())
            t["written"] += sum(lines.values())
            t["true"] += sum(true.values())
    rows, n = [], max(len(modules), 1)
    for name, t in tally.items():
        precision = t["hits"] / t["written"] if t["written"] else float("nan")
        recall = t["hits"] / t["true"] if t["true"] else float("nan")
        rows.append({"model": names[name], "modules": len(modules), "bodies scored": bodies,
                     "body nats/token": t["nats"] / max(t["tokens"], 1),
                     "body bits/byte": t["nats"] / math.log(2) / max(t["bytes"], 1),
                     "ast.parse ok %": 100 * t["parsed"] / n,
                     "ok with >= 1 point %": 100 * t["parsed_points"] / n, "signature P %": 100 * precision,
                     "signature R %": 100 * recall,
                     "signature F1 %": 200 * precision * recall / (precision + recall) if t["hits"] else 0.0,
                     "s/module": t["seconds"] / n, "tokens/module": t["generated"] / n, "points/module": t["points"] / n})
    return rows


def skeleton_tables(args, save_dir: str) -> None:
    """(b) and (c): trains the skeleton model, and the next-token control unless `--skip whole`, and reports."""
    data = ["--data.init_args.seq_len", str(SEQ_LEN)]
    cli = fit("skeleton_code.yaml", args, save_dir, 0, data, args.skeleton_steps)
    model, dm = cli.model.eval(), cli.datamodule
    ntp = None
    if "whole" not in args.skip:  # the same trunk, steps, batch, sequence length, seed and modules
        ntp = fit("skeleton_code_ntp.yaml", args, save_dir, 0, data, args.skeleton_steps).model.eval()
    torch.set_num_threads(args.threads)
    json_path = lambda suffix: args.json and args.json.replace(".json", suffix)  # noqa: E731
    report(skeleton_speed_rows(model, dm, args), f"skeleton: parallel vs sequential expansion at a fixed body "
           f"length ({args.threads} thread(s), batch 1 module)", json_path("_sot_speed.json"))
    report(true_skeleton_rows(model, dm, args), "skeleton: parallel vs sequential expansion",
           json_path("_skeleton.json"))
    if ntp is not None:
        report(whole_module_rows(model, ntp, dm, args), f"skeleton: SoT against next-token decoding of whole modules "
               f"({args.threads} thread(s), fp32)", json_path("_sot_whole.json"))


def true_skeleton_rows(model, dm, args) -> list[dict]:
    """Each test module's true skeleton expanded both ways, bodies ending at eos (the module docstring's (b))."""
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
    p.add_argument("--write_body_tokens", type=int, default=64,
                   help="most tokens of a body when SoT writes whole modules (the whole-module table)")
    p.add_argument("--module_tokens", type=int, default=512,
                   help="most tokens the next-token model writes after a module's preamble (the whole-module table)")
    p.add_argument("--skip", default="", help="'planning', 'skeleton' or 'whole' (the whole-module comparison, which "
                                              "trains a second model), comma-separated, to leave parts out")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing the expansion")
    args = p.parse_args(argv)
    save_dir = tempfile.mkdtemp(prefix="planning-bench-")
    if "skeleton" not in args.skip:
        skeleton_tables(args, save_dir)
    if "planning" not in args.skip:
        report(planning_table(args, save_dir), "planning tokens vs CoT", args.json)


if __name__ == "__main__":
    main()
