"""Diffusion language models against next-token prediction on the built-in code corpus, same trunk, data and
step budget (the quickstart's trunk and data; the budget of configs/experiments/mdlm_code.yaml), in one process.

    python -m benchmarks.diffusion [--ntp_ckpt P] [--mdlm_ckpt P] [--diffusion_lm_ckpt P] [--prompts 16]
                                   [--new_tokens 64] [--sampling_steps 8,32,128] [--path_star] [--json out.json]
                                   [--families mdlm,diffusion_lm] [--max_steps N] [--train_args "FLAGS"]

(a) Likelihood: MDLM's and Diffusion-LM's `val/nll_bound` beside NTP's `val/ntp_loss` (nats per token, the same
    val windows) and the unigram entropy. For scale, on OpenWebText MDLM's bound is 23.2 perplexity against
    17.5 for autoregression (Sahoo et al. 2024).
(b) Sampling: continuations of held-out prompts by MDLM's ancestral sampler at each number of steps, by
    Diffusion-LM, and by the NTP model itself, all at temperature 1. Quality is the generative perplexity (the
    NTP model's perplexity on the sampled tokens given the prompt) beside the samples' unigram entropy in nats
    (a looping sampler scores a low perplexity with a low entropy). Speed is new tokens per second at the same
    batch and length, with the network calls made.
(c) With --path_star: the MDLM row of the path-star table (benchmarks.path_star,
    configs/experiments/path_star_mdlm.yaml).

`--families` picks the diffusion families to train and sample (NTP, the scorer, always runs); `--max_steps` trains
every model for N steps instead of the recipes' budget (a reduced budget; each run then validates once, at the end);
`--train_args` adds CLI flags to every training run (e.g. a smaller trunk, for a reduced budget).
Models not given as checkpoints are trained by their recipes: configs/experiments/mdlm_code.yaml,
configs/experiments/diffusion_lm_code.yaml, and configs/quickstart.yaml (NTP) with the MDLM recipe's max_steps.
"""
from __future__ import annotations

import math
import shlex
import time
from collections import Counter

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import parser, report
from benchmarks.path_star import BUDGET_MINUTES, BUDGET_STEPS, train_and_test
from benchmarks.speculative import held_out_prompts
from lab import cli as train
from objectives.training import metrics as M
from objectives.training.callbacks import auto_precision
from objectives.training.checkpoints import load_with_tokenizer as load

RECIPES = {"ntp": "configs/quickstart.yaml", "mdlm": "configs/experiments/mdlm_code.yaml",
           "diffusion_lm": "configs/experiments/diffusion_lm_code.yaml"}
LIKELIHOOD = {"ntp": M.VAL_NTP_LOSS, "mdlm": M.VAL_NLL_BOUND, "diffusion_lm": M.VAL_NLL_BOUND}


def recipe_steps(name: str) -> int:
    return int(yaml.safe_load(open(RECIPES[name]))["trainer"]["max_steps"])


def trained(name: str, ckpt: str | None, save_dir: str, max_steps: int | None = None, extra: tuple = ()
            ) -> tuple[object, object, float, float]:
    """(model, tokenizer, nats per token on the val split, unigram entropy), from a checkpoint or by training."""
    if ckpt is None:  # the recipes validate at their last step, so the run's own final metrics serve
        budget = ["--trainer.max_steps", str(recipe_steps("mdlm"))] if name == "ntp" else []
        if max_steps:
            budget = ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps)]
        if name == "ntp":
            budget += ["--trainer.logger.init_args.name", "ntp_code"]
        cli = train.main(["fit", "-c", RECIPES[name], "--trainer.logger.init_args.save_dir", save_dir,
                          "--trainer.enable_progress_bar", "false", *budget, *extra])
        ckpt = f"{cli.trainer.log_dir}/checkpoints/final.ckpt"  # last.ckpt is only as new as the last interval
        cli.trainer.save_checkpoint(ckpt)
    else:
        # without a logger the CLI writes its config.yaml to default_root_dir, which is the working directory unless set
        cli = train.main(["validate", "-c", RECIPES[name], "--ckpt_path", ckpt, "--trainer.logger", "false",
                          "--trainer.default_root_dir", save_dir, "--trainer.enable_progress_bar", "false"])
    model, tokenizer = load(ckpt)
    unigram = getattr(cli.datamodule, "unigram_entropy", float("nan"))
    return model, tokenizer, float(cli.trainer.callback_metrics[LIKELIHOOD[name]]), unigram


