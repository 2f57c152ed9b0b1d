"""A peer beside the project's drafters: transformers' own prompt-lookup decoding on an exported model against this
project's prompt-lookup drafter on the same weights, the same held-out code prompts, batch 1, one thread.

    python -m benchmarks.hf_lookup --ckpt_path runs/quickstart/.../checkpoints/last.ckpt \
        [--prompts 16] [--prompt_tokens 64] [--max_new_tokens 128] [--num_drafts 8] [--json out.json]

The checkpoint (a transformer-trunk NTP or MTP checkpoint) is exported with export_hf.py to a temporary Llama folder
and loaded with `AutoModelForCausalLM.from_pretrained` in float32. Four decodings run prompt by prompt, alternating:
transformers' greedy `generate(ids, max_new_tokens=N, do_sample=False)`, its prompt lookup (the same with
`prompt_lookup_num_tokens=K`), the project's greedy `generate(ids, N)` and its lookup drafter
(`generate(ids, N, speculative=True, drafter="lookup", num_drafts=K)`). Both lookups match n-grams of up to 3
tokens (transformers' `max_matching_ngram_size`, default 2, is set to the project's 3) and draft up to K tokens.
End of text is switched off in both, so every decode writes N tokens.

Per decoding: tokens/s (prefill included), its ratio to transformers' prompt lookup, the speedup over the same
library's greedy decoding, tokens a verify step adds (every token but the prefill's; transformers' forwards are
counted with a forward hook), and whether every output equals that library's greedy output (and the project's:
the exported model's logits equal the project's to float rounding, so the two greedy decodes agree unless two
logits tie within it). Goal (issue 30): the project's lookup at least as fast as transformers' on the same model.
"""
from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.common import parser, report

CASES = ("transformers greedy", "transformers prompt lookup", "beyond-ntp greedy", "beyond-ntp lookup")


def load_both(ckpt_path: str, folder: str):
    """(the project's objective, its tokenizer, the exported model in transformers), every one in eval mode."""
    from transformers import AutoModelForCausalLM

    import export_hf
    from objectives.training.checkpoints import load_with_tokenizer
    export_hf.export(ckpt_path, folder, dtype="float32")
    model, tokenizer = load_with_tokenizer(ckpt_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model.float().eval(), tokenizer, hf


def decoders(model, hf, max_new_tokens: int, num_drafts: int) -> dict:
    """Each case as a function of a prompt [1, P] -> (output ids [1, P + N], verify steps after the prefill)."""
    model.eos_id = None  # full-length continuations in both
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    forwards = [0]
    hf.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def theirs(**options):
        def run(ids):
            forwards[0] = 0
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, **options)
            return out, forwards[0] - 1
        return run

    def ours(**options):
        def run(ids):
            out = model.generate(ids, max_new_tokens, **options)
            return out, model.decode_stats["steps"] if options else max_new_tokens - 1
        return run

    return {"transformers greedy": theirs(),
            "transformers prompt lookup": theirs(prompt_lookup_num_tokens=num_drafts, max_matching_ngram_size=3),
            "beyond-ntp greedy": ours(),
            "beyond-ntp lookup": ours(speculative=True, drafter="lookup", num_drafts=num_drafts)}


def measure(runs: dict, prompts: list[torch.Tensor]) -> dict:
    """Every case on every prompt, alternating case by case; per case the seconds, steps and outputs."""
    results = {name: {"seconds": [], "steps": 0, "outputs": []} for name in runs}
    for name, run in runs.items():  # warm up
        run(prompts[0][:, :16])
    for ids in prompts:
        for name, run in runs.items():
            start = time.perf_counter()
            out, steps = run(ids)
            results[name]["seconds"].append(time.perf_counter() - start)
            results[name]["steps"] += steps
            results[name]["outputs"].append(out)
    return results


def rows_of(results: dict, max_new_tokens: int) -> list[dict]:
    tokens = max_new_tokens * len(results[CASES[0]]["seconds"])
    rate = {name: tokens / sum(r["seconds"]) for name, r in results.items()}
    rows = []
    for name, r in results.items():
        library = name.split()[0]
        greedy = results[f"{library} greedy"]["outputs"]
        rows.append({"decoding": name, "tokens/s": rate[name],
                     "vs transformers lookup": rate[name] / rate["transformers prompt lookup"],
                     "speedup over own greedy": rate[name] / rate[f"{library} greedy"],
                     "accepted/step": (max_new_tokens - 1) * len(r["seconds"]) / max(r["steps"], 1),
                     "equal to own greedy": all(torch.equal(a, b) for a, b in zip(r["outputs"], greedy)),
                     "equal to beyond-ntp greedy": all(torch.equal(a, b) for a, b in
                                                       zip(r["outputs"], results["beyond-ntp greedy"]["outputs"]))})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", required=True, help="a transformer-trunk checkpoint export_hf.py can write")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_drafts", type=int, default=8, help="most drafts per step, in both (prompt_lookup_num_tokens)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from benchmarks.speculative import held_out_prompts
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # kept while transformers may read its weights mapped from disk
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            model, tokenizer, hf = load_both(args.ckpt_path, folder)
            prompts = [torch.tensor([ids]) for ids in held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)]
            results = measure(decoders(model, hf, args.max_new_tokens, args.num_drafts), prompts)
    finally:  # main() may run inside another program (the tests)
        torch.set_num_threads(threads)
    rows = rows_of(results, args.max_new_tokens)
    report(rows, f"prompt lookup at batch 1, {args.prompts} held-out code prompts of {args.prompt_tokens} tokens, "
                 f"{args.max_new_tokens} new tokens each, up to {args.num_drafts} drafts, float32, "
                 f"{args.threads} thread(s)", args.json, ckpt_path=args.ckpt_path)
    return rows


if __name__ == "__main__":
    main()
