"""Skeleton-of-Thought made trainable (Ning et al. 2023, "Skeleton-of-Thought: Prompting LLMs for Efficient
Parallel Generation", arXiv:2307.15337): one model, two tasks told apart by a marker (datamodules/skeleton.py).

The model first writes the skeleton s (the module's signature lines), then expands every point i of it
independently, p(body_i | skeleton, header_i): the N expansions share the prefix `<|expand|> s <|point|>`, so the
prefix is run once, its cache forked to N rows (`cache.fork`), each row fed its own header (ragged, padded) and all N
bodies decoded in one batched greedy loop; the answer is assembled in skeleton order. Training is next-token
prediction on both kinds of sequence (the datamodule's loss mask keeps the targets after `<|body|>`). `write` runs
both stages end to end: the model writes the skeleton, the skeleton is split into points, every point is expanded.

Where this departs from the paper: SoT prompts large API models (its skeleton and point-expanding prompt
templates, Ning et al. 2023, Section 2.1) for answers of a few numbered points in prose; here one small model is
trained on both stages, on Python modules, whose points are the signatures `ast` finds (the skeleton is a
module's def and class lines, a point's expansion is that def's body). The paper's router (SoT-R) is not built.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from objectives.decoding.greedy import decode_after
from objectives.ntp import NextTokenPrediction


def cut_at(ids: list[int], eos_id: int | None) -> list[int]:
    """ids up to (not including) the first eos."""
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


class Written(NamedTuple):
    """What `SkeletonOfThought.write` wrote for one module."""
    text: str           # the module: the preamble, then each header followed by its body
    skeleton: str       # the skeleton as the model wrote it (before splitting)
    headers: list[str]  # its points' headers (the format's `split`)
    bodies: list[str]   # each point's expanded body
    tokens: int         # tokens generated: the skeleton's and every body's


class SkeletonOfThought(NextTokenPrediction):
    """Next-token prediction on (skeleton, point) sequences; `expand` decodes all points of a skeleton at once;
    `write` writes a module end to end.

    Args:
        **kwargs: the next-token objective's arguments (not `reverse`).
    """

    @torch.no_grad()
    def write(self, preamble: str, fmt, max_skeleton_tokens: int | None = None, max_body_tokens: int = 64,
              parallel: bool = True) -> Written:
        """A module written from its preamble in SoT's two stages (Ning et al. 2023, Section 2.1): the skeleton
        stage, greedy after `fmt.skeleton_prompt(preamble)` until eos or `max_skeleton_tokens` (default: the
        format's `skeleton_tokens`, the length it was trained to); the text is split into points (`fmt.split`:
        what is not a header is dropped); then the point-expanding stage, `expand` of every point after
        `fmt.expand_prefix(the skeleton's ids as written)`, each body greedy until eos or `max_body_tokens`
        (`parallel`: one batched decode; otherwise one point at a time, the same tokens).

        `fmt` is the data's `SkeletonFormat` (`datamodule.format`): the objective knows the sequences' markers and
        tokenizer only through it.
        """
        prompt = torch.tensor([fmt.skeleton_prompt(preamble)], device=self.device)
        n = max_skeleton_tokens or fmt.skeleton_tokens
        skeleton_ids = cut_at(self.generate(prompt, n)[0, prompt.shape[1]:].tolist(), self.eos_id)
        skeleton = fmt.decode(skeleton_ids)
        headers = fmt.split(skeleton)
        body_ids = self.expand(fmt.expand_prefix(skeleton_ids), [fmt.point_prompt(h) for h in headers],
                               max_body_tokens, parallel)
        bodies = [fmt.decode(b) for b in body_ids]
        return Written(self.assemble(preamble, headers, bodies), skeleton, headers, bodies,
                       len(skeleton_ids) + sum(len(b) for b in body_ids))

    @torch.no_grad()
    def expand(self, prefix: list[int], headers: list[list[int]], max_new_tokens: int,
               parallel: bool = True) -> list[list[int]]:
        """The body of each point (greedy, cut at eos): prefix + headers[i] is point i's prompt. `parallel`: one
        batched decode from one cached prefix; otherwise one `generate` per point (the same tokens)."""
        if not headers:
            return []
        if not parallel:
            out = []
            for h in headers:
                prompt = torch.tensor([prefix + h], device=self.device)
                out.append(cut_at(self.generate(prompt, max_new_tokens)[0, prompt.shape[1]:].tolist(), self.eos_id))
            return out
        N, device = len(headers), self.device
        self.check_generation_length(len(prefix) + max(len(h) for h in headers) + max_new_tokens)
        cache = self.trunk.make_cache(1, device=device, dtype=self.embed.weight.dtype)
        self.hidden(torch.tensor([prefix], device=device), cache=cache)
        cache = cache.fork(torch.zeros(N, dtype=torch.long, device=device))
        lengths = torch.tensor([len(h) for h in headers], device=device)
        fill = self.eos_id if self.eos_id is not None else 0
        fed = torch.full((N, int(lengths.max())), fill, dtype=torch.long, device=device)
        for i, h in enumerate(headers):
            fed[i, :len(h)] = torch.tensor(h, device=device)
        real = torch.arange(fed.shape[1], device=device)[None] < lengths[:, None]
        hidden = self.hidden(fed, cache=cache, **({"padding_mask": real} if not bool(real.all()) else {}))
        logits = self.logits(hidden[torch.arange(N, device=device), lengths - 1])
        bodies = decode_after(self, logits, cache, max_new_tokens)
        return [cut_at(row, self.eos_id) for row in bodies.tolist()]

    @staticmethod
    def assemble(preamble: str, headers: list[str], bodies: list[str]) -> str:
        """The module in skeleton order: preamble, then each signature followed by its expanded body."""
        return preamble + "".join(h + (b if b.endswith("\n") or not b else b + "\n") for h, b in zip(headers, bodies))
