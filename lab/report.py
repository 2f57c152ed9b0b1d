"""The side-by-side report of an experiment, read back from its runs' TensorBoard event files into
runs/<name>/report/ (or another folder): report.md, report.json, PNG plots against training tokens, each figure
beside its floor (a context-free model's bits per byte, chance accuracy, the future lens's most-frequent-token
accuracy), and in runs/<name>/report/ a custom-scalars layout (TensorBoard's "Custom Scalars" tab) that puts every
run's comparable figures on shared charts.

The report is a document kept in the repository (docs/zoo/): built twice from the same event files it comes out
byte for byte the same apart from the line that dates it (no absolute paths, keys sorted, no version or date in
the PNGs)."""
from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from pathlib import Path

import objectives
from lab.experiment import ROOT, Experiment, Run
from lab.runner import FUTURE_LENS, PEAK_MEMORY, REPORT_LENS_KS, TOKENS_SEEN, WALL_CLOCK, clock, read_json, run_dir
from objectives.training import metrics as M

# on reasoning data, a family without a figure of its own shows the tokens its answers took
REASONING_HEADLINE = (M.VAL_ANSWER_TOKENS, "answer tokens")
# val/accuracy broken down by a group of questions (metrics.ACCURACY_GROUPS), and its column in the second table
GROUP_TAG = re.compile(r"val/accuracy_(\d+)_(%s)" % "|".join(M.ACCURACY_GROUPS.values()))
GROUP_COLUMN = {"steps": "accuracy, {}-step questions", "pairs": "accuracy, {} pairs", "tokens": "accuracy @{} tokens"}
HEAD_ACC = re.compile(r"val/head(\d+)_acc")  # multi-token prediction: head k's accuracy on token t+k
HEAD_ACC_KEY = re.compile(r"head (\d+) accuracy")  # its figure in the report
# the plots: tag, y axis, file, and the floor drawn beside it (the rows' key, the line's label)
CHARTS = ((M.VAL_BPB, "val/bpb (bits per UTF-8 byte)", "val_bpb.png", ("unigram_bpb", "unigram (context-free) model")),
          (M.VAL_ACCURACY, "val/accuracy (exact match, share of questions)", "val_accuracy.png",
           ("chance_accuracy", "chance")))
BUILT = "Built {} from the runs' TensorBoard event files."  # the report's one line that changes from build to build


# --- reading the runs back -------------------------------------------------------------------------------------------------
def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every finite scalar in the event files of one run folder: tag -> [(step, value)] by step; where a resumed
    run logged a step twice, the later write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for e in accumulator.Scalars(tag):
                if math.isfinite(e.value) and (e.step not in by_tag.setdefault(tag, {})
                                               or by_tag[tag][e.step][0] <= e.wall_time):
                    by_tag[tag][e.step] = (e.wall_time, e.value)
    return {tag: sorted((step, v) for step, (_, v) in values.items()) for tag, values in by_tag.items()}


