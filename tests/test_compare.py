"""compare.py end to end on a tiny experiment of two families (NTP and MDLM), and the future-lens probe.

One module fixture trains the experiment the way a user would meet it: NTP trains to the end, the MDLM run is
killed mid-way (SIGKILL, after its first checkpoint), and a second `compare.py` call skips NTP and resumes MDLM.
The other tests read what that left behind."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

import compare
from lab.future_lens import fit_probes, hidden_states
from conftest import ROOT, tiny_data

STEPS = 60


def experiment_file(folder: Path, corpus_files: list[str]) -> Path:
    flags = tiny_data(corpus_files)
    args = {flags[i][2:]: yaml.safe_load(flags[i + 1]) for i in range(0, len(flags), 2)}
    args.update({"model.init_args.trunk.init_args.d_model": 32, "model.init_args.trunk.init_args.n_layers": 1,
                 "model.init_args.trunk.init_args.n_heads": 2, "model.init_args.trunk.init_args.max_seq_len": 128,
                 "model.init_args.sample_tokens": 0, "trainer.val_check_interval": 30,
                 "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 5,
                 "trainer.enable_model_summary": False})
    spec = {"name": "tiny", "description": "two families, a few steps",
            "base": {"configs": ["configs/quickstart.yaml"], "args": args, "steps": STEPS, "seeds": [0],
                     "checkpoint_every": 10,
                     "future_lens": {"train_windows": 8, "val_windows": 4, "epochs": 1, "max_k": 4}},
            "runs": {"ntp": {"model": "configs/objectives/ntp.yaml", "label": "NTP"},
                     "mdlm": {"model": "configs/objectives/mdlm.yaml", "label": "MDLM"}}}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_compare(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = compare.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_files):
    folder = tmp_path_factory.mktemp("compare")
    spec, runs_dir = experiment_file(folder, corpus_files), folder / "runs"
    common = ("--runs-dir", str(runs_dir), "--poll", "0.5")
    code, _ = run_compare(str(spec), "--runs", "ntp", *common)
    assert code == 0
    ntp = runs_dir / "tiny" / "ntp" / "seed0"
    ntp_files = {p.name: p.stat().st_mtime for p in ntp.iterdir() if p.is_file()}

    # the MDLM run, started as compare.py starts it, is killed once its first checkpoint is on disk
    experiment = compare.load_experiment(str(spec))
    mdlm = compare.run_dir(runs_dir, experiment, "mdlm", 0)
    mdlm.mkdir(parents=True)
    with open(mdlm / "train.log", "w") as log:
        process = subprocess.Popen(compare.train_command(runs_dir, experiment, "mdlm", 0), cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        while not (mdlm / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
            time.sleep(0.02)
        time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = torch.load(mdlm / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]

    code, output = run_compare(str(spec), *common)
    return {"spec": spec, "runs_dir": runs_dir, "output": output, "code": code, "killed_at": killed_at,
            "ntp_files": ntp_files, "ntp": ntp, "mdlm": mdlm}


def test_interrupted_run_resumes_and_finished_run_is_not_repeated(trained):
    assert trained["code"] == 0, trained["output"]
    assert 0 < trained["killed_at"] < STEPS
    assert "ntp seed0: finished, skipped" in trained["output"]
    assert f"mdlm seed0: resuming from {trained['mdlm'] / 'checkpoints' / 'last.ckpt'} (step {trained['killed_at']})" \
        in trained["output"]
    assert "Restored all states from the checkpoint" in (trained["mdlm"] / "train.log").read_text()
    # before training, the time MDLM's remaining steps should take, at the finished NTP run's pace
    assert "[tiny] estimate: about " in trained["output"] and "measured on 1 finished run here" in trained["output"]
    info = json.loads((trained["mdlm"] / "run.json").read_text())
    assert info["finished"] and info["steps"] == STEPS
    # RunRecord's counters continue across the resume: every step's tokens are counted once
    assert info["tokens_seen"] == STEPS * 4 * 65
    # the finished run was left alone: its files are the ones it had
    after = {p.name: p.stat().st_mtime for p in trained["ntp"].iterdir() if p.is_file()}
    assert after == trained["ntp_files"]
    # a dry run now has nothing to train
    code, output = run_compare(str(trained["spec"]), "--runs-dir", str(trained["runs_dir"]), "--dry-run")
    assert code == 0 and "ntp seed0: finished" in output and "mdlm seed0: finished" in output
    assert "train.py" not in output


def event_values(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reading of a run folder (a restart's overlapping steps purged), NaN placeholders dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag) if e.value == e.value]
            for tag in accumulator.Tags()["scalars"]}


def test_report_numbers_equal_the_event_files(trained):
    report = json.loads((trained["runs_dir"] / "tiny" / "report" / "report.json").read_text())
    rows = {row["run"]: row for row in report["rows"]}
    assert set(rows) == {"ntp", "mdlm"}
    for name, tag_of_likelihood in (("ntp", "val/ntp_loss"), ("mdlm", "val/nll_bound")):
        events = event_values(trained[name])
        figures = rows[name]["figures"]
        assert figures["val/bpb"]["mean"] == pytest.approx(events["val/bpb"][-1][1], abs=1e-6)
        assert figures["best val/bpb"]["mean"] == pytest.approx(min(v for _, v in events["val/bpb"]), abs=1e-6)
        assert figures[tag_of_likelihood]["mean"] == pytest.approx(events[tag_of_likelihood][-1][1], abs=1e-6)
        assert figures["tokens seen"]["mean"] == events[compare.TOKENS_SEEN][-1][1] == STEPS * 4 * 65
        assert figures["wall-clock s"]["mean"] == pytest.approx(events[compare.WALL_CLOCK][-1][1], abs=1e-3)
        assert events["val/bpb"][-1][0] >= STEPS - 1  # Lightning logs a validation at its last batch's index
    # a bound is labelled as a bound, a likelihood is not
    assert rows["mdlm"]["likelihood"] == "bound" and rows["ntp"]["likelihood"] == "likelihood"
    assert rows["mdlm"]["figures"]["val/ntp_loss"] is None and rows["ntp"]["figures"]["val/nll_bound"] is None
    # the future lens is a causal run's column only, and the report carries what the event file holds
    lens = event_values(trained["ntp"])["future_lens/k2_acc"][-1][1]
    assert rows["ntp"]["figures"]["future lens k=2"]["mean"] == pytest.approx(lens, abs=1e-6)
    assert rows["mdlm"]["figures"]["future lens k=2"] is None
    markdown = (trained["runs_dir"] / "tiny" / "report" / "report.md").read_text()
    assert f"{rows['ntp']['figures']['val/bpb']['mean']:.3f}" in markdown
    # the data's floor, recorded by RunRecord from the datamodule and printed under the table
    info = json.loads((trained["ntp"] / "run.json").read_text())
    assert info["unigram_entropy"] > 0 and info["bytes_per_token"] > 1
    assert f"Unigram entropy of the val split: {info['unigram_entropy']:.3f} nats/token = " in markdown
    assert f"≤ {rows['mdlm']['figures']['val/nll_bound']['mean']:.3f}" in markdown
    assert (trained["runs_dir"] / "tiny" / "report" / "val_bpb.png").stat().st_size > 1000


def test_report_only_rebuilds_the_report_from_a_copied_run_folder(trained, tmp_path):
    shutil.copytree(trained["runs_dir"] / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("report"))
    before = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    code, output = run_compare(str(trained["spec"]), "--runs-dir", str(tmp_path), "--report-only")
    assert code == 0 and "| NTP |" in output
    copied = json.loads((tmp_path / "tiny" / "report" / "report.json").read_text())
    original = json.loads((trained["runs_dir"] / "tiny" / "report" / "report.json").read_text())
    assert [r["figures"] for r in copied["rows"]] == [r["figures"] for r in original["rows"]]
    # nothing was trained or probed: the only new files are the report's
    after = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "report" not in p.parts)
    assert after == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_shows_both_families_on_shared_tags_and_the_layout(trained):
    port = free_port()
    executable = shutil.which("tensorboard")
    command = [executable] if executable else [sys.executable, "-m", "tensorboard.main"]
    server = subprocess.Popen([*command, "--logdir", str(trained["runs_dir"] / "tiny"), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, runs, tags = time.time() + 90, [], {}
        while time.time() < deadline:
            try:
                runs = get(f"{base}/data/runs")
                tags = get(f"{base}/data/plugin/scalars/tags")
                if {"ntp/seed0", "mdlm/seed0"} <= set(tags) and "val/bpb" in tags.get("mdlm/seed0", {}):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert {"ntp/seed0", "mdlm/seed0", "report"} <= set(runs), runs
        shared = set(tags["ntp/seed0"]) & set(tags["mdlm/seed0"])
        for tag in ("val/bpb", "val/loss", "train/loss", compare.TOKENS_SEEN, compare.WALL_CLOCK):
            assert tag in shared, (tag, sorted(shared))
        assert "val/ntp_loss" in tags["ntp/seed0"] and "val/nll_bound" in tags["mdlm/seed0"]
        layout = get(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
        assert any(tags == ["^val/bpb$"] for tags in charts.values()), charts
        assert any(set(tags) == {"^val/ntp_loss$", "^val/nll_bound$"} for tags in charts.values()), charts
        # HParams: the table's columns are family, trunk, parameters and seed, the same whichever run TensorBoard
        # reads them from; val/bpb and tokens/s among the metrics
        experiment = get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = [h["name"] for h in experiment["hparamInfos"]]
        assert sorted(hparams) == ["family", "parameters", "seed", "trunk"], hparams
        assert {"val/bpb", "perf/tokens_per_sec"} <= {m["name"]["tag"] for m in experiment["metricInfos"]}
        sessions = get(f"{base}/data/plugin/hparams/session_groups",
                       {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                                  "STATUS_RUNNING"],
                        "colParams": [{"hparam": "family"}], "startIndex": 0, "sliceSize": 10})
        families = {group["sessions"][0]["name"]: group["hparams"]["family"] for group in sessions["sessionGroups"]}
        assert families == {"ntp/seed0": "NextTokenPrediction", "mdlm/seed0": "MaskedDiffusion"}, families
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_malformed_experiment_file_names_the_bad_entry_and_the_known_keys(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": {"steps": 2}, "runs": {"ntp": {"model": "configs/objectives/ntp.yaml",
                                                                             "argz": {"trainer.max_steps": 3}}}}))
    with pytest.raises(compare.ExperimentError) as error:
        compare.load_experiment(str(path))
    message = str(error.value)
    assert "'argz'" in message and "run 'ntp'" in message
    for key in compare.RUN_KEYS:
        assert key in message
    path.write_text(yaml.safe_dump({"base": {"steps": 2, "seed": [1]}, "runs": {"ntp": {"model": "x.yaml"}}}))
    with pytest.raises(SystemExit):
        compare.main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert "'seed'" in err and "base" in err and "seeds" in err and "checkpoint_every" in err
    path.write_text(yaml.safe_dump({"base": {"steps": 2}, "runs": {"ntp": {"model": "configs/objectives/nope.yaml"}}}))
    with pytest.raises(compare.ExperimentError, match="nope.yaml"):
        compare.load_experiment(str(path))


def test_set_on_the_command_line_wins_over_a_runs_own_flags(tmp_path, capsys):
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump({"base": {"steps": 2, "args": {"model.init_args.optimizer.init_args.lr": 0.01}},
                                    "runs": {"ntp": {"model": "configs/objectives/ntp.yaml",
                                                     "args": {"model.init_args.optimizer.init_args.lr": 0.003}}}}))
    compare.main([str(path), "--dry-run", "--runs-dir", str(tmp_path), "--set",
                  "model.init_args.optimizer.init_args.lr=0.001"])
    command = capsys.readouterr().out.split()
    flag = "--model.init_args.optimizer.init_args.lr"
    assert command[len(command) - 1 - command[::-1].index(flag) + 1] == "0.001"  # the last one given wins


def test_a_runs_own_steps_replace_the_base_budget_and_scale_with_steps(tmp_path, capsys):
    path = tmp_path / "steps.yaml"
    spec = {"base": {"steps": 40}, "runs": {"short": {"model": "configs/objectives/ntp.yaml"},
                                            "long": {"model": "configs/objectives/ntp.yaml", "steps": 100}}}
    path.write_text(yaml.safe_dump(spec))

    def max_steps(*argv: str) -> dict:
        compare.main([str(path), "--dry-run", "--runs-dir", str(tmp_path), *argv])
        lines = [line.split() for line in capsys.readouterr().out.splitlines() if "train.py" in line]
        return {words[words.index("--trainer.logger.init_args.name") + 1]:
                int(words[words.index("--trainer.max_steps") + 1]) for words in lines}

    assert max_steps() == {"short": 40, "long": 100}
    assert max_steps("--steps", "10") == {"short": 10, "long": 25}  # a reduced check keeps the ratio
    spec["runs"]["long"]["steps"] = 0
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(compare.ExperimentError, match="run 'long': `steps` must be a positive"):
        compare.load_experiment(str(path))


FAKE_RUN = """
import json, os, sys, time
out, name = sys.argv[1], sys.argv[2]
start = time.time()
time.sleep(0.6)
json.dump({"start": start, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS"),
           "runs_at_once": os.environ.get("BEYOND_NTP_RUNS_AT_ONCE"), "finished": name != "bad"},
          open(os.path.join(out, "run.json"), "w"))
