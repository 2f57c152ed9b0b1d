"""Skeleton-of-Thought: ast extraction, splitting a written skeleton back into points, batched expansion equal to
expanding each point alone, writing a module end to end equal to doing its stages by hand, assembly order,
one-step fit, whole-module windows for the next-token control."""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import torch

from conftest import TINY_MODEL, run_cli
from datamodules.skeleton import SkeletonFormat, extract, split_skeleton, whole_module_windows
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


SPLIT_MODULE = '''import functools


@functools.lru_cache(
    maxsize=None)
def cached(a, b=")"):  # a bracket in a string and one in a comment (
    # a comment before the body

    return a


class Shape:
    class Meta:
        kind = "shape"

    @property
    async def area(self,
                   scale: dict[str, int] = {"(": 1},
                   sep: str = "\\"(",
                   ) -> float:
        return 0.0

    def one(self): return 1
'''


def test_split_skeleton_inverts_extraction():
    """On hand-written modules and a few real ones (on this Python's whole standard library it holds too)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    real = [(stdlib / f"{name}.py").read_text(encoding="utf-8") for name in
            ("argparse", "dataclasses", "typing", "asyncio/tasks", "json/decoder")]
    for source in (MODULE, SPLIT_MODULE, *real):
        skel = extract(source)
        assert split_skeleton(skel.text) == skel.headers
    headers = split_skeleton(extract(SPLIT_MODULE).text)
    assert headers[0] == ('@functools.lru_cache(\n    maxsize=None)\ndef cached(a, b=")"):  # a bracket in a string '
                          'and one in a comment (\n    # a comment before the body\n\n')
    assert [h.strip().splitlines()[-1].strip() for h in headers[1:]] == [
        "class Shape:", "class Meta:", ") -> float:", "def one(self):"]


def test_split_skeleton_drops_what_is_not_a_header():
    written = ("# before any point\nx = 1\n"
               "def f(a):\n    return a\n# note\n"       # a statement dropped, the comment kept with f
               "@deco\nclass A:\n"
               "    def g(self,\n"                       # brackets still open when the next def comes: dropped
               "    def h(self):\n"
               "@dangling\nasync def k(x,")               # cut off by the token budget: dropped, decorator too
    assert split_skeleton(written) == ["def f(a):\n# note\n", "@deco\nclass A:\n", "    def h(self):\n"]
    assert split_skeleton("") == [] and split_skeleton("return 1\n@lonely\n") == []


def byte_format() -> SkeletonFormat:
    return SkeletonFormat(lambda s: list(s.encode()), lambda ids: bytes(ids).decode(errors="replace"),
                          preamble_tokens=64, skeleton_tokens=160)


WRITE_MODULE = '''import os


@register
class Point:
    def norm(self,
             p=2):
        return abs(self)

async def main(x):
    return x + 1
'''


def test_write_equals_expanding_the_models_own_skeleton_point_by_point():
    """A tiny model trained briefly on one module's sequences writes a skeleton; `write` (parallel) gives the same
    skeleton, points and bodies as generating the skeleton, splitting it and generating each point alone."""
    torch.manual_seed(0)
    fmt, eos = byte_format(), 0
    skel = extract(WRITE_MODULE)
    prompt = fmt.skeleton_prompt(skel.preamble)
    head = fmt.skeleton_ids(skel.text)
    rows = [(prompt + head + [eos], len(prompt))] + [
        (p + fmt.encode(b) + [eos], len(p)) for h, b in zip(skel.headers, skel.bodies)
        for p in [fmt.expand_prefix(head) + fmt.point_prompt(h)]]
    T = max(len(r) for r, _ in rows)
    tokens = torch.tensor([r + [eos] * (T - len(r)) for r, _ in rows])
    mask = torch.tensor([[float(p <= t < len(r)) for t in range(T)] for r, p in rows])
    model = SkeletonOfThought(Transformer(d_model=64, n_layers=2, n_heads=2, max_seq_len=256), vocab_size=128,
                              eos_id=eos)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model.logits(model.hidden(tokens[:, :-1]))
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    out = model.generate(torch.tensor([prompt]), fmt.skeleton_tokens)[0, len(prompt):].tolist()
    skeleton_ids = out[:out.index(eos)] if eos in out else out
    headers = split_skeleton(fmt.decode(skeleton_ids))
    bodies = []
    for h in headers:
        p = fmt.expand_prefix(skeleton_ids) + fmt.point_prompt(h)
        body = model.generate(torch.tensor([p]), 40)[0, len(p):].tolist()
        bodies.append(fmt.decode(body[:body.index(eos)] if eos in body else body))

    written = model.write(skel.preamble, fmt, max_body_tokens=40)
    assert written.skeleton == fmt.decode(skeleton_ids)
    assert written.headers == headers and written.bodies == bodies
    assert written.text == SkeletonOfThought.assemble(skel.preamble, headers, bodies)
    assert len(headers) >= 2 and len(set(bodies)) >= 2  # several points with different bodies: a mix-up would show
    assert written == model.write(skel.preamble, fmt, max_body_tokens=40, parallel=False)


def test_whole_module_windows_cover_the_stream_once():
    skels = [extract(MODULE), extract(SPLIT_MODULE)]
    encode = lambda s: list(s.encode())  # noqa: E731
    windows = whole_module_windows(skels, encode, 0, 64)
    stream = [t for s in skels for t in [0] + encode(s.assemble())]
    assert all(p == 0 and len(w) <= 64 for w, p in windows)
    assert windows[0][0][:1] + [t for w, _ in windows for t in w[1:]] == stream  # each token a target once


def test_whole_module_scoring_reads_every_token_once_and_finds_each_body():
    """The quality comparison's scoring (benchmarks/planning.py): windowed NLL equals one full forward where the
    window holds everything, a later window keeps the prompt, and the next-token model's per-body sums cover
    exactly the body's characters."""
    from types import SimpleNamespace

    from benchmarks.planning import ntp_body_nll, token_nll
    torch.manual_seed(0)
    model = SkeletonOfThought(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=1024), vocab_size=128,
                              eos_id=0).eval()

    def nll(context: list[int], target: int) -> float:
        with torch.no_grad():
            logits = model.logits(model.hidden(torch.tensor([context])))[0, -1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target)))

    ids = torch.randint(1, 128, (100,)).tolist()
    full = [nll([0] + ids[:j], ids[j]) for j in range(len(ids))]
    for keep in (True, False):
        assert torch.allclose(torch.tensor(token_nll(model, [0], ids, 1024, keep_prompt=keep)), torch.tensor(full),
                              atol=1e-4)
    windowed = token_nll(model, [7, 8], ids, 40)  # room 38: windows score ids [0, 38), [38, 57), [57, 76), ...
    assert len(windowed) == len(ids)
    assert abs(windowed[60] - nll([7, 8] + ids[76 - 38:60], ids[60])) < 1e-4

    text = extract(MODULE).assemble()
    tokenizer = SimpleNamespace(encode=lambda s: SimpleNamespace(ids=list(s.encode()),
                                                                 offsets=[(i, i + 1) for i in range(len(s))]))
    skel = extract(MODULE)
    per_char = token_nll(model, [0], list(text.encode()), 1024, keep_prompt=False)
    at = len(skel.preamble)
    for header, body, got in zip(skel.headers, skel.bodies,
                                 ntp_body_nll(model, SimpleNamespace(tokenizer=tokenizer, eos_id=0), skel, 1024)):
        at += len(header)
        assert got[1:] == (len(body), len(body)) and abs(got[0] - sum(per_char[at:at + len(body)])) < 1e-3
        at += len(body)
