"""Write a checkpoint of the project's transformer trunk as a Hugging Face Llama folder.

    python export_hf.py --ckpt_path runs/quickstart/.../checkpoints/last.ckpt --out exported/
    # then, anywhere transformers is installed:
    #   AutoModelForCausalLM.from_pretrained("exported/"), AutoTokenizer.from_pretrained("exported/")

The folder holds `config.json` (a `LlamaConfig`), `model.safetensors` (the weights under Llama's names),
`tokenizer.json` (the checkpoint's own tokenizer) with a `tokenizer_config.json` that makes `AutoTokenizer` load it
as a `PreTrainedTokenizerFast` with its end-of-text token, and, for a family with more than a trunk (multi-token
heads, DeepSeek's MTP modules, summary heads), `beyond_ntp_heads.safetensors`: those tensors under the names the
same objective has over `models.HFTrunk(pretrained=<folder>)`: a head's or module's transformer block becomes the
one Llama decoder layer of an `HFBlock` (`<name>.body.layers.0.` + the per-block mapping below), every other
tensor keeps its name; the objective's class and hyperparameters are in the file's metadata. transformers ignores
that file; the objective reads it back when built over the folder's HFTrunk (at setup, or by hand with
`finish_pretrained_start()`), so the same family with the same settings gets its heads back and drafts as before.

The mapping (`models/transformer.py`, `models/layers.py` -> transformers' `modeling_llama.py`):
- token embedding `embed.weight` -> `model.embed_tokens.weight`; the project ties its unembedding to it, so
  `tie_word_embeddings` is true and there is no `lm_head.weight`. `vocab_size` is the embedding's rows (a
  family's extra tokens included).
- per block i, `trunk.blocks.i.`: `attn_norm.weight` -> `input_layernorm.weight`, `mlp_norm.weight` ->
  `post_attention_layernorm.weight` (both RMSNorm x / rms(x) * w with the weight w itself, not 1 + w; eps =
  the trunk's `norm_eps` -> `rms_norm_eps`); `attn.qkv.weight` [3D, D] split in three (rows q, k, v, each head's
  rows contiguous) -> `self_attn.q_proj/k_proj/v_proj.weight`, `attn.out.weight` -> `self_attn.o_proj.weight`;
  `mlp.gate_up.weight` [2H, D] split (gate rows first, then up: SwiGLU is out(silu(gate) * up)) ->
  `mlp.gate_proj.weight`, `mlp.up_proj.weight`; `mlp.out.weight` -> `mlp.down_proj.weight`.
- rotary: the project rotates interleaved pairs (dims 2i, 2i+1 of a head share frequency base^(-2i/d)); Llama
  rotates halves (dims i, i + d/2). The q and k rows of each head are permuted (even dims first, then odd), which
  turns one convention into the other and leaves every q.k product unchanged; v and the output are not touched.
  `rope_theta` is the trunk's `rope_base`. `num_key_value_heads` = `num_attention_heads` (no grouped queries).
- `qkv_bias` (Qwen2-style biases on q, k, v): Llama's `attention_bias` also gives `o_proj` a bias, written as
  zeros; the q and k biases are permuted with their rows.
- final norm `trunk.norm.weight` -> `model.norm.weight`; `max_position_embeddings` = the trunk's `max_seq_len`.

What cannot be expressed: a model trained right to left (`reverse: true`) reads the sequence backwards, which a
Llama folder cannot say: it is refused. So is any trunk but `models.Transformer`, and an objective whose
unembedding is not its embedding. Numerically the exported model matches to float32 rounding (tests/test_hf.py
bounds the logits' difference at 1e-4; the rotary tables are computed the same way, in float32); in bfloat16 the two
implementations round at different places (transformers' RMSNorm computes in float32 and casts back).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from jsonargparse import auto_cli

from lab.cli import run_from_the_shell
from models import Transformer
from models.hf import HEADS_FILE
from models.layers import Rotary
from models.transformer import Block
from objectives.training.base import Objective
from objectives.training.checkpoints import checkpoint_tokenizer, load_checkpoint, load_objective

HF_BLOCK_LAYER = "body.layers.0."  # the one decoder layer of a models.hf.HFBlock (a head block over HFTrunk)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rotate_half_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns interleaved rotary pairs into rotate-half ones: per head, its even dims, then its odd."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + within[None]).reshape(-1)


def check_exportable(objective) -> None:
    trunk = objective.trunk
    if not isinstance(trunk, Transformer):
        raise ValueError(f"export_hf.py writes the models.Transformer trunk as a Llama model; this checkpoint's trunk "
                         f"is {type(trunk).__name__}, which has no Llama equivalent")
    if getattr(objective, "reverse", False):
        raise ValueError("this checkpoint was trained right to left (reverse: true): a Llama folder reads left to "
                         "right, so its logits would mean something else; export a left-to-right checkpoint")
    if objective.unembedding is not objective.embed.weight or type(objective).logits is not Objective.logits:
        raise ValueError(f"{type(objective).__name__} computes its logits otherwise than with the tied embedding, "
                         f"which a Llama folder with tied word embeddings cannot express")
    if objective.embed.weight.shape[1] != trunk.d_model:
        raise ValueError(f"{type(objective).__name__} embeds tokens at width {objective.embed.weight.shape[1]}, not "
                         f"the trunk's {trunk.d_model}: a Llama model cannot express the difference")


def rope_base(trunk: Transformer) -> float:
    """The trunk's rotary base, checked against the tables its blocks actually use."""
    base = float(trunk._block_args[4])  # Transformer keeps (d_model, n_heads, mlp_hidden, max_len, rope_base, ...)
    if len(trunk.blocks):
        used = trunk.blocks[0].attn.rotary
        expected = Rotary(trunk.d_model // trunk.n_heads, used.cos.shape[0], base)
        if not torch.allclose(expected.cos, used.cos.float().cpu(), atol=1e-6):
            raise ValueError("the trunk's rotary tables do not match its rope_base: its positions cannot be exported")
    return base


def llama_config(objective, eos_id: int | None, dtype: str) -> dict:
    """config.json, in the keys of transformers 4.x (which 5.x reads too)."""
    trunk, block = objective.trunk, objective.trunk.blocks[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(objective.embed.weight.shape[0]),
        "hidden_size": trunk.d_model,
        "intermediate_size": int(block.mlp.out.in_features),
        "num_hidden_layers": len(trunk.blocks),
        "num_attention_heads": trunk.n_heads,
        "num_key_value_heads": trunk.n_heads,
        "head_dim": trunk.d_model // trunk.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": trunk.max_seq_len,
        "rms_norm_eps": float(block.attn_norm.eps),
        "rope_theta": rope_base(trunk),
        "attention_bias": block.attn.qkv.bias is not None,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # the project's unembedding is its embedding
        "bos_token_id": eos_id,  # sequences start with no token of their own: GPT-2's convention, bos = eos
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def llama_layer(block: Block, prefix: str) -> dict[str, torch.Tensor]:
    """One project block under the names of a Llama decoder layer at `prefix` (the mapping in the module docstring)."""
    attn = block.attn
    order = rotate_half_order(attn.n_heads, attn.head_dim)
    q, k, v = attn.qkv.weight.chunk(3, dim=0)
    gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
    weights = {
        prefix + "input_layernorm.weight": block.attn_norm.weight,
        prefix + "self_attn.q_proj.weight": q[order],
        prefix + "self_attn.k_proj.weight": k[order],
        prefix + "self_attn.v_proj.weight": v,
        prefix + "self_attn.o_proj.weight": attn.out.weight,
        prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
        prefix + "mlp.gate_proj.weight": gate,
        prefix + "mlp.up_proj.weight": up,
        prefix + "mlp.down_proj.weight": block.mlp.out.weight,
    }
    if attn.qkv.bias is not None:
        q_bias, k_bias, v_bias = attn.qkv.bias.chunk(3)
        weights.update({prefix + "self_attn.q_proj.bias": q_bias[order],
                        prefix + "self_attn.k_proj.bias": k_bias[order],
                        prefix + "self_attn.v_proj.bias": v_bias,
                        prefix + "self_attn.o_proj.bias": torch.zeros_like(v_bias)})
    return weights


def llama_weights(objective) -> dict[str, torch.Tensor]:
    """The trunk and the embedding under Llama's names (the mapping in the module docstring)."""
    trunk = objective.trunk
    weights = {"model.embed_tokens.weight": objective.embed.weight, "model.norm.weight": trunk.norm.weight}
    for i, block in enumerate(trunk.blocks):
        weights.update(llama_layer(block, f"model.layers.{i}."))
    return weights


def head_weights(objective) -> dict[str, torch.Tensor]:
    """Every tensor of the objective the Llama folder does not hold (heads, MTP modules, summary heads), under the
    names the same objective has over an HFTrunk of the folder: blocks outside the trunk as HFBlocks' Llama
    layers, everything else as it is."""
    blocks = {name: m for name, m in objective.named_modules()
              if isinstance(m, Block) and not name.startswith("trunk.")}
    weights = {}
    for name, tensor in objective.state_dict().items():
        if name.startswith("trunk.") or name == "embed.weight" or any(name.startswith(b + ".") for b in blocks):
            continue
        weights[name] = tensor
    for name, block in blocks.items():
        weights.update(llama_layer(block, f"{name}.{HF_BLOCK_LAYER}"))
    return weights


def end_of_text(objective, tokenizer) -> int | None:
    """The objective's eos (linked from the data); else the tokenizer's one special token, if it has one."""
    if objective.eos_id is not None:
        return int(objective.eos_id)
    specials = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special] if tokenizer else []
    return specials[0] if len(specials) == 1 else None


def write_tokenizer(tokenizer, out: Path, eos_id: int | None, max_len: int) -> None:
    """tokenizer.json as the checkpoint has it, and what AutoTokenizer needs to load it as a fast tokenizer."""
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                "clean_up_tokenization_spaces": False}
    if eos_id is not None:
        settings["eos_token"] = tokenizer.id_to_token(eos_id)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError('export_hf.py needs the safetensors package: pip install -e ".[hf]"') from None
    # clones: safetensors refuses tensors that share memory (the q, k and v views of one qkv matrix)
    save_file({name: t.detach().to(dtype).contiguous().clone() for name, t in tensors.items()}, str(path), metadata)