sys.exit(3 if name == "bad" else 0)
"""


def test_jobs_train_runs_side_by_side_each_with_its_share_of_the_cores(tmp_path, monkeypatch):
    """`jobs` runs at a time (here 2 on 4 cores): two overlap, the third waits for a free slot, each process gets
    2 threads, and a failed run is reported while the others finish; with 1 they follow each other in the
    parent's environment. train.py is replaced by a script that records when it ran and with what."""
    from lab import runner
    path = tmp_path / "side.yaml"
    spec = {"name": "side", "base": {"steps": 3, "future_lens": False, "jobs": 2},
            "runs": {n: {"model": "configs/objectives/ntp.yaml"} for n in ("a", "b", "bad")}}
    path.write_text(yaml.safe_dump(spec))
    experiment = compare.load_experiment(str(path))
    assert experiment.jobs == 2
    monkeypatch.setattr(runner, "train_command", lambda runs_dir, exp, name, seed, resume=None: [
        sys.executable, "-c", FAKE_RUN, str(runner.run_dir(runs_dir, exp, name, seed)), name])
    monkeypatch.setattr(runner, "cpu_cores", lambda: 4)

    def train(jobs: int) -> tuple[list[str], dict]:
        runs_dir = tmp_path / f"runs{jobs}"
        failed = runner.train_all(runs_dir, experiment, ["a", "b", "bad"], [0], poll=0.02, jobs=jobs)
        return failed, {n: json.loads((runner.run_dir(runs_dir, experiment, n, 0) / "run.json").read_text())
                        for n in ("a", "b", "bad")}

    failed, runs = train(2)
    assert failed == ["bad seed0"]
    assert {r["threads"] for r in runs.values()} == {"2"} and {r["runs_at_once"] for r in runs.values()} == {"2"}
    assert runs["a"]["start"] < runs["b"]["end"] and runs["b"]["start"] < runs["a"]["end"]  # side by side
    assert runs["bad"]["start"] >= min(runs["a"]["end"], runs["b"]["end"])  # never three at once
    failed, runs = train(1)
    assert failed == ["bad seed0"]
    assert runs["a"]["end"] <= runs["b"]["start"] and runs["b"]["end"] <= runs["bad"]["start"]
    assert {r["threads"] for r in runs.values()} == {os.environ.get("OMP_NUM_THREADS")}
    spec["base"]["jobs"] = 0
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(compare.ExperimentError, match="base.jobs must be a whole number"):
        compare.load_experiment(str(path))


