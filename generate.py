"""Generate text from any checkpoint of the project (the tokenizer travels inside the checkpoint).

    python generate.py --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt --prompt "def " \
        --max_new_tokens 64 [--speculative true] [--temperature 0.8] [--drafter heads|lookup|...]
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch
from tokenizers import Tokenizer

from objectives.base import Objective


def load(ckpt_path: str) -> tuple[Objective, Tokenizer]:
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    tokenizer = next((state["tokenizer"] for state in checkpoint.values()
                      if isinstance(state, dict) and "tokenizer" in state), None)
    if tokenizer is None:
        raise ValueError(f"{ckpt_path} carries no tokenizer: it was not written by train.py's datamodules")
    # the objective's class from the checkpoint (train.py records it), so its own hyperparameters apply
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path", "objectives.base.Objective")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"{ckpt_path} names {class_path}, which is not an objective of this project")
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu")
    return model.eval(), Tokenizer.from_str(tokenizer)


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--speculative", type=boolean, default=False)
    p.add_argument("--drafter", default=None, help="drafting strategy (default: the objective's own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load(args.ckpt_path)
    ids = tokenizer.encode(args.prompt).ids or [model.eos_id or 0]
    prompt = torch.tensor([ids])
    options = {"speculative": True, "drafter": args.drafter} if args.speculative else {}
    start = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, **options)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
    new = out.shape[1] - prompt.shape[1]
    print(f"\n[{new} tokens in {seconds:.2f}s: {new / seconds:.1f} tokens/s", end="")
    if args.speculative:
        stats = model.decode_stats
        print(f"; mean accepted length {stats['tokens'] / max(stats['steps'], 1):.2f} tokens per forward", end="")
    print("]")


if __name__ == "__main__":
    main()
