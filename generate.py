"""Generate text from any checkpoint of the project (the tokenizer travels inside the checkpoint).

    python generate.py --prompt "def " \
        --ckpt_path runs/quickstart/stdlib-code-NextTokenPrediction-Transformer/version_0/checkpoints/last.ckpt \
        --max_new_tokens 64 [--speculative true] [--temperature 0.8] [--drafter heads|lookup|...] \
        [--options '{mode: confidence, tau: 0.8}']

The same conventions as train.py: `--config generate.yaml`, `--print_config`, typed flags. The checkpoint is read
with `weights_only=True` (objectives/training/checkpoints.py): one that holds anything but plain tensors, numbers and
strings is refused, never unpickled.
"""
from __future__ import annotations

import sys
import time

import torch
from jsonargparse import auto_cli

from lab.cli import run_from_the_shell
from objectives.training.checkpoints import load_with_tokenizer as load  # noqa: F401 (generate.load is public)


def generate(ckpt_path: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, speculative: bool = False, drafter: str | None = None,
             options: dict | None = None, seed: int = 0) -> None:
    """Generate a continuation of a prompt from a checkpoint written by train.py, and print it with its speed.

    Args:
        ckpt_path: a checkpoint written by train.py (the tokenizer travels inside it).
        prompt: the text to continue.
        max_new_tokens: tokens to generate.
        temperature: 0 decodes greedily; above 0 samples.
        top_k: sample from the k most likely tokens only.
        speculative: draft-then-verify decoding (the same output as plain decoding, in fewer forwards).
        drafter: the drafting strategy of speculative decoding (default: the objective's own).
        options: further keyword arguments of the objective's own `generate` (a family's decoding modes).
        seed: the random seed of sampling.
    """
    torch.manual_seed(seed)
    model, tokenizer = load(ckpt_path)
    ids = tokenizer.encode(prompt).ids or [model.eos_id or 0]
    prompt_ids = torch.tensor([ids])
    kwargs = dict(options or {})
    if speculative:
        kwargs.update(speculative=True, drafter=drafter)
    start = time.perf_counter()
    out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, **kwargs)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
    # the speed to stderr, so that stdout is the text alone (two decoding modes compare by their output)
    new = out.shape[1] - prompt_ids.shape[1]
    speed = f"[{new} tokens in {seconds:.2f}s: {new / seconds:.1f} tokens/s"
    stats = getattr(model, "decode_stats", None)
    if stats and stats.get("steps"):
        speed += f"; mean accepted length {stats['tokens'] / max(stats['steps'], 1):.2f} tokens per forward"
    print(speed + "]", file=sys.stderr)


def main(args: list[str] | None = None) -> None:
    auto_cli(generate, args=args, as_positional=False)


if __name__ == "__main__":
    run_from_the_shell(main)