@torch.no_grad()
def generative_perplexity(scorer, prompts: torch.Tensor, samples: torch.Tensor) -> float:
    """exp of the NTP model's mean NLL of the sampled tokens given the prompt."""
    logits = scorer.logits(scorer.hidden(samples[:, :-1]))
    nll = F.cross_entropy(logits.float().transpose(1, 2), samples[:, 1:], reduction="none")[:, prompts.shape[1] - 1:]
    return math.exp(nll.mean().item())


def entropy(samples: torch.Tensor) -> float:
    counts = Counter(samples.flatten().tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ntp_ckpt")
    p.add_argument("--mdlm_ckpt")
    p.add_argument("--diffusion_lm_ckpt")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--sampling_steps", default="8,32,128")
    p.add_argument("--path_star", action="store_true", help="also train and test MDLM on path-star (up to 10 min)")
    p.add_argument("--save_dir", default="runs")
    p.add_argument("--families", default="mdlm,diffusion_lm", help="diffusion families to run, comma-separated")
    p.add_argument("--max_steps", type=int, help="train every model for this many steps (default: the recipes')")
    p.add_argument("--train_args", default="", help="extra CLI flags for every training run")
    args = p.parse_args()
    precision = auto_precision()
    families = args.families.split(",")
    unknown = set(families) - {"mdlm", "diffusion_lm"}
    if unknown:
        p.error(f"--families {args.families}: unknown {sorted(unknown)}; choose among mdlm, diffusion_lm")

    models, likelihood_rows = {}, []
    for name in ("ntp", *families):
        model, tokenizer, nats, unigram = trained(name, getattr(args, f"{name}_ckpt"), args.save_dir, args.max_steps,
                                                  tuple(shlex.split(args.train_args)))
        models[name] = model
        likelihood_rows.append({"objective": type(model).__name__, "metric": LIKELIHOOD[name], "nats/token": nats,
                                "perplexity": math.exp(min(nats, 50)), "unigram entropy": unigram})
    report(likelihood_rows, f"(a) likelihood on the stdlib val split, quickstart trunk, "
                            f"{args.max_steps or recipe_steps('mdlm')} steps "
                            f"each ({precision})",
           args.json and args.json.replace(".json", "_likelihood.json"))

    torch.manual_seed(0)
    prompts = torch.tensor(held_out_prompts(tokenizer, args.prompts, args.prompt_tokens))
    ntp, mdlm, diffusion_lm = models["ntp"], models.get("mdlm"), models.get("diffusion_lm")
    # (label, steps, sampler, network calls it makes: None = counted by the model)
    runs = [("NTP (autoregressive, KV cache)", "-", lambda: ntp.generate(prompts, args.new_tokens, temperature=1.0),
             args.new_tokens)]
    for steps in map(int, args.sampling_steps.split(",")) if mdlm is not None else ():
        runs.append(("MDLM ancestral", steps, lambda s=steps: mdlm.generate(
            prompts, args.new_tokens, temperature=1.0, steps=s, sampler="ancestral"), None))
    if diffusion_lm is not None:
        def dot_product_clamp():  # the clamp this code had before: the largest dot product, not the L2-nearest word
            diffusion_lm.nearest = diffusion_lm.round
            try:
                return diffusion_lm.generate(prompts, args.new_tokens, temperature=1.0)
            finally:
                del diffusion_lm.nearest
        runs.append(("Diffusion-LM (clamped, L2)", diffusion_lm.hparams.sampling_steps,
                     lambda: diffusion_lm.generate(prompts, args.new_tokens, temperature=1.0),
                     diffusion_lm.hparams.sampling_steps))
        runs.append(("Diffusion-LM (clamped, dot product)", diffusion_lm.hparams.sampling_steps, dot_product_clamp,
                     diffusion_lm.hparams.sampling_steps))
    sample_rows = []
    for label, steps, sample, calls in runs:
        if mdlm is not None:
            mdlm.network_calls = 0
        samples, seconds = timed(sample)
        sample_rows.append({"sampler": label, "steps": steps,
                            "gen. perplexity": generative_perplexity(ntp, prompts, samples),
                            "entropy": entropy(samples[:, prompts.shape[1]:]),
                            "tokens/s": args.prompts * args.new_tokens / seconds,
                            "network calls": mdlm.network_calls if calls is None else calls})
    report(sample_rows, f"(b) {args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
                        f"tokens each, temperature 1, batch {args.prompts} ({precision}, 1 process)",
           args.json and args.json.replace(".json", "_sampling.json"))

    if args.path_star:
        row = train_and_test("mdlm", BUDGET_STEPS, BUDGET_MINUTES, args.save_dir)
        report([row], "(c) path-star G(2, 5, 50), MDLM row",
               args.json and args.json.replace(".json", "_path_star.json"))


if __name__ == "__main__":
    main()
