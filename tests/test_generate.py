"""generate.py loads a checkpoint written by train.py (tokenizer included) and decodes, plain or speculative, with
train.py's command-line conventions (jsonargparse: --config, --print_config, typed flags, --help)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, quickstart, run_cli


def test_generate_from_a_trained_mtp_checkpoint(tmp_path, corpus_files, capsys):
    cli = run_cli(tmp_path, *quickstart(corpus_files, "--model", "configs/objectives/mtp.yaml"), steps=2)
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    import generate as generate_script

    def generate(*flags: str) -> tuple[str, str]:  # in this process (a process of its own starts in seconds)
        capsys.readouterr()
        generate_script.main(["--ckpt_path", str(ckpt), "--prompt", "def f(x):", "--max_new_tokens", "12", *flags])
        captured = capsys.readouterr()
        return captured.out, captured.err

    # plain decoding as a user runs it, from the shell
    shell = subprocess.run([sys.executable, "generate.py", "--ckpt_path", str(ckpt), "--prompt", "def f(x):",
                            "--max_new_tokens", "12"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0, shell.stderr[-2000:]
    plain, fast = generate(), generate("--speculative", "true")
    assert plain[0] == shell.stdout and shell.stdout.startswith("def f(x):") and "tokens/s" in shell.stderr
    assert "mean accepted length" in fast[1]
    assert plain[0] == fast[0]  # the same text, and nothing else on stdout
    assert "mean accepted length" in generate("--speculative", "true", "--drafter", "lookup")[1]
    # --print_config writes a config that --config reads back to the same output
    config = tmp_path / "generate.yaml"
    with pytest.raises(SystemExit):
        generate("--print_config")
    config.write_text(capsys.readouterr().out)
    capsys.readouterr()
    generate_script.main(["--config", str(config)])
    assert capsys.readouterr().out == plain[0]


def test_generate_flags_are_typed_and_documented(capsys):
    import pytest

    import generate
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    help_text = capsys.readouterr().out
    assert "--config" in help_text and "--print_config" in help_text and "tokens to generate" in help_text
    with pytest.raises(SystemExit):
        generate.main(["--ckpt_path", "x.ckpt", "--max_new_tokens", "many"])
    assert "max_new_tokens" in capsys.readouterr().err


def test_greedy_token_takes_the_first_maximum_of_bf16_logits_as_argmax_does():
    """greedy_token casts to fp32 before its argmax (faster on a CPU): bf16 values are exact in fp32, so the index,
    ties included (the first maximum), is the bf16 argmax's."""
    import torch

    from objectives.decoding.greedy import greedy_token
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 6, (4, 3, 64), generator=g) * 0.125 + 10.0).bfloat16()  # many ties at the top
    assert torch.equal(greedy_token(logits), logits.argmax(-1))
    assert torch.equal(greedy_token(logits, keepdim=True), logits.argmax(-1, keepdim=True))
    near = torch.tensor([[10.0, 10.0625, 10.0625, 9.0]]).bfloat16()  # neighbours one bf16 step apart
    assert greedy_token(near).tolist() == [1]
