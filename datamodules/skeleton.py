"""The code corpus as (skeleton, points) pairs for a trainable Skeleton-of-Thought (Ning et al. 2023,
"Skeleton-of-Thought: Prompting LLMs for Efficient Parallel Generation", arXiv:2307.15337).

With Python's `ast`, a module's skeleton is its class and def signature lines (decorators included, indentation
kept) in source order; each def's body, and each class's own statements (its nested defs are skeleton lines of
their own), is a point. One model learns two tasks, told apart by a marker at the start of the sequence:

    <|skeleton|> preamble <|body|> skeleton lines <eos>                  (write the skeleton)
    <|expand|> skeleton <|point|> signature line(s) of point i <|body|> body i <eos>   (expand one point)

The preamble is the module's text before its first def or class (cut to `preamble_tokens`). Only the text after
`<|body|>` is a training target. Sequences are cut to `seq_len` tokens. The tokenizer, splits and cache are the
text datamodule's (`TextDataModule`); the markers are plain text to its byte-level BPE, not added tokens.
`SkeletonFormat` writes both kinds of prompt, for training and for generation alike (`SkeletonOfThought.write`
writes a skeleton, splits it with `split_skeleton` and expands each point). With `whole_modules` the same modules
are served whole instead, as next-token windows: the plain next-token control that SoT's quality is measured
against (benchmarks/planning.py).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable

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


_SIGNATURE = re.compile(r"(async\s+def|def|class)\b")


def _code(line: str) -> str:
    """The line with its comment cut off and its string literals emptied: what bracket counting reads."""
    out, i, quote = [], 0, None
    while i < len(line):
        if quote:
            if line[i] == "\\":
                i += 2
            elif line.startswith(quote, i):
                out.append(quote)
                i, quote = i + len(quote), None
            else:
                i += 1
        elif line[i] == "#":
            break
        elif line[i] in "'\"":
            quote = line[i:i + 3] if line[i:i + 3] in ('"""', "'''") else line[i]
            out.append(quote)
            i += len(quote)
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def split_skeleton(text: str) -> list[str]:
    """The points' headers of a skeleton's text: the inverse of `Skeleton.text`, so that
    `split_skeleton(extract(src).text) == extract(src).headers`.

    A header is a point's decorator lines, its def or class line and the lines that continue its signature until
    the brackets close (and no backslash continues it), then the blank and comment lines after it (`extract` keeps
    those that stand between a signature and its body). Every line ends in a newline.

    A model's skeleton may be malformed; what is not a header is dropped, never attached to a neighbour: a line
    that is neither a decorator, a signature nor a blank or comment line (a statement, stray text), decorators that
    no def or class follows, a signature whose brackets have not closed when the next def or class line or the end
    of the text comes (a skeleton cut off by its token budget), and blank or comment lines before the first point.
    Brackets are counted on each line with its strings and comment left out; a string literal that spans lines
    inside a signature is not read as one.
    """
    headers: list[str] = []
    point: list[str] = []   # the point being read: its decorators, then its signature and what follows it
    has_def = False         # whether the point has its def or class line yet
    depth = 0               # brackets open in the decorator or signature being read
    continued = False       # whether that decorator or signature goes on to the next line
    lines = text.split("\n")  # not splitlines: a form feed or a lone carriage return does not end a line here
    for line in lines[:-1] if lines[-1] == "" else lines:
        line, stripped = line + "\n", line.strip()
        starts_def = bool(_SIGNATURE.match(stripped))
        if continued and not starts_def:
            point.append(line)
        elif starts_def:
            if has_def and not continued:
                headers.append("".join(point))
            point = (point if point and not has_def and not continued else []) + [line]
            has_def, depth = True, 0
        elif stripped.startswith("@"):
            if has_def:
                headers.append("".join(point))
            point = (point if not has_def else []) + [line]
            has_def, depth = False, 0
        else:
            if point and (not stripped or stripped.startswith("#")):
                point.append(line)
            continue
        code = _code(line.rstrip("\n"))
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        continued = depth > 0 or code.rstrip().endswith("\\")
    if has_def and not continued:
        headers.append("".join(point))
    return headers