def summarise(values: list[float | None]) -> dict | None:
    """Mean and spread (sample standard deviation; 0 with one seed) over seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def seed_figures(folder: Path, run: Run) -> dict:
    """The figures of one (run, seed), all from its event files except the static facts in run.json."""
    info = read_json(folder / "run.json") or {}
    scalars = read_scalars(folder)
    last = lambda tag: scalars[tag][-1][1] if scalars.get(tag) else None  # noqa: E731
    best = lambda tag: min(v for _, v in scalars[tag]) if scalars.get(tag) else None  # noqa: E731
    throughput = [v for _, v in scalars.get(M.TOKENS_PER_SEC, [])]
    figures = {M.VAL_BPB: last(M.VAL_BPB), "best val/bpb": best(M.VAL_BPB), M.VAL_NTP_LOSS: last(M.VAL_NTP_LOSS),
               M.VAL_NLL_BOUND: last(M.VAL_NLL_BOUND), M.VAL_ACCURACY: last(M.VAL_ACCURACY),
               "tokens seen": last(TOKENS_SEEN), "tokens/s": statistics.median(throughput) if throughput else None,
               "peak memory MiB": last(PEAK_MEMORY), "wall-clock s": last(WALL_CLOCK),
               "steps": max((s for values in scalars.values() for s, _ in values), default=0)}
    lens = (read_json(folder / "future_lens.json") or {}).get("results", {})
    for k in REPORT_LENS_KS:
        figures[f"future lens k={k}"] = last(FUTURE_LENS.format(k))
        figures[f"future lens k={k} floor"] = lens.get(str(k), {}).get("floor")  # the most frequent token's accuracy
    for k, tag in sorted((int(m[1]), m[0]) for t in scalars if (m := HEAD_ACC.fullmatch(t))):
        figures[f"head {k} accuracy"] = last(tag)
    # reasoning and recall data: accuracy per group (ProsQA-mini's step counts, MQAR's pairs, prompt lengths), its
    # learning curve, tokens written per answer, answers in shape
    for unit, k, tag in sorted((m[2], int(m[1]), m[0]) for t in scalars if (m := GROUP_TAG.fullmatch(t))):
        figures[f"accuracy {k} {unit}"] = last(tag)
    if M.VAL_ACCURACY in scalars:
        figures.update(learning_curve(scalars[M.VAL_ACCURACY]))
    if M.VAL_ANSWER_TOKENS in scalars:
        figures["answer tokens"] = last(M.VAL_ANSWER_TOKENS)
        figures["answer format"] = last(M.answer_format("val"))
    if M.TEST_ACCURACY in scalars:  # compare.py --test: the run's last checkpoint on the test split
        figures["test accuracy"] = last(M.TEST_ACCURACY)
        figures["test answer tokens"] = last(M.TEST_ANSWER_TOKENS)
    tag, _ = headline(run, info, scalars)
    if tag is not None:
        figures["headline"] = (info.get("hparams", {}).get(tag.split(".", 1)[1]) if tag.startswith("hparams.")
                               else last(tag))
    return {"info": info, "figures": figures, "scalars": scalars}


def learning_curve(points: list[tuple[int, float]]) -> dict:
    """How fast val/accuracy rises (Wang et al. 2023 compare planning tokens by such curves): its area, the mean
    accuracy over the validated steps (trapezoid rule between validations, divided by the steps they span; the
    curve starts at the first validation, not at step 0), and the steps at which it first reaches 50% and 90%
    (linear between validations; None where it never does)."""
    if len(points) < 2:
        return {"accuracy AUC": None, "steps to 50%": None, "steps to 90%": None}
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    figures = {"accuracy AUC": area / (points[-1][0] - points[0][0])}
    for level in (0.5, 0.9):
        reached = None
        for (s0, a0), (s1, a1) in zip([(points[0][0], points[0][1])] + points, points):
            if a1 >= level:
                reached = s1 if a1 == a0 or a0 >= level else s0 + (s1 - s0) * (level - a0) / (a1 - a0)
                break
        figures[f"steps to {level:.0%}"] = reached
    return figures


def headline(run: Run, info: dict, scalars: dict) -> tuple[str | None, str | None]:
    """The family's own figure: the run's `headline`, else the family's default, else answer tokens on reasoning
    data. Returns (tag or hparams.<name>, label)."""
    if run.headline:
        return run.headline, run.headline
    family = getattr(objectives, info.get("family") or "", None)
    tag, label = getattr(family, "headline_metric", None) or (None, None)
    if tag is not None and (tag.startswith("hparams.") or tag in scalars):
        return tag, label
    return REASONING_HEADLINE if REASONING_HEADLINE[0] in scalars else (None, None)


def collect(runs_dir: Path, experiment: Experiment, names: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for name in names:
        run = experiment.runs[name]
        per_seed = {s: seed_figures(run_dir(runs_dir, experiment, name, s), run) for s in seeds
                    if run_dir(runs_dir, experiment, name, s).is_dir()}
        if not per_seed:
            continue
        first = next(iter(per_seed.values()))
        info = first["info"]
        tag, label = headline(run, info, first["scalars"])
        keys = list(first["figures"])
        rows.append({
            "run": name, "label": run.label, "family": info.get("family"), "trunk": info.get("trunk"),
            "d_model": info.get("d_model"), "n_layers": info.get("n_layers"), "parameters": info.get("parameters"),
            "causal": info.get("causal"), "seeds": sorted(per_seed),
            "finished": all((p["info"] or {}).get("finished") for p in per_seed.values()),
            "likelihood": "bound" if any(p["figures"][M.VAL_NLL_BOUND] is not None for p in per_seed.values())
            else "likelihood",
            "headline_tag": tag, "headline_label": label,
            # the data's floors: a context-free model's loss (and bits per byte), a guess's accuracy
            "unigram_entropy": info.get("unigram_entropy"), "unigram_bpb": unigram_bpb(info),
            "chance_accuracy": info.get("chance_accuracy"),
            "runs_at_once": info.get("runs_at_once", 1), "threads": info.get("threads"),
            "figures": {k: summarise([p["figures"].get(k) for p in per_seed.values()]) for k in keys},
            "curves": {str(s): {t: p["scalars"].get(t, []) for t in (M.VAL_BPB, M.VAL_ACCURACY, TOKENS_SEEN)}
                       for s, p in per_seed.items()},
        })
    return rows


def unigram_bpb(info: dict) -> float | None:
    """The unigram entropy (nats/token) in bits per byte, where the data has bytes."""
    nats = info.get("unigram_entropy")
    per_token = info.get("bytes_per_token") or (info.get("hparams") or {}).get("bytes_per_token")  # older runs: hparams
    return nats / math.log(2) / per_token if nats and per_token else None


# --- the report ------------------------------------------------------------------------------------------------------------
def cell(summary: dict | None, digits: int = 3, prefix: str = "") -> str:
    if summary is None:
        return "-"
    fmt = lambda v: f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"  # noqa: E731
    text = prefix + fmt(summary["mean"])
    return text + f" ± {fmt(summary['std'])}" if summary["n"] > 1 else text


def floors(rows: list[dict], key: str) -> list[tuple[dict, str]]:
    """One row per distinct value of a floor (`key`: unigram_entropy, unigram_bpb, chance_accuracy), with the runs
    that share it in brackets where not every run does."""
    groups: dict[float, list[dict]] = {}
    for row in rows:
        if row.get(key) is not None:
            groups.setdefault(row[key], []).append(row)
    return [(same[0], "" if len(same) == len(rows) else f" ({', '.join(r['label'] for r in same)})")
            for same in groups.values()]


def lens_cell(figures: dict, k: int) -> str:
    """The probe's accuracy beside the most frequent token's: "0.312 (floor 0.105)"."""
    floor = figures.get(f"future lens k={k} floor")
    return cell(figures[f"future lens k={k}"]) + (f" (floor {floor['mean']:.3f})" if floor else "")


def family_figure(row: dict) -> str:
    """The family's own figure, and beside it the per-head accuracy of multi-token heads (what the accepted
    length is made of): "accepted length (teacher-forced) 1.62; head accuracy 0.41/0.18/0.09"."""
    f, h = row["figures"], row["figures"].get("headline")
    parts = [f"{row['headline_label']} {cell(h, 0 if h and float(h['mean']).is_integer() else 2)}"
             if row["headline_tag"] else None]
    heads = [f"{summary['mean']:.2f}" for key, summary in f.items() if HEAD_ACC_KEY.fullmatch(key) and summary]
    parts.append(f"head accuracy {'/'.join(heads)}" if heads else None)
    return "; ".join(p for p in parts if p) or "-"


def portable(text: str) -> str:
    """A path under the project made relative to it and any other absolute path cut to its file name, so that the
    report reads the same on every machine."""
    return re.sub(r"(?<![\w.~:/-])/(?:[^\s/'\",\]]+/)+([^\s/'\",\]]+)", r"\1", text.replace(f"{ROOT}/", ""))


def markdown(experiment: Experiment, rows: list[dict], built: str) -> str:
    columns = ["run", "family", "trunk", "params", "tokens seen", "final val/bpb", "best val/bpb",
               M.VAL_NTP_LOSS, "val/nll_bound (bound)", M.VAL_ACCURACY, "tokens/s", "peak MiB", "wall-clock",
               "future lens k=2", "future lens k=4", "family's figure"]
    reduced = (f"Run with {portable(' '.join(experiment.overrides))} on top of the experiment file (a reduced "
               f"budget)." if experiment.overrides else "")
    shared = [r for r in rows if (r.get("runs_at_once") or 1) > 1]
    side_by_side = (f"{len(shared)} of the runs trained {max(r['runs_at_once'] for r in shared)} at a time on this "
                    f"machine ({shared[0]['threads']} thread(s) each): their tokens/s and wall-clock are those of "
                    f"runs sharing the CPU." if shared else "")
    lines = [f"# {experiment.name}", "", experiment.description, "", BUILT.format(built), "",
             *([reduced, ""] if reduced else []), *([side_by_side, ""] if side_by_side else []),
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        f, bound = row["figures"], row["likelihood"] == "bound"
        trunk = f"{row['trunk']} d{row['d_model']}x{row['n_layers']}" if row["trunk"] else "-"
        wall = f["wall-clock s"]
        values = [row["label"] + ("" if row["finished"] else " (unfinished)"), row["family"] or "-", trunk,
                  f"{row['parameters'] / 1e6:.2f}M" if row["parameters"] else "-",
                  cell(f["tokens seen"], 0), cell(f[M.VAL_BPB], 3, "≤ " if bound else ""),
                  cell(f["best val/bpb"], 3, "≤ " if bound else ""), cell(f[M.VAL_NTP_LOSS]),
                  cell(f[M.VAL_NLL_BOUND], 3, "≤ " if bound else ""), cell(f[M.VAL_ACCURACY]),
                  cell(f["tokens/s"], 0), cell(f["peak memory MiB"], 0),
                  clock(wall["mean"]) if wall else "-", *(lens_cell(f, k) for k in REPORT_LENS_KS),
                  family_figure(row)]
        lines.append("| " + " | ".join(values) + " |")
    unigram = [f"{r['unigram_entropy']:.3f} nats/token"
               + (f" = {r['unigram_bpb']:.3f} bits/byte" if r["unigram_bpb"] else "") + which
               for r, which in floors(rows, "unigram_entropy")]
    if unigram:
        lines += ["", f"Unigram entropy of the val split: {'; '.join(unigram)} (the loss of a context-free model: "
                      "a run below it has learned something from the context)."]
    lines += reasoning_table(rows)
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines += ["", f"Seeds: {', '.join(map(str, seeds))} (a ± is the standard deviation over seeds). "
              "`val/ntp_loss` is the next-token NLL in nats/token; `val/nll_bound` is an upper bound on the NLL "
              "(diffusion families), and their `val/bpb` (marked ≤) is the same bound in bits per byte, not a "
              "likelihood. Future lens: held-out accuracy of a linear probe from the trunk's hidden state at t to "
              "the token at t+k (causal runs). Peak memory: allocated GPU memory, or the process's peak resident "
              "set on CPU. Wall-clock: training time, validation included, data preparation not. Future lens floor: "
              "the accuracy of always guessing the most frequent target."]
    return "\n".join(lines) + "\n"


def reasoning_table(rows: list[dict]) -> list[str]:
    """On reasoning and recall data, a second table: val/accuracy per group of questions (step count of their
    worked solutions, key-value pairs, prompt length), the tokens written per answer and the share of answers in
    the right format where answers are generated, and, where val/accuracy was logged more than once, its learning
    curve (none elsewhere)."""
    groups = sorted({(m[2], int(m[1])) for row in rows for k in row["figures"]
                     if (m := re.fullmatch(r"accuracy (\d+) (\w+)", k))})
    generated = any("answer tokens" in row["figures"] for row in rows)
    if not generated and not groups:
        return []
    tested = any(row["figures"].get("test accuracy") is not None for row in rows)
    curves = any(row["figures"].get("accuracy AUC") is not None for row in rows)
    columns = ["run", M.VAL_ACCURACY, *(GROUP_COLUMN[unit].format(k) for unit, k in groups),
               *(["answer tokens", "answers in format"] if generated else []),
               *(["val/accuracy AUC", "steps to 50%", "steps to 90%"] if curves else []),
               *([M.TEST_ACCURACY, "test answer tokens"] if tested else [])]
    lines = ["", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        f = row["figures"]
        lines.append("| " + " | ".join([row["label"], cell(f[M.VAL_ACCURACY]),
                                        *(cell(f.get(f"accuracy {k} {unit}")) for unit, k in groups),
                                        *([cell(f.get("answer tokens"), 1), cell(f.get("answer format"))]
                                          if generated else []),
                                        *([cell(f.get("accuracy AUC")), reached(f, "50%", row),
                                           reached(f, "90%", row)] if curves else []),
                                        *([cell(f.get("test accuracy")), cell(f.get("test answer tokens"), 1)]
                                          if tested else [])]) + " |")
    chance = [f"{r['chance_accuracy']:.3f}{which}" for r, which in floors(rows, "chance_accuracy")]
    if chance:
        lines += ["", f"Chance val/accuracy (a guess among the answers a question allows): {'; '.join(chance)}."]
    if curves:
        lines += ["", "AUC: the mean val/accuracy over the validated steps (trapezoid rule between validations). "
                  "Steps to 50% / 90%: where val/accuracy first reaches the level (linear between validations), "
                  "over the seeds that reach it, their count in brackets where some do not."]
    return lines


def reached(figures: dict, level: str, row: dict) -> str:
    """Steps to a level over the seeds that reached it, with (k/n seeds) where not all did."""
    summary = figures.get(f"steps to {level}")
    n = len(row["seeds"])
    if summary is None:
        return f"never (0/{n})"
    return cell(summary, 0) + ("" if summary["n"] == n else f" ({summary['n']}/{n})")


def tokens_at(curves: dict, steps: list[int]) -> list[float]:
    """Tokens seen at each step, interpolated from the run's perf/tokens_seen points."""
    import numpy as np
    points = curves.get(TOKENS_SEEN) or []
    if not points:
        return [float("nan")] * len(steps)
    xs, ys = zip(*points)
    slope = ys[-1] / xs[-1] if xs[-1] else 0.0
    return [float(np.interp(s, (0, *xs), (0, *ys))) if s <= xs[-1] else s * slope for s in steps]


