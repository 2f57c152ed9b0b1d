"""The Lightning CLI end to end: configs, logging, checkpoints, resume and the errors bad input gets."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MODEL, quickstart, run_cli, scalars, tiny_data
from objectives.training import metrics as M


def test_quickstart_fit_logs_shared_metrics_to_tensorboard(tmp_path, corpus_files):
    cli = run_cli(tmp_path, *quickstart(corpus_files), steps=12)
    tags = scalars(tmp_path)
    for tag in (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_NTP_LOSS, M.VAL_BPB, M.TOKENS_PER_SEC, M.HP_METRIC):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    # bits per byte: the counted tokens' nats over their bytes (exactly: tests/test_defects.py); a token is 1-8 bytes
    assert tags[M.VAL_NTP_LOSS][-1] / math.log(2) / 8 < tags[M.VAL_BPB][-1] < tags[M.VAL_NTP_LOSS][-1] / math.log(2)
    assert cli.model.vocab_size == cli.datamodule.vocab_size  # linked by the CLI
    assert (Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt").exists()


def test_print_config_round_trips(tmp_path, corpus_files, capsys):
    with pytest.raises(SystemExit):
        run_cli(tmp_path, *quickstart(corpus_files), "--print_config")
    printed = capsys.readouterr().out
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert yaml.safe_load(printed)["model"]["class_path"] == "objectives.NextTokenPrediction"
    cli = run_cli(tmp_path / "again", "--config", str(config), steps=1)
    assert cli.trainer.global_step == 1


def test_unknown_class_name_lists_the_choices(tmp_path, corpus_files, capsys):
    with pytest.raises(SystemExit):
        run_cli(tmp_path, *quickstart(corpus_files), "--model", "objectives.NoSuchObjective")
    err = capsys.readouterr().err
    assert "NoSuchObjective" in err and "NextTokenPrediction" in err


def test_sequence_longer_than_the_trunk_is_refused(tmp_path, corpus_files):
    with pytest.raises(ValueError, match=r"seq_len 64 is longer than the trunk's max_seq_len 32"):
        run_cli(tmp_path, *quickstart(corpus_files), "--model.init_args.trunk.init_args.max_seq_len", "32",
                "--data.init_args.seq_len", "64")


def test_resume_continues_at_the_same_step_with_the_optimizer_state(tmp_path, corpus_files):
    first = run_cli(tmp_path, *quickstart(corpus_files), steps=3)
    last = Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 3 and saved["optimizer_states"][0]["state"]
    resumed = run_cli(tmp_path / "resumed", *quickstart(corpus_files), "--ckpt_path", str(last), steps=5)
    assert resumed.trainer.global_step == 5
    # the optimizer's step counter carried on from the checkpoint instead of restarting at zero
    state = next(iter(resumed.trainer.optimizers[0].state.values()))
    assert int(state["step"]) == 5


def test_checkpoint_of_another_vocabulary_names_both_sizes(tmp_path, corpus_files):
    first = run_cli(tmp_path, *quickstart(corpus_files), steps=1)
    last = Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    with pytest.raises(ValueError, match=r"512 tokens.*300"):
        run_cli(tmp_path / "other", *quickstart(corpus_files), "--data.init_args.bpe_vocab_size", "300",
                "--ckpt_path", str(last), steps=2)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus_files, monkeypatch):
    from objectives.ntp import NextTokenPrediction
    real_loss = NextTokenPrediction.loss

    def loss_that_breaks_at_step_3(self, batch):
        out = real_loss(self, batch)
        if self.training and self.global_step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(NextTokenPrediction, "loss", loss_that_breaks_at_step_3)
    every_step = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true"]
    with pytest.raises(FloatingPointError, match="at step 3"):
        run_cli(tmp_path, *quickstart(corpus_files), *every_step, steps=6)
    kept = sorted(tmp_path.rglob("last*.ckpt"))
    assert kept, "no checkpoint kept"
    good = torch.load(kept[-1], weights_only=False)
    assert good["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_missing_and_empty_data_paths_are_named(tmp_path, corpus_files):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data([missing]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL, *tiny_data([str(empty)]))


def shell(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=120)


def test_a_users_mistake_prints_its_message_alone(tmp_path, capsys):
    """A missing or corrupted checkpoint and a bad class path: the message and one line of help, no traceback and
    no usage text (BEYOND_NTP_TRACEBACK=1 shows them). The first from the shell, the others through the same entry
    point in this process (a process of its own takes seconds to start)."""
    from lab.cli import main, run_from_the_shell
    corrupted = tmp_path / "corrupted.ckpt"
    corrupted.write_bytes(b"PK\x03\x04 not a zip file")
    for i, (flags, message) in enumerate((
            (["--ckpt_path", str(tmp_path / "missing.ckpt")], "missing.ckpt does not exist"),
            (["--ckpt_path", str(corrupted)], "corrupted.ckpt cannot be read"),
            (["--model", "objectives.NoSuchObjective"], "NoSuchObjective"))):
        args = ["fit", "--config", "configs/quickstart.yaml", *flags]
        if i == 0:
            done = shell(*args)
            code, stderr = done.returncode, done.stderr
        else:
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_:
                run_from_the_shell(lambda: main(args))
            code, stderr = exit_.value.code, capsys.readouterr().err
        assert code != 0 and message in stderr, stderr[-2000:]
        assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-2000:]
        assert len(stderr.strip().splitlines()) <= 16, stderr  # the class path error lists the choices


def test_a_run_is_named_after_what_it_is_and_a_short_fit_ends_validated(tmp_path, corpus_files, capsys):
    """3 steps under a validation interval of 100: the fit is validated once at its end, prints its final
    figures, logs no NaN placeholder for val/bpb, and logs under quickstart/<data>-<objective>-<trunk>."""
    cli = run_cli(tmp_path, *quickstart(corpus_files), "--model", "configs/objectives/mtp.yaml", *TINY_MODEL,
                  "--trainer.val_check_interval", "100", steps=3)
    assert Path(cli.trainer.log_dir) == tmp_path / "quickstart" / "files-MultiTokenPrediction-Transformer" / "version_0"
    assert cli.model.validated_at_step == 3
    tags = scalars(tmp_path)
    assert len(tags[M.VAL_LOSS]) == 1 and all(math.isfinite(v) for v in tags[M.VAL_BPB]), tags.get(M.VAL_BPB)
    assert "final (step 3): val/loss" in capsys.readouterr().out
    named = run_cli(tmp_path / "named", *quickstart(corpus_files), "--trainer.logger.init_args.name", "mine", steps=1)
    assert Path(named.trainer.log_dir) == tmp_path / "named" / "mine" / "version_0"  # a name given is kept


def test_reasoning_data_logs_no_bits_per_byte_and_prints_its_accuracy(tmp_path, capsys):
    run_cli(tmp_path, "--config", "configs/quickstart.yaml", *TINY_MODEL, "--data", "configs/data/path_star.yaml",
            "--data.init_args.train_size", "64", "--data.init_args.val_size", "16", "--data.init_args.test_size", "16",
            "--data.init_args.batch_size", "4", "--model.init_args.eval_examples", "4", steps=2)
    assert M.VAL_BPB not in scalars(tmp_path)  # a word-level vocabulary: bytes per token are undefined
    assert "val/accuracy" in capsys.readouterr().out.split("final (step 2):")[1]


def test_fsdp_on_cpu_names_the_fix(tmp_path, corpus_files):
    with pytest.raises(ValueError, match="FSDP runs on GPUs only.*ddp"):
        run_cli(tmp_path, *quickstart(corpus_files), "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu")
