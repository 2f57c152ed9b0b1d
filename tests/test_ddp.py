"""Real multi-process data parallelism: two CPU processes over gloo, launched by the CLI as a user would."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, tiny_data


def fit_on_two_processes(tmp_path, *flags: str) -> list[dict]:
    """train.py fit on two CPU processes over gloo for 3 steps (the quickstart config and `flags`, launched as a
    user would); each rank's final state dict, step and world size."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", *flags, *TINY_MODEL,
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "configs/strategies/ddp.yaml",
           "--trainer.precision", "32-true", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
           "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.callbacks+=ddp_helpers.SaveRankWeights", f"--trainer.callbacks.folder={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    return ranks


def assert_same_weights(ranks: list[dict]) -> None:
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs between ranks"


# one objective per way of computing gradients (every objective shares the training step): MTP's per-head backward
# (an autograd function that hands DDP one ordinary backward), DeepSeek's sequential modules, a diffusion loss over
# a bidirectional trunk; LaDiR's frozen VAE below
@pytest.mark.parametrize("objective", ["mtp", "deepseek_mtp", "mdlm"])
def test_ddp_on_two_cpu_processes_ends_with_identical_weights(objective, tmp_path, corpus_files):
    ranks = fit_on_two_processes(tmp_path, *tiny_data(corpus_files), "--model", f"configs/objectives/{objective}.yaml")
    # each rank drew different windows (distributed sampler); only synchronised gradients keep them equal
    assert_same_weights(ranks)


def test_the_fsdp_config_makes_each_block_of_every_trunk_its_own_shard_unit():
    # FSDP needs an accelerator, so on CPU the check is on the strategy the config builds: its wrap policy picks
    # exactly the trunk's blocks (Lightning wraps each picked module in its own FSDP unit, the root in another)
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from models import Mamba, Mamba2, Transformer
    from objectives import NextTokenPrediction
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = parser.parse_object({"strategy": yaml.safe_load((ROOT / "configs/strategies/fsdp.yaml").read_text())})
    strategy = parser.instantiate(config).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    for trunk in (Transformer(d_model=16, n_layers=2, n_heads=2, max_seq_len=16), Mamba(d_model=16, n_layers=2),
                  Mamba2(d_model=16, n_layers=2, d_state=8, headdim=8)):
        model = NextTokenPrediction(trunk, vocab_size=11)
        picked = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
        assert picked == list(trunk.blocks), type(trunk).__name__


def test_ladir_on_a_frozen_vae_under_ddp_ends_with_identical_weights_and_one_latent_scale(tmp_path):
    from conftest import run_cli
    # stage 1 in its own fit, as under DDP the stages are two fits; stage 2 reads it as a frozen companion
    run_cli(tmp_path / "vae", "--config", "configs/quickstart.yaml", "--model", "configs/objectives/ladir.yaml",
            *TINY_MODEL, "--data", "configs/data/countdown.yaml", "--data.init_args.batch_size", "4",
            "--model.init_args.eval_examples", "1", steps=2)
    vae = str(next((tmp_path / "vae").rglob("last.ckpt")))
    ranks = fit_on_two_processes(tmp_path, "--model", "configs/objectives/ladir.yaml", "--model.init_args.vae_from", vae,
                                 "--model.init_args.eval_examples", "2", "--data", "configs/data/countdown.yaml",
                                 "--data.init_args.batch_size", "4", "--data.init_args.val_size", "8")
    assert float(ranks[0]["state"]["latent_scale"]) > 0  # set from the first batches of both ranks, averaged
    assert_same_weights(ranks)
