"""generate.py loads a checkpoint written by train.py (tokenizer included) and decodes, plain or speculative."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, quickstart, run_cli


def test_generate_from_a_trained_mtp_checkpoint(tmp_path, corpus_files):
    cli = run_cli(tmp_path, *quickstart(corpus_files, "--model", "configs/objectives/mtp.yaml"), steps=2)
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"

    def generate(*flags: str) -> str:
        done = subprocess.run([sys.executable, "generate.py", "--ckpt_path", str(ckpt), "--prompt", "def f(x):",
                               "--max_new_tokens", "12", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    plain, fast = generate(), generate("--speculative", "true")
    assert plain.startswith("def f(x):") and "tokens/s" in plain
    assert "mean accepted length" in fast
    assert plain.split("\n[")[0] == fast.split("\n[")[0]  # the same text
    assert "mean accepted length" in generate("--speculative", "true", "--drafter", "lookup")
