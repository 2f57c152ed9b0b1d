"""Every YAML under configs/ parses and instantiates; every model, objective and data config fits a step."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_MODEL, quickstart, run_cli, tiny_data

CONFIGS = ROOT / "configs"


def names(folder: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (CONFIGS / folder).glob("*.yaml"))


def build(config: str):
    spec = yaml.safe_load(open(config))
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


# configs/models/hf.yaml names a Hugging Face model by path or hub id, a placeholder here: tests/test_hf.py builds
# tiny models locally and fits HFTrunk on them
@pytest.mark.parametrize("config", [c for c in names("models") if not c.endswith("/hf.yaml")])
def test_model_config_fits_a_step(config, tmp_path, corpus_files):
    # the shipped shape instantiates; the fit step runs one layer of it so that the suite stays fast
    trunk = build(config)
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *tiny_data(corpus_files),
                  "--model.init_args.trunk", config, "--model.init_args.trunk.init_args.n_layers", "1",
                  "--data.init_args.batch_size", "2", steps=1)
    assert cli.trainer.global_step == 1
    assert type(cli.model.trunk) is type(trunk) and cli.model.trunk.d_model == trunk.d_model


def test_gpt2_shape_has_gpt2_parameter_count():
    from models import Transformer
    trunk = build("configs/models/gpt2-124m.yaml")
    assert isinstance(trunk, Transformer)
    embedding = 50257 * 768
    total = sum(p.numel() for p in trunk.parameters()) + embedding
    assert 120e6 < total < 130e6  # GPT-2 small: 124M with its 50257-token tied embedding


@pytest.mark.parametrize("config", names("objectives"))
def test_objective_config_fits_a_step(config, tmp_path, corpus_files):
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--model", config, *TINY_MODEL,
                  *tiny_data(corpus_files), steps=1)
    assert cli.trainer.global_step == 1
    assert cli.model.__class__.__name__ == yaml.safe_load(open(config))["class_path"].rsplit(".", 1)[1]


@pytest.mark.parametrize("config", names("data"))
def test_data_config_fits_a_step(config, tmp_path, corpus_files):
    """Every data config fits a step of next-token prediction; on a reasoning task (smoke test of the scoring) the
    validation scores two questions, none of which a model one step from random init answers (a figure above 0 is
    a scorer that accepts wrong answers)."""
    data = yaml.safe_load(open(config))
    # the skeleton data reads four modules of the test corpus: the built-in corpus it shares with stdlib_code.yaml
    # (tokenized once a session, about 15 s) is fitted there
    fewer = ([*tiny_data(corpus_files), "--data.init_args.max_files", "4"]
             if data["class_path"].endswith("SkeletonDataModule") else [])
    reasoning = small_generated_data(data)
    if reasoning:
        reasoning += ["--model.init_args.eval_examples", "2"]
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL, "--data", config,
                  "--model.init_args.trunk.init_args.max_seq_len", "512", "--data.init_args.batch_size", "2", *fewer,
                  *reasoning, steps=1)
    assert cli.trainer.global_step == 1
    if reasoning:
        assert cli.model.scorer.scored == 2 and float(cli.trainer.callback_metrics["val/accuracy"]) == 0.0


@pytest.mark.parametrize("config", names("strategies"))
def test_strategy_config_instantiates(config):
    strategy = build(config)
    assert type(strategy).__name__ == yaml.safe_load(open(config))["class_path"].rsplit(".", 1)[1]


def tiny_model_for(config: str) -> list[str]:
    """TINY_MODEL without n_heads where the experiment's trunk has no attention heads (the state-space trunks)."""
    trunk = yaml.safe_load(open(config))["model"]["init_args"]["trunk"]["class_path"]
    if trunk.endswith("Transformer"):
        return TINY_MODEL
    i = TINY_MODEL.index("--model.init_args.trunk.init_args.n_heads")
    return TINY_MODEL[:i] + TINY_MODEL[i + 2:]


def comparison_experiment(config: str) -> bool:
    """An experiment file for compare.py (a `runs:` mapping) rather than a train.py config."""
    return "runs" in (yaml.safe_load(open(config)) or {})


# experiments that read a frozen companion's checkpoint: the experiment that trains it, and the flag that names it
SUMMARY_CHECKPOINT = "--model.init_args.summaries.init_args.checkpoint"
KMEANS_CHECKPOINT = "--model.init_args.kmeans_from"  # a chain-of-thought run's: any PlanningTokens run of the data
COMPANIONS = {"fsp_revlm_code.yaml": ("reverse_lm_code.yaml", SUMMARY_CHECKPOINT),
              "path_star_fsp_revlm.yaml": ("path_star_reverse_lm.yaml", SUMMARY_CHECKPOINT),
              "ladir_prosqa.yaml": ("ladir_vae_prosqa.yaml", "--model.init_args.vae_from"),
              "ladir_countdown.yaml": ("ladir_vae_countdown.yaml", "--model.init_args.vae_from"),
              "planning_multiplication_kmeans.yaml": ("planning_multiplication_rule.yaml", KMEANS_CHECKPOINT),
              "planning_prosqa_kmeans.yaml": ("planning_prosqa_rule.yaml", KMEANS_CHECKPOINT)}


