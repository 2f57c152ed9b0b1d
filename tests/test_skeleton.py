"""Skeleton-of-Thought: ast extraction, batched expansion equal to expanding each point alone, assembly order,
one-step fit."""
from __future__ import annotations

import ast
import json

import torch

from conftest import TINY_MODEL, run_cli
from datamodules.skeleton import extract
from models import Transformer
from objectives import SkeletonOfThought

MODULE = '''"""Doc."""
import os


@decorator
@other(1)
class Outer(Base):
    """Outer doc."""
    x = 1

    class Inner:
        def one(self): return 1

        @staticmethod
        async def two(a,
                      b):
            await a
            return b

    def doc_only(self):
        """Only a docstring."""


async def top(x):
    y = x + 1
    return y
'''


def test_extraction_of_nested_classes_decorators_async_one_line_and_docstring_bodies():
    skel = extract(MODULE)
    assert skel.preamble == '"""Doc."""\nimport os\n\n\n'
    assert skel.headers == [
        "@decorator\n@other(1)\nclass Outer(Base):\n",
        "    class Inner:\n",
        "        def one(self):\n",
        "        @staticmethod\n        async def two(a,\n                      b):\n",
        "    def doc_only(self):\n",
        "async def top(x):\n",
    ]
    assert skel.bodies == ['    """Outer doc."""\n    x = 1\n', "", "            return 1\n",
                           "            await a\n            return b\n", '        """Only a docstring."""\n',
                           "    y = x + 1\n    return y\n"]
    rebuilt = skel.assemble()
    assert ast.dump(ast.parse(rebuilt)) == ast.dump(ast.parse(MODULE.replace("def one(self): return 1",
                                                                            "def one(self):\n            return 1")))


def test_batched_expansion_equals_each_point_alone_and_assembles_in_order():
    torch.manual_seed(0)
    model = SkeletonOfThought(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=128), vocab_size=50, eos_id=1)
    model.eval()
    prefix = [5, 6, 7, 8, 9, 10]
    headers = [[11], [12, 13, 14], [15, 16], [17, 18, 19, 20, 21]]  # ragged
    parallel = model.expand(prefix, headers, 12, parallel=True)
    sequential = model.expand(prefix, headers, 12, parallel=False)
    assert parallel == sequential
    assert len({tuple(b) for b in parallel}) > 1  # the points differ, so a mixed-up row would show
    text = SkeletonOfThought.assemble("P\n", ["a:\n", "b:\n"], ["  x\n", "  y"])
    assert text == "P\na:\n  x\nb:\n  y\n"


def test_skeleton_fits_a_step(tmp_path, corpus_files):
    cli = run_cli(tmp_path, "--config", "configs/quickstart.yaml", "--model", "configs/objectives/skeleton.yaml",
                  *TINY_MODEL, "--data", "configs/data/code_skeleton.yaml", "--data.init_args.source", "files",
                  "--data.init_args.data_files", json.dumps(corpus_files), "--data.init_args.bpe_vocab_size", "512",
                  "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
                  "--data.init_args.max_files", "4", "--data.init_args.val_fraction", "0.1", steps=1)
    assert cli.trainer.global_step == 1
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["loss_mask"].sum() > 0 and (batch["loss_mask"][:, 0] == 0).all()  # prompts are not targets
