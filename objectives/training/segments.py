"""Reading a reasoning batch's `segments` [B, L] (the batch contract in ARCHITECTURE.md): -1 padding, 0 the
prompt, 1 the answer, 2 + k reasoning step k. Planning tokens insert a plan before each step; LaDiR encodes each
step as a latent block; both find the steps here."""
from __future__ import annotations


def step_spans(segments: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each reasoning step (segment >= 2) of one row, in order."""
    spans: list[tuple[int, int]] = []
    for t, g in enumerate(segments):
        if g >= 2 and (t == 0 or segments[t - 1] != g):
            spans.append((t, t + 1))
        elif g >= 2:
            spans[-1] = (spans[-1][0], t + 1)
    return spans