def export(ckpt_path: str, out: str, dtype: str = "float32") -> Path:
    """Write a checkpoint of the transformer trunk as a Llama folder that transformers loads as it is.

    Args:
        ckpt_path: a checkpoint written by train.py (its trunk a models.Transformer).
        out: the folder to write (created; files of the same names are replaced).
        dtype: the weights' dtype in the folder: float32, bfloat16 or float16.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint = load_checkpoint(ckpt_path)
    objective = load_objective(ckpt_path, checkpoint=checkpoint)
    check_exportable(objective)
    serialised = checkpoint_tokenizer(checkpoint)
    tokenizer = None
    if serialised is not None:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_str(serialised)
    eos_id = end_of_text(objective, tokenizer)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(objective, eos_id, dtype), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}, indent=2) + "\n")
    save_safetensors(llama_weights(objective), folder / "model.safetensors", DTYPES[dtype], {"format": "pt"})
    written = ["config.json", "generation_config.json", "model.safetensors"]
    if tokenizer is not None:
        write_tokenizer(tokenizer, folder, eos_id, objective.trunk.max_seq_len)
        written += ["tokenizer.json", "tokenizer_config.json"]
    heads = head_weights(objective)
    if heads:
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        metadata = {"class_path": str(hparams.get("_class_path", type(objective).__name__)),
                    "hyper_parameters": json.dumps(hparams, default=str)}
        save_safetensors(heads, folder / HEADS_FILE, DTYPES[dtype], metadata)
        written.append(f"{HEADS_FILE} ({len(heads)} tensors; read by this project only)")
    print(f"wrote {folder}: {', '.join(written)}" + ("" if tokenizer else "; the checkpoint carries no tokenizer"))
    return folder


def main(args: list[str] | None = None) -> None:
    auto_cli(export, args=args, as_positional=False)


if __name__ == "__main__":
    run_from_the_shell(main)
