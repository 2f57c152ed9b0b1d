"""Skeleton-of-Thought made trainable (Ning et al. 2023, "Skeleton-of-Thought: Prompting LLMs for Efficient
Parallel Generation", arXiv:2307.15337): one model, two tasks told apart by a marker (datamodules/skeleton.py).

The model first writes the skeleton s (the module's signature lines), then expands every point i of it
independently, p(body_i | skeleton, header_i): the N expansions share the prefix `<|expand|> s <|point|>`, so the
prefix is run once, its cache forked to N rows (`cache.fork`), each row fed its own header (ragged, padded) and all N
bodies decoded in one batched greedy loop; the answer is assembled in skeleton order. Training is next-token
prediction on both kinds of sequence (the datamodule's loss mask keeps the targets after `<|body|>`).
"""
from __future__ import annotations

import torch

from objectives.decoding.greedy import decode_after
from objectives.ntp import NextTokenPrediction


def cut_at(ids: list[int], eos_id: int | None) -> list[int]:
    """ids up to (not including) the first eos."""
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


class SkeletonOfThought(NextTokenPrediction):
    """Next-token prediction on (skeleton, point) sequences; `expand` decodes all points of a skeleton at once.

    Args:
        **kwargs: the next-token objective's arguments (not `reverse`).
    """

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