def test_future_lens_recovers_a_planted_future_token():
    """A toy trunk whose hidden state at t is the embedding of x[t+2]: the k=2 probe reads it off, the others
    see noise."""
    vocab, width = 50, 32
    embedding = torch.randn(vocab, width, generator=torch.Generator().manual_seed(1))

    def toy_trunk(tokens):
        states = embedding[torch.roll(tokens, -2, dims=1)]
        states[:, -2:] = 0  # the last two positions have no x[t+2]
        return states

    g = torch.Generator().manual_seed(0)
    train, held_out = torch.randint(0, vocab, (64, 33), generator=g), torch.randint(0, vocab, (16, 33), generator=g)
    real = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    results = fit_probes((hidden_states(toy_trunk, train), train, real(train)),
                         (hidden_states(toy_trunk, held_out), held_out, real(held_out)), [1, 2, 3], vocab, epochs=8)
    assert results[2]["accuracy"] > 0.95
    assert results[1]["accuracy"] < 0.2 and results[3]["accuracy"] < 0.2


def test_reasoning_runs_report_accuracy_by_step_count_from_their_event_files(tmp_path):
    """On reasoning data the report gets a second table: val/accuracy per step count (read back from the
    val/accuracy_<k>_steps scalars), tokens per answer and answers in format; text runs get none."""
    from torch.utils.tensorboard import SummaryWriter

    from lab.experiment import Run
    from lab.report import reasoning_table, seed_figures, summarise
    writer = SummaryWriter(str(tmp_path))
    for step, (acc, one, three) in enumerate([(0.4, 0.5, 0.3), (0.75, 1.0, 0.625)]):
        for tag, value in (("val/accuracy", acc), ("val/accuracy_1_steps", one), ("val/accuracy_3_steps", three),
                           ("val/answer_tokens", 11.5), ("val/answer_format", 0.96)):
            writer.add_scalar(tag, value, 100 * (step + 1))
    writer.close()
    figures = seed_figures(tmp_path, Run(model="m.yaml"))["figures"]
    assert figures["accuracy 1 steps"] == 1.0 and figures["accuracy 3 steps"] == 0.625
    assert figures["answer tokens"] == 11.5 and abs(figures["answer format"] - 0.96) < 1e-6
    # the learning curve: area 100 * (0.4 + 0.75) / 2 over 100 steps; 50% reached a third of the way from 0.4 to 0.75
    assert abs(figures["accuracy AUC"] - 0.575) < 1e-6 and figures["steps to 90%"] is None
    assert abs(figures["steps to 50%"] - (100 + 100 * 0.1 / 0.35)) < 1e-3
    row = {"label": "CoT", "seeds": [0], "figures": {k: summarise([v]) for k, v in figures.items()}}
    header, rule, line = reasoning_table([row])[1:4]
    assert "accuracy, 1-step questions | accuracy, 3-step questions" in header
    assert line.startswith("| CoT | 0.750 | 1.000 | 0.625 | 11.5 | 0.960 | 0.575 | 129 | never (0/1) |")
    text_row = {"label": "NTP", "figures": {"val/accuracy": None}}
    assert reasoning_table([text_row]) == []