@dataclass
class SkeletonFormat:
    """The two kinds of sequence (this module's docstring) built from a tokenizer's `encode` and `decode`: training
    examples and generation (`SkeletonOfThought.write`) build their prompts here, so they agree token for token.

    Args:
        encode, decode: text -> token ids and back (the markers are encoded as text).
        preamble_tokens: tokens of the module's preamble in the skeleton prompt.
        skeleton_tokens: tokens of the skeleton kept (in its target and in every expansion prefix).
    """
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    preamble_tokens: int = 64
    skeleton_tokens: int = 128

    def skeleton_prompt(self, preamble: str) -> list[int]:
        """`<|skeleton|> preamble <|body|>`: what the skeleton is written after."""
        return self.encode(SKELETON) + self.encode(preamble)[:self.preamble_tokens] + self.encode(BODY)

    def skeleton_ids(self, skeleton: str) -> list[int]:
        """A skeleton's text as the model writes and reads it (cut to `skeleton_tokens`)."""
        return self.encode(skeleton)[:self.skeleton_tokens]

    def expand_prefix(self, skeleton_ids: list[int]) -> list[int]:
        """`<|expand|> skeleton <|point|>`: the prefix every point's expansion shares."""
        return self.encode(EXPAND) + skeleton_ids + self.encode(POINT)

    def point_prompt(self, header: str) -> list[int]:
        """`header <|body|>`: what follows the shared prefix in point i's expansion."""
        return self.encode(header) + self.encode(BODY)

    split = staticmethod(split_skeleton)


def encode_examples(skel: Skeleton, encode, eos_id: int, seq_len: int, preamble_tokens: int = 64,
                    skeleton_tokens: int | None = None) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) of the skeleton example and of each point's expansion example."""
    fmt = SkeletonFormat(encode, None, preamble_tokens, skeleton_tokens or seq_len // 2)
    head = fmt.skeleton_ids(skel.text)
    prompt = fmt.skeleton_prompt(skel.preamble)
    out = [((prompt + head + [eos_id])[:seq_len], len(prompt))]
    context = fmt.expand_prefix(head)
    for header, body in zip(skel.headers, skel.bodies):
        p = context + fmt.point_prompt(header)
        if len(p) < seq_len:
            out.append(((p + encode(body) + [eos_id])[:seq_len], len(p)))
    return out


def whole_module_windows(skels: list[Skeleton], encode, eos_id: int, seq_len: int) -> list[tuple[list[int], int]]:
    """The modules' whole texts (`Skeleton.assemble()`, the text the skeleton examples are cut from) as one stream,
    each module after an eos, in windows of seq_len tokens that overlap by one, so every token but the stream's
    first is a target once: (tokens, 0) items for `collate`."""
    stream = [t for skel in skels for t in [eos_id] + encode(skel.assemble())]
    return [(stream[i:i + seq_len], 0) for i in range(0, max(len(stream) - 1, 1), seq_len - 1)]


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
        whole_modules: serve the same modules whole, as next-token windows of seq_len tokens
            (`whole_module_windows`), for a plain next-token model to learn the same text from.
        **kwargs: the text datamodule's arguments (seq_len cuts every sequence).
    """

    def __init__(self, *args, max_files: int = 200, preamble_tokens: int = 64, whole_modules: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self._splits: dict[str, list[Skeleton]] = {}

    @property
    def format(self) -> SkeletonFormat:
        """The sequences' format with this datamodule's tokenizer (the skeleton kept to seq_len // 2 tokens)."""
        return SkeletonFormat(self.encode, self.decode, self.hparams.preamble_tokens, self.hparams.seq_len // 2)

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
        if h.whole_modules:
            return SkeletonDataset(whole_module_windows(self.modules(split), self.encode, self.eos_id, h.seq_len))
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
