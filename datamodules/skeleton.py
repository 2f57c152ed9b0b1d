"""The code corpus as (skeleton, points) pairs for a trainable Skeleton-of-Thought (Ning et al. 2023,
"Skeleton-of-Thought: Prompting LLMs for Efficient Parallel Generation", arXiv:2307.15337).

With Python's `ast`, a module's skeleton is its class and def signature lines (decorators included, indentation
kept) in source order; each def's body, and each class's own statements (its nested defs are skeleton lines of
their own), is a point. One model learns two tasks, told apart by a marker at the start of the sequence:

    <|skeleton|> preamble <|body|> skeleton lines <eos>                  (write the skeleton)
    <|expand|> skeleton <|point|> signature line(s) of point i <|body|> body i <eos>   (expand one point)

The preamble is the module's text before its first def or class (cut to `preamble_tokens`). Only the text after
`<|body|>` is a training target. Sequences are cut to `seq_len` tokens. The tokenizer, splits and cache are the
text datamodule's (`TextDataModule`).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.text import TextDataModule

SKELETON, EXPAND, POINT, BODY = "<|skeleton|>", "<|expand|>", "<|point|>", "<|body|>"


@dataclass
class Skeleton:
    preamble: str
    headers: list[str]  # per point, its signature line(s) with decorators and indentation, ending in a newline
    bodies: list[str]   # per point, its body lines (indented), ending in a newline; "" where a class has none

    @property
    def text(self) -> str:
        return "".join(self.headers)

    def assemble(self, bodies: list[str] | None = None) -> str:
        """The module rebuilt in skeleton order: preamble, then each signature followed by its body."""
        bodies = self.bodies if bodies is None else bodies
        return self.preamble + "".join(h + b for h, b in zip(self.headers, bodies))


def _start(node) -> int:
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def extract(source: str) -> Skeleton:
    """The skeleton and points of a module's source (a SyntaxError propagates)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in lines]
    headers: list[str] = []
    bodies: list[str] = []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    def visit(node) -> None:
        first = node.body[0]
        start = _start(node) - 1
        line = lines[first.lineno - 1]
        if line[:first.col_offset].strip():  # a one-line def: the signature and the body share a line
            indent = " " * (node.col_offset + 4)
            headers.append("".join(lines[start:first.lineno - 1]) + line[:first.col_offset].rstrip() + "\n")
            bodies.append(indent + line[first.col_offset:].lstrip() + "".join(lines[first.lineno:node.end_lineno]))
            return
        headers.append("".join(lines[start:_body_start(node) - 1]))
        if isinstance(node, ast.ClassDef):
            own = [s for s in node.body if not isinstance(s, defs)]
            bodies.append("".join("".join(lines[_start_any(s) - 1:s.end_lineno]) for s in own))
            for s in node.body:
                if isinstance(s, defs):
                    visit(s)
        else:
            bodies.append("".join(lines[_body_start(node) - 1:node.end_lineno]))

    top = [n for n in tree.body if isinstance(n, defs)]
    preamble = "".join(lines[:_start(top[0]) - 1]) if top else source
    rest = [n for n in tree.body if not isinstance(n, defs)]
    for node in top:
        visit(node)
    if top and rest and any(n.lineno > top[0].lineno for n in rest):
        # module-level statements after the first def go to the preamble's end: they are not points
        preamble += "".join("".join(lines[_start_any(n) - 1:n.end_lineno]) for n in rest if n.lineno > top[0].lineno)
    return Skeleton(preamble, headers, bodies)


def _start_any(node) -> int:
    return _start(node) if hasattr(node, "decorator_list") else node.lineno


def _body_start(node) -> int:
    return _start_any(node.body[0])


def encode_examples(skel: Skeleton, encode, eos_id: int, seq_len: int, preamble_tokens: int = 64,
                    skeleton_tokens: int | None = None) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) of the skeleton example and of each point's expansion example."""
    skeleton_tokens = skeleton_tokens or seq_len // 2
    head = encode(skel.text)[:skeleton_tokens]
    prompt = encode(SKELETON) + encode(skel.preamble)[:preamble_tokens] + encode(BODY)
    out = [((prompt + head + [eos_id])[:seq_len], len(prompt))]
    context = encode(EXPAND) + head + encode(POINT)
    for header, body in zip(skel.headers, skel.bodies):
        p = context + encode(header) + encode(BODY)
        if len(p) < seq_len:
            out.append(((p + encode(body) + [eos_id])[:seq_len], len(p)))
    return out


class SkeletonDataset(Dataset):
    def __init__(self, examples: list[tuple[list[int], int]]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def collate(items, pad_id: int) -> dict[str, torch.Tensor]:
    B, T = len(items), max(len(t) for t, _ in items)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T)
    for b, (t, p) in enumerate(items):
        tokens[b, :len(t)] = torch.tensor(t)
        loss_mask[b, p:len(t)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


class _Collate:  # picklable for worker processes
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate(items, self.pad_id)


class SkeletonDataModule(TextDataModule):
    """(skeleton, points) sequences of a code corpus (`TextDataModule`'s sources, tokenizer and document split).

    Args:
        max_files: modules per split turned into examples (0: all); modules `ast` cannot parse are skipped.
        preamble_tokens: tokens of the module's preamble in the skeleton prompt.
        **kwargs: the text datamodule's arguments (seq_len cuts every sequence).
    """

    def __init__(self, *args, max_files: int = 200, preamble_tokens: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self._splits: dict[str, list[Skeleton]] = {}

    def modules(self, split: str) -> list[Skeleton]:
        """The parsed modules of a split (the text datamodule's document split)."""
        if split not in self._splits:
            h = self.hparams
            out: list[Skeleton] = []
            for text in self._load_texts()[split]["text"]:
                try:
                    skel = extract(text)
                except (SyntaxError, ValueError):
                    continue
                if skel.headers:
                    out.append(skel)
                if h.max_files and len(out) >= h.max_files:
                    break
            if not out:
                raise ValueError(f"no parsable Python module with a def or class in the {split} split: "
                                 f"give Python sources (data.init_args.data_files)")
            self._splits[split] = out
        return self._splits[split]

    def _dataset(self, split: str) -> SkeletonDataset:
        h = self.hparams
        examples = [e for skel in self.modules(split)
                    for e in encode_examples(skel, self.encode, self.eos_id, h.seq_len, h.preamble_tokens)]
        return SkeletonDataset(examples)

    def _skeleton_loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self._dataset(split), batch_size=self.hparams.batch_size, shuffle=shuffle,
                          collate_fn=_Collate(self.eos_id), num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._skeleton_loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._skeleton_loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._skeleton_loader("test", False)