# --- reports from fake runs (no training): the report folder, several experiments, reproducibility, floors, estimate --
def fake_experiment(folder: Path, name: str, **base) -> Path:
    spec = {"name": name, "description": "fake runs written by the test, nothing trained",
            "base": {"steps": 60, "seeds": [0], **base},
            "runs": {"ntp": {"model": "configs/objectives/ntp.yaml", "label": "NTP"},
                     "mtp": {"model": "configs/objectives/mtp.yaml", "label": "MTP n=3"}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def fake_run(out: Path, family: str, heads: int = 0) -> None:
    """What a finished run leaves behind, written directly: run.json (with the data's floors), event files and
    future_lens.json."""
    from torch.utils.tensorboard import SummaryWriter
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps(
        {"family": family, "trunk": "Transformer", "d_model": 32, "n_layers": 1, "parameters": 50_000, "causal": True,
         "hparams": {}, "steps": 60, "max_steps": 60, "tokens_seen": 15_600, "wall_clock_s": 120.0, "finished": True,
         "unigram_entropy": 5.0, "bytes_per_token": 2.5, "chance_accuracy": 0.5}))
    writer = SummaryWriter(str(out))
    for step in (30, 60):
        for tag, value in (("val/bpb", 3.0 - step / 60), (compare.TOKENS_SEEN, step * 260.0),
                           ("val/accuracy", step / 100), ("val/answer_tokens", 5.0)):
            writer.add_scalar(tag, value, step)
        for k in range(1, heads + 1):
            writer.add_scalar(f"val/head{k}_acc", 0.5 / k, step)
        if heads:
            writer.add_scalar("val/accept_len_teacher_forced", 1.62, step)
    writer.add_scalar("future_lens/k2_acc", 0.312, 60)
    writer.close()
    (out / "future_lens.json").write_text(json.dumps({"results": {"2": {"accuracy": 0.312, "floor": 0.105}}}))


@pytest.fixture
def fake_runs(tmp_path):
    spec, runs_dir = fake_experiment(tmp_path, "fake"), tmp_path / "runs"
    fake_run(runs_dir / "fake" / "ntp" / "seed0", "NextTokenPrediction")
    fake_run(runs_dir / "fake" / "mtp" / "seed0", "MultiTokenPrediction", heads=3)
    return spec, runs_dir


def test_report_dir_takes_the_report_and_several_experiments_are_rebuilt(fake_runs, tmp_path):
    spec, runs_dir = fake_runs
    empty = fake_experiment(tmp_path, "never_trained")
    docs = tmp_path / "docs" / "zoo"
    code, output = run_compare(str(spec), str(empty), "--runs-dir", str(runs_dir), "--report-only",
                               "--report-dir", str(docs))
    assert code == 0, output
    assert sorted(p.name for p in (docs / "fake").iterdir()) == ["report.json", "report.md", "val_accuracy.png",
                                                                  "val_bpb.png"]
    assert "[never_trained] no runs under" in output and not (docs / "never_trained").exists()
    # the custom-scalars layout stays where TensorBoard reads it, beside the runs
    assert list((runs_dir / "fake" / "report").glob("events.out.tfevents.*"))
    assert not list((runs_dir / "fake" / "report").glob("report.*"))
    # nothing to report at all is a failure; training several experiments at once is refused
    assert run_compare(str(empty), "--runs-dir", str(runs_dir), "--report-only")[0] == 1
    with pytest.raises(SystemExit):
        compare.main([str(spec), str(empty), "--runs-dir", str(runs_dir)])


def report_files(folder: Path) -> dict[str, bytes]:
    """The report's files, the line that dates it dropped."""
    return {p.name: b"\n".join(line for line in p.read_bytes().split(b"\n")
                               if not line.startswith(b"Built ") and b'"built":' not in line)
            for p in sorted(folder.iterdir())}


def test_report_is_reproducible_byte_for_byte_from_the_same_event_files(fake_runs, tmp_path):
    spec, runs_dir = fake_runs
    builds = []
    for where in ("first", "second"):  # the same event files in two places, each report built in its own folder
        runs = tmp_path / where / "runs"
        shutil.copytree(runs_dir / "fake", runs / "fake")
        code, output = run_compare(str(spec), "--runs-dir", str(runs), "--report-only", "--report-dir",
                                   str(tmp_path / where / "docs"), "--set",
                                   f"data.init_args.tokenizer_path={tmp_path / where / 'tokenizer.json'}")
        assert code == 0, output
        builds.append(report_files(tmp_path / where / "docs" / "fake"))
    assert builds[0] == builds[1]
    text = builds[0]["report.md"].decode() + builds[0]["report.json"].decode()
    assert str(tmp_path) not in text and "tokenizer_path=tokenizer.json" in text  # an absolute path cut to its name
    assert b"Software" not in builds[0]["val_bpb.png"]  # no matplotlib version in the PNG
    built = (tmp_path / "first" / "docs" / "fake" / "report.md").read_text().splitlines()
    assert sum(line.startswith("Built ") for line in built) == 1


def test_report_shows_each_figure_beside_its_floor(fake_runs, tmp_path):
    spec, runs_dir = fake_runs
    code, output = run_compare(str(spec), "--runs-dir", str(runs_dir), "--report-only")
    assert code == 0, output
    report = (runs_dir / "fake" / "report" / "report.md").read_text()
    assert "Unigram entropy of the val split: 5.000 nats/token = 2.885 bits/byte" in report  # 5 / ln 2 / 2.5
    assert "| 0.312 (floor 0.105) |" in report
    assert "accepted length (teacher-forced) 1.62; head accuracy 0.50/0.25/0.17 |" in report
    assert "Chance val/accuracy (a guess among the answers a question allows): 0.500." in report
    rows = json.loads((runs_dir / "fake" / "report" / "report.json").read_text())["rows"]
    assert {row["chance_accuracy"] for row in rows} == {0.5}
    assert "at a time" not in report
    # a run trained beside another (compare.py --jobs 2) is named as such: its speed is a shared machine's
    info_path = runs_dir / "fake" / "mtp" / "seed0" / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "runs_at_once": 2, "threads": 1}))
    assert run_compare(str(spec), "--runs-dir", str(runs_dir), "--report-only")[0] == 0
    report = (runs_dir / "fake" / "report" / "report.md").read_text()
    assert "1 of the runs trained 2 at a time on this machine (1 thread(s) each)" in report