def companion_flags(config: str, tmp_path) -> list[str]:
    """For an experiment with a companion: train the companion for a step and point the experiment at its checkpoint."""
    if Path(config).name not in COMPANIONS:
        return []
    name, flag = COMPANIONS[Path(config).name]
    companion = str(CONFIGS / "experiments" / name)
    run_cli(tmp_path / "companion", "--config", companion, *tiny_model_for(companion),
            *small_generated_data(experiment_data(companion)),
            "--model.init_args.trunk.init_args.max_seq_len", "512", steps=1)
    return [flag, str(next((tmp_path / "companion").rglob("last.ckpt")))]


def experiment_data(config: str) -> dict:
    return (yaml.safe_load(open(config)) or {}).get("data") or {}


def small_generated_data(data: dict) -> list[str]:
    """Sizes for a generated reasoning task (`data`: a data config's class_path and init_args), so that a one-step
    fit does not first draw the recipe's whole train set (17886 ProsQA questions take about a minute)."""
    generated = data.get("class_path", "").endswith("ReasoningDataModule") and data["init_args"].get("task") != "file"
    if not generated:
        return []
    return ["--data.init_args.train_size", "64", "--data.init_args.val_size", "16", "--data.init_args.test_size", "16"]


@pytest.mark.parametrize("config", [c for c in names("experiments") if not comparison_experiment(c)])
def test_experiment_config_fits_a_step(config, tmp_path):
    cli = run_cli(tmp_path, "--config", config, *tiny_model_for(config), *small_generated_data(experiment_data(config)),
                  "--model.init_args.trunk.init_args.max_seq_len", "512", *companion_flags(config, tmp_path), steps=1)
    assert cli.trainer.global_step == 1


def test_base_and_quickstart_parse(tmp_path, corpus_files):
    cli = run_cli(tmp_path, *quickstart(corpus_files), steps=1)
    assert cli.trainer.max_steps == 1 and cli.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("objective", names("objectives"))
def test_every_objective_fits_a_step_and_scores_answers_on_reasoning_data(objective, tmp_path):
    """Smoke test: every objective fits a step on ProsQA-style questions (prompt, steps and answer segments) and
    logs val/accuracy over its eval_examples questions, none of which a model one step from random init answers
    (a figure above 0 is a scorer that accepts wrong answers). One dataset is enough here: each reasoning data
    config fits a step and scores answers with next-token prediction in test_data_config_fits_a_step, and the
    experiment configs put the families on their own tasks."""
    data = "configs/data/prosqa.yaml"
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--model", objective, *TINY_MODEL, "--data", data,
                  "--model.init_args.trunk.init_args.max_seq_len", "512", "--model.init_args.eval_examples", "2",
                  "--data.init_args.batch_size", "2", *small_generated_data(yaml.safe_load(open(data))), steps=1)
    assert cli.trainer.global_step == 1
    assert cli.model.scorer.scored == 2 and float(cli.trainer.callback_metrics["val/accuracy"]) == 0.0


def comparison_runs() -> list[tuple[str, str]]:
    import compare
    return [(c, run) for c in names("experiments") if comparison_experiment(c)
            for run in compare.load_experiment(c).runs]


@pytest.mark.parametrize("config,run", comparison_runs())
def test_comparison_experiment_run_fits_a_step(config, run, tmp_path, corpus_files):
    """Each run of a compare.py experiment, built as compare.py builds it, fits a step with one trunk layer."""
    import compare
    import train
    experiment = compare.load_experiment(config)
    spec = experiment.runs[run]
    sources = [yaml.safe_load(open(c)) or {} for c in experiment.configs + spec.configs]
    data = next((s["data"] for s in reversed(sources) if s.get("data")), {})
    for swapped in (experiment.args.get("data"), spec.data):
        data = yaml.safe_load(open(swapped)) if swapped else data
    if data["class_path"].endswith("TextDataModule"):
        small = tiny_data(corpus_files)
    elif data["class_path"].endswith(("SyntheticDataModule", "MQARDataModule")):  # drawn per item: sizes only
        small = ["--data.init_args.batch_size", "2", "--data.init_args.val_examples", "8",
                 "--data.init_args.test_examples", "8"]
    else:  # a few held-out questions: drawing the full ProsQA val and test sets costs 10 s a run
        small = ["--data.init_args.train_size", "256", "--data.init_args.batch_size", "2",
                 "--data.init_args.val_size", "8", "--data.init_args.test_size", "8"]
    one_step = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                "--trainer.enable_model_summary", "false", "--model.init_args.trunk.init_args.n_layers", "1",
                "--model.init_args.eval_examples", "2", "--model.init_args.sample_tokens", "4", *small]
    # a run that reads another run's checkpoint, runs/<experiment>/<run>/seed<k>/checkpoints/last.ckpt (the k-means
    # arm the cot run's states, a reverse-LM summary its companion run): that run first, a step
    for flag, value in [(f, v) for f, v in spec.args.items() if isinstance(v, str) and v.endswith(".ckpt")]:
        other = Path(value).parts[-4]
        first = train.main([*compare.train_command(tmp_path / other, experiment, other, seed=0)[2:], *one_step])
        first.trainer.save_checkpoint(tmp_path / f"{other}.ckpt")
        one_step += [f"--{flag}", str(tmp_path / f"{other}.ckpt")]
    argv = compare.train_command(tmp_path, experiment, run, seed=0)[2:]  # what follows `python train.py`
    cli = train.main([*argv, *one_step])
    assert cli.trainer.global_step == 1
    assert cli.model.__class__.__name__ == yaml.safe_load(open(spec.model))["class_path"].rsplit(".", 1)[1]
