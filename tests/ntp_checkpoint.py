"""One tiny next-token checkpoint per test session, shared by the tests that start from one (warm start, frozen
companions, the retrofit): train.py with the quickstart config and a tiny model, 3 steps."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from conftest import quickstart, run_cli


@functools.cache
def ntp_checkpoint(corpus_files: tuple[str, ...]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ntp_checkpoint_"))
    cli = run_cli(folder, *quickstart(list(corpus_files)), steps=3)
    return Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