def test_data_floors_come_from_the_datamodule():
    from types import SimpleNamespace

    from datamodules import ReasoningDataModule, SyntheticDataModule
    from lab.runner import data_floors

    class NoValSplit:
        @property
        def unigram_entropy(self):
            raise KeyError("unigram_entropy")

    assert data_floors(SimpleNamespace(unigram_entropy=5.0, bytes_per_token=2.5)) == {"unigram_entropy": 5.0,
                                                                                       "bytes_per_token": 2.5}
    assert data_floors(NoValSplit()) == {} and data_floors(None) == {}
    sizes = {"train_size": 4, "val_size": 4, "test_size": 4}
    assert data_floors(ReasoningDataModule("path_star", degree=3, **sizes)) == {"chance_accuracy": pytest.approx(1 / 3)}
    assert ReasoningDataModule("prosqa", **sizes).chance_accuracy == 0.5
    assert ReasoningDataModule("multiplication", digits=2, **sizes).chance_accuracy is None
    assert SyntheticDataModule("induction_heads", vocab=16, seq_len=16).chance_accuracy == pytest.approx(1 / 15)


def test_estimate_before_training_from_finished_runs_else_the_stated_minutes(fake_runs, tmp_path):
    spec, runs_dir = fake_runs
    shutil.rmtree(runs_dir / "fake" / "mtp")  # left to train: 60 steps at the finished run's 120 s / 60 steps, + 15 s
    code, output = run_compare(str(spec), "--runs-dir", str(runs_dir), "--dry-run")
    assert code == 0
    assert ("# estimate: about 0:02:15 for the 1 run still to train (2.00 s/step, measured on 1 finished run here, "
            "plus 15 s start-up a run)") in output
    fresh = tmp_path / "fresh"
    stated = fake_experiment(tmp_path, "stated", minutes=10)
    output = run_compare(str(stated), "--runs-dir", str(fresh), "--dry-run")[1]
    assert "# estimate: about 0:10:00 for the 2 runs still to train (the experiment file's stated budget" in output
    output = run_compare(str(stated), "--runs-dir", str(fresh), "--dry-run", "--steps", "30")[1]
    assert "# estimate: about 0:05:00 for the 2 runs" in output
    output = run_compare(str(spec), "--runs-dir", str(fresh), "--dry-run")[1]
    assert "# estimate: no estimate yet (the first run's progress line gives one)" in output
    with pytest.raises(compare.ExperimentError, match="minutes"):
        compare.load_experiment(str(fake_experiment(tmp_path, "bad", minutes="soon")))


def test_the_layout_leaves_out_charts_no_run_has_data_for():
    """The custom-scalars layout: every chart without rows, and with rows only those some run logged (reasoning
    runs have no val/bpb, a run without the future-lens probe has no future_lens/ tags)."""
    from types import SimpleNamespace
    from lab.report import LAYOUT_CHARTS, layout
    experiment = SimpleNamespace(name="x")
    assert set(layout(experiment)["x: comparison"]) == set(LAYOUT_CHARTS)
    rows = [{"figures": {"val/accuracy": None, "tokens/s": 10.0, "val/ntp_loss": 0.5}},
            {"figures": {"val/accuracy": 0.5, "tokens seen": 100, "val/bpb": None, "future lens k=2": None}}]
    assert set(layout(experiment, rows)["x: comparison"]) == {
        "val/accuracy (reasoning data)", "training tokens/s", "training tokens seen",
        "likelihood and bound: val/ntp_loss beside val/nll_bound"}
