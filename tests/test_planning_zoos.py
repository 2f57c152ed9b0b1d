"""The planning-task experiments (issue 27) dry-run through compare.py with their runs, and read what they need:
the path-star zoos their bag-of-words runs and a reverse-LM companion trained in the same experiment before the run
that reads it, Countdown CoT against MDLM on the same trunk and budget, the facts zoo NTP against the MTP families
on the biographies. (Each run's one-step fit is tests/test_configs.py's comparison test.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import compare
from datamodules import ReasoningDataModule

ZOOS = ["zoo_path_star", "zoo_path_star_g8", "zoo_countdown", "zoo_facts"]


def dry_run(name: str, runs_dir: Path, capsys) -> list[str]:
    assert compare.main([f"configs/experiments/{name}.yaml", "--dry-run", "--runs-dir", str(runs_dir)]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if re.match(r"^# .* seed[0-9]+", line)]


@pytest.mark.parametrize("name", ZOOS)
def test_zoo_dry_runs_its_runs(name, tmp_path, capsys):
    runs = dry_run(name, tmp_path, capsys)
    assert len(runs) >= 3 and all(line.endswith(": new") for line in runs)


@pytest.mark.parametrize("name,path_length", [("zoo_path_star", 5), ("zoo_path_star_g8", 8)])
def test_path_star_zoos_hold_the_summaries_and_train_the_companion_first(name, path_length, tmp_path, capsys):
    assert len([r for r in dry_run(name, tmp_path, capsys) if re.match(r"^# .*(bow|bag).* seed", r)]) >= 3
    experiment = compare.load_experiment(f"configs/experiments/{name}.yaml")
    assert {"ntp", "reverse", "teacherless", "mtp", "mdlm", "ntp_bow", "ntp_bow_tfidf", "ntp_revlm",
            "mtp_bow"} <= set(experiment.runs)
    order = list(experiment.runs)
    companion = experiment.runs["ntp_revlm"].args["model.init_args.summaries.init_args.checkpoint"]
    assert companion == f"runs/{name}/reverse_lm/seed0/checkpoints/last.ckpt"
    # right to left the answer comes before the graph it depends on: the companion learns from every token
    assert experiment.runs["reverse_lm"].args == {"model.init_args.reverse": True, "data.init_args.train_on": "all"}
    assert order.index("reverse_lm") < order.index("ntp_revlm")  # runs train in the listed order
    # the companion's checkpoint exists once its run has trained: the budget is a multiple of the checkpoints
    assert experiment.steps % experiment.checkpoint_every == 0
    base = dict(experiment.args)
    assert base.get("data.init_args.path_length", 5) == path_length


def test_countdown_zoo_compares_cot_and_mdlm_at_equal_budget_on_countdown_4_and_3():
    experiment = compare.load_experiment("configs/experiments/zoo_countdown.yaml")
    runs = experiment.runs
    assert {r.args["data.init_args.num_numbers"] for r in runs.values()} == {3, 4}
    for n in (4, 3):
        cot, mdlm = runs[f"cot{n}"], runs[f"mdlm{n}"]
        data = {k: v for k, v in cot.args.items() if k.startswith("data.")}
        assert data == {k: v for k, v in mdlm.args.items() if k.startswith("data.")}
        # one denoising step per token after the question: the steps, <ans>, the target and <eos>
        dm = ReasoningDataModule(task="countdown", val_size=2, test_size=2,
                                 **{k.rsplit(".", 1)[1]: v for k, v in data.items()})
        item = dm.val_set[0]
        assert mdlm.args["model.init_args.sampling_steps"] == len(item["tokens"]) - item["prompt_len"]
        assert not any(k.startswith(("model.init_args.trunk", "model.init_args.optimizer")) for k in
                       [*cot.args, *mdlm.args])  # the base's trunk and optimizer for both
    assert experiment.steps % experiment.checkpoint_every == 0


def test_facts_zoo_runs_the_mtp_families_on_the_biographies():
    experiment = compare.load_experiment("configs/experiments/zoo_facts.yaml")
    assert experiment.args["data"] == "configs/data/biographies.yaml"
    assert {Path(r.model).name for r in experiment.runs.values()} == {"ntp.yaml", "mtp.yaml", "deepseek_mtp.yaml"}
    assert sorted(r.args.get("model.init_args.n_future") for r in experiment.runs.values()
                  if Path(r.model).name == "mtp.yaml") == [2, 4]