def plot(rows: list[dict], tag: str, ylabel: str, path: Path, title: str, floor: tuple[str, str]) -> bool:
    """`tag` against tokens seen, one line per run (the mean over seeds) and a band from the lowest to the highest
    seed, beside the data's floor (`floor`: the rows' key and the line's label) as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(10, 5))
    # 20 colours, the dark and light of each pair far apart, so that a zoo's dozen runs get a colour each
    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    drawn = False
    for i, row in enumerate(rows):
        series = []
        for curves in row["curves"].values():
            points = curves.get(tag) or []
            if points:
                steps, values = zip(*points)
                series.append((tokens_at(curves, list(steps)), list(values)))
        if not series:
            continue
        grid = np.array(series[0][0])
        values = np.array([np.interp(grid, x, y) for x, y in series])
        line, = ax.plot(grid, values.mean(0), marker="o", markersize=3, color=palette[i % len(palette)],
                        linestyle="-" if i < len(palette) else "--",
                        label=row["label"] + (" (bound)" if row["likelihood"] == "bound" and tag == M.VAL_BPB else ""))
        if len(series) > 1:
            ax.fill_between(grid, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
        drawn = True
    if drawn:
        key, label = floor
        lines = floors(rows, key)
        for (row, which), style in zip(lines, ("--", ":", "-.") * len(rows)):
            which = which if len(lines) > 1 else ""  # one line: the caption under the table names its runs
            ax.axhline(row[key], color="black", linestyle=style, linewidth=1, label=f"{label}: {row[key]:.3f}{which}")
        ax.set_xlabel("training tokens seen (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the chart: no line hidden
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})  # no matplotlib version: the same bytes every build
    plt.close(fig)
    return drawn


# the custom-scalars charts: title -> (tag patterns, the report figures that say the runs logged those tags)
LAYOUT_CHARTS = {
    "val/bpb (diffusion families: a bound)": ([r"^val/bpb$"], [M.VAL_BPB]),
    "likelihood and bound: val/ntp_loss beside val/nll_bound": ([r"^val/ntp_loss$", r"^val/nll_bound$"],
                                                                [M.VAL_NTP_LOSS, M.VAL_NLL_BOUND]),
    "val/accuracy (reasoning data)": ([r"^val/accuracy$"], [M.VAL_ACCURACY]),
    "future lens: probe accuracy of x(t+k) from h(t)": ([r"^future_lens/"],
                                                         [f"future lens k={k}" for k in REPORT_LENS_KS]),
    "training tokens/s": ([r"^perf/tokens_per_sec$"], ["tokens/s"]),
    "training tokens seen": ([r"^perf/tokens_seen$"], ["tokens seen"]),
}


def layout(experiment: Experiment, rows: list[dict] | None = None) -> dict:
    """TensorBoard custom-scalars layout: the comparable figures of every run of the experiment on shared charts
    (each chart's tags are regular expressions matched in every run). Given the report's rows, only the charts
    some run has data for (an empty chart on every screen reads as a broken one)."""
    def logged(figures: list[str]) -> bool:
        return rows is None or any(row["figures"].get(f) is not None for row in rows for f in figures)
    return {f"{experiment.name}: comparison": {title: ["Multiline", tags]
                                               for title, (tags, figures) in LAYOUT_CHARTS.items() if logged(figures)}}


def write_layout(folder: Path, experiment: Experiment, rows: list[dict] | None = None) -> None:
    """The layout as its own small event file in the report folder (a run named `report` in TensorBoard)."""
    from torch.utils.tensorboard import SummaryWriter
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(folder))
    writer.add_custom_scalars(layout(experiment, rows))
    writer.close()


def write_report(runs_dir: Path, experiment: Experiment, names: list[str], seeds: list[int],
                 folder: Path | None = None) -> Path | None:
    """The report in `folder` (default runs/<name>/report/), the layout in runs/<name>/report/, where TensorBoard
    reads it; None where the experiment has no runs."""
    rows = collect(runs_dir, experiment, names, seeds)
    if not rows:
        return None
    folder = folder or runs_dir / experiment.name / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    for tag, ylabel, name, floor in CHARTS:
        (folder / name).unlink(missing_ok=True)  # a chart without data this time leaves no old picture behind
        if plot(rows, tag, ylabel, folder / name, f"{experiment.name}: {tag} against training tokens", floor):
            plots.append(name)
    built = datetime.date.today().isoformat()
    reported = {row["run"] for row in rows}
    missing = [experiment.runs[n].label for n in names if n not in reported]
    text = (markdown(experiment, rows, built)
            + (f"\nNot run yet (no run folder under runs/{experiment.name}/): {'; '.join(missing)}.\n" if missing else "")
            + "".join(f"\n![{p}]({p})\n" for p in plots))
    (folder / "report.md").write_text(text)
    (folder / "report.json").write_text(json.dumps(
        {"experiment": experiment.name, "description": experiment.description, "steps": experiment.steps,
         "overrides": [portable(o) for o in experiment.overrides], "built": built,
         "plots": plots, "rows": rows, "not_run": missing}, indent=1, sort_keys=True) + "\n")
    layout_folder = runs_dir / experiment.name / "report"
    layout_folder.mkdir(parents=True, exist_ok=True)
    write_layout(layout_folder, experiment, rows)
    return folder
