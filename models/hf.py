"""A Hugging Face `transformers` causal language model as a trunk, and its pretrained embedding and output head.

- `HFTrunk(pretrained)`: the decoder body of any `transformers` causal LM (`AutoModelForCausalLM.from_pretrained`,
  then its base model: `LlamaModel`, `GPT2Model`, ...) behind the project's trunk contract (`models/contracts.py`):
  embeddings in through `inputs_embeds`, hidden states out after the model's final norm, per-row positions and
  key padding, and a decoding cache with per-row lengths, crop and fork (`HFDecodingCache`) over transformers'
  `DynamicCache`. The token embedding is not part of the trunk (the objective owns it): a stand-in without
  parameters takes its place, so the trunk neither stores nor trains it.
- The pretrained token embedding and output head go to the objective: `HFTrunk` keeps them from the model it loads
  and hands them over once (`take_pretrained_embeddings`), when the objective is built (`Objective.__init__`, through
  `objectives/training/checkpoints.py`); `tied_embeddings` says whether the model's head is its embedding (GPT-2)
  or a matrix of its own (Llama-3 8B, Mistral), in which case the objective gets an untied unembedding. The file
  export_hf.py writes beside a Llama folder (`HEADS_FILE`: multi-token heads, DeepSeek modules) and the folder's
  `tokenizer.json` are read the same way (`pretrained_heads`, `tokenizer_vocab`). `pretrained_embeddings(name)`
  gives the two matrices without a trunk.
- `HFBlock`: what `HFTrunk.make_block()` returns: one fresh decoder layer of the model's own class and config (a
  one-layer model of the same class, its final norm removed), for multi-token heads and DeepSeek's MTP modules.

How ragged rows and rollback work on a cache that only grows: the `DynamicCache` holds "slots", appended in order
by every forward; `HFDecodingCache.slots` [B, S] says which slot holds a real key of each row (a row's real keys
are its positions 0, 1, ... in slot order). Every cached forward passes transformers a 2D attention mask (the slots,
then the new tokens' padding) and per-row `position_ids` (each row continues from its own length), so the model's
causal mask (by slot) and its key-padding mask (by the 2D mask) give each row exactly its own keys. Cropping a
row clears its slots past the new length; slots no row uses any more are cut off the end, and when unused slots
pile up inside (rows that accepted different numbers of drafts) each row's keys are gathered to the front.

Masks: "causal", and a boolean mask tensor (True = attend; the project's layout, `models/contracts.py`: key j of row
b is that row's position j, the cached ones first, then the T new tokens at lengths[b] .. lengths[b] + T - 1) for
the model types whose body hands a custom 4D attention mask to every layer as it is (`TENSOR_MASK_MODEL_TYPES`,
transformers 5: `masking_utils` returns a 4D mask unchanged, and Llama, Mistral, Qwen2/3 and GPT-2 pass it to
their attention), without a sliding window (the 4D mask would replace it) and with the sdpa or eager attention
(flash attention takes no arbitrary mask). The trunk rewrites the project's mask by cache slot: each used slot
takes its row position's column, unused slots and padding keys none, and a padding query attends to itself; sdpa
gets it boolean, eager additive (0 or the dtype's minimum). `tensor_mask_refusal` says why another model cannot.
"full" (bidirectional) attention is not something a causal LM's layers promise: the denoising families refuse
this trunk at setup. Tree drafts verify with a mask tensor but then move keys by position, which a cache of slots
does not hold: they stop with a message to decode with chain drafts.

`transformers` is imported only when a trunk is built, so `import models` works without it; it comes with the
optional extra `pip install -e ".[hf]"`. Tested with transformers 5.x only. The code keeps to what 4.x has too (the
cache read through `DynamicCache`'s iteration and written through its `update`, the cache keyword `cache` or
`past_key_values`, whichever the model's forward takes, 2D key-padding masks with position ids), but a 4.x model
class must itself take a `DynamicCache` (older GPT-2 code took tuples of tensors).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch import nn

from models.layers import as_index, as_lengths, check_length, check_padding

INSTALL = 'pip install -e ".[hf]"'
# what export_hf.py writes beside a Llama folder: the objective's tensors beyond the trunk and the embedding (heads,
# DeepSeek modules, summary heads), under the names an objective over an HFTrunk of that folder gives them
HEADS_FILE = "beyond_ntp_heads.safetensors"
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm")  # the base models' names
COMPACT_AFTER = 32  # unused slots inside the cache (past the longest row) that trigger a compaction
# model types whose decoder body passes a custom 4D attention mask to every layer unchanged (transformers 5's
# create_causal_mask returns a 4D mask as it is; these bodies use that one mask in every layer), each checked in
# tests/test_hf.py against the model's own forward with the same mask
TENSOR_MASK_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
MASK_ATTENTION = ("sdpa", "eager")  # attention implementations that apply an arbitrary mask (bool, or additive)


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"models.HFTrunk needs the transformers package, which is not installed ({error}): "
                          f"install the project's Hugging Face extra, {INSTALL}") from None
    return transformers


def _torch_dtype(dtype: str | None):
    """None: float32 (what Lightning's mixed precision keeps its weights in); "auto": the checkpoint's own."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, bfloat16, float16 or auto")
    return value


def load_causal_lm(pretrained: str, dtype: str | None = None):
    """`AutoModelForCausalLM.from_pretrained(pretrained)` (a hub id or a local folder), in `dtype`."""
    transformers = _transformers()
    from packaging.version import Version
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained, **{key: _torch_dtype(dtype)})
    except OSError as error:  # a missing folder, an unknown id, no network: the user's setting, said as such
        raise ValueError(f"cannot load the pretrained model {pretrained!r} ({error}): give a local folder written by "
                      f"save_pretrained, or a hub id on a machine that reaches the hub "
                      f"(model.init_args.trunk.init_args.pretrained)") from None


def pretrained_embeddings(pretrained: str, dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input embedding [V, D], output head [V, D] or None where the model ties it to the input embedding) of a
    causal LM, without a trunk (an `HFTrunk` hands its own to the objective). It loads the model.

    V is the model's embedding rows, which may exceed its tokenizer's vocabulary (rows padded to a multiple of 64
    or 128): a warm start copies the first `vocab_size` rows. What the model's head does beyond a matrix product
    (a bias, Gemma-2's logit soft-capping, Cohere's logit scale) is not carried: a head with a bias is refused.
    """
    embedding, head, bias = _embedding_and_head(load_causal_lm(pretrained, dtype))
    _refuse_a_head_bias(pretrained, bias)
    return embedding, head


def _embedding_and_head(lm) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(input embedding, output head or None where tied to it, whether the head has a bias)."""
    embedding = lm.get_input_embeddings().weight.detach()
    head = lm.get_output_embeddings()
    if head is None or head.weight.data_ptr() == embedding.data_ptr():
        return embedding, None, False
    return embedding, head.weight.detach(), getattr(head, "bias", None) is not None


def _refuse_a_head_bias(pretrained: str, bias: bool) -> None:
    if bias:
        raise NotImplementedError(f"{pretrained}'s output head has a bias, which the objective's unembedding (a "
                                  f"matrix) cannot hold")


def model_file(pretrained: str, name: str) -> str | None:
    """The path of a file of the model's folder (or, for a hub id, of its repository, downloaded or cached), or None
    where it has no such file or the hub cannot be reached."""
    folder = Path(pretrained)
    if folder.is_dir():
        return str(folder / name) if (folder / name).is_file() else None
    try:
        from transformers.utils import cached_file
        return cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except Exception:  # an id the hub does not know, a gated repository: the model has no file we can read
        return None


def _cache_keyword(body: nn.Module) -> str:
    """transformers 5 calls the model's cache argument `cache`; before, `past_key_values`."""
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _has_sliding_window(config) -> bool:
    """Whether some layer of the model attends within a sliding window (per-layer kinds in transformers 5, or a
    window for every layer, as Mistral's config gives one)."""
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        return any(kind != "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is not None


@functools.lru_cache(maxsize=1)
def _transformers_before_5() -> bool:
    from packaging.version import Version
    return Version(_transformers().__version__) < Version("5.0")


def tensor_mask_refusal(config) -> str | None:
    """Why a model of this config cannot take a mask tensor through `HFTrunk` (None: it can)."""
    version = _transformers().__version__
    kind = getattr(config, "model_type", "?")
    if _transformers_before_5():
        return (f"transformers {version} is older than 5.0, from which a custom 4D attention mask reaches the "
                f"layers of a {kind} model unchanged")
    if kind not in TENSOR_MASK_MODEL_TYPES:
        return (f"model type {kind!r} is not among those whose body is known to pass a custom 4D attention mask to "
                f"every layer unchanged ({', '.join(TENSOR_MASK_MODEL_TYPES)})")
    if _has_sliding_window(config):
        return (f"this {kind} model attends within a sliding window (sliding_window "
                f"{getattr(config, 'sliding_window', None)}), which a custom 4D mask would replace")
    implementation = getattr(config, "_attn_implementation", None)  # None: not set yet, the default (sdpa)
    if implementation is not None and implementation not in MASK_ATTENTION:
        return (f"its attention implementation {implementation!r} applies no arbitrary mask "
                f"({' and '.join(MASK_ATTENTION)} do)")
    return None


class SlotKeysValues(NamedTuple):
    """One layer's cached keys and values [B, H, S, head_dim], by cache slot (not by position: see HFDecodingCache)."""
    keys: torch.Tensor
    values: torch.Tensor


def _layer_tensors(cache) -> list[SlotKeysValues]:
    """(keys, values) [B, H, S, head_dim] per layer of a DynamicCache (its iteration yields them first in every
    version; transformers 5 adds a sliding-window entry)."""
    return [SlotKeysValues(entry[0], entry[1]) for entry in cache]


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    cache = _transformers().DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


class HFDecodingCache:
    """The decoding state of an `HFTrunk` (`models.contracts.DecodingState`) over a transformers `DynamicCache`.

    `slots` [B, S]: which of the cache's S slots hold a real key of each row; row b's real keys are its positions
    0 .. lengths[b] - 1 in slot order. Forwards append slots for every row (padding slots marked unused); `crop`
    unmarks a row's slots past its new length; `fork` copies rows. Iteration gives each layer's (keys, values).
    """

    def __init__(self, batch_size: int, device, hf_cache=None, slots: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None):
        self.hf_cache = hf_cache if hf_cache is not None else _transformers().DynamicCache()
        self.slots = slots if slots is not None else torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self._lengths = lengths if lengths is not None else torch.zeros(batch_size, dtype=torch.long, device=device)
        self._longest: int | None = 0 if lengths is None else None  # kept on the host, computed when asked

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def length(self) -> int:
        if self._longest is None:
            self._longest = int(self._lengths.max()) if self._lengths.numel() else 0
        return self._longest

    def advance(self, real: torch.Tensor) -> None:
        """Record a forward's new slots, real [B, T] (True = a real token of the row)."""
        self.slots = torch.cat([self.slots, real], 1)
        self._lengths = self._lengths + real.sum(1)
        self._longest = None

    def crop(self, length: int | torch.Tensor) -> None:
        """Forget every position of a row from `length` on (an int for every row, or a [B] tensor)."""
        n = as_lengths(length, self._lengths)
        if bool(((n < 0) | (n > self._lengths)).any()):
            raise ValueError(f"cannot crop a cache of {self._lengths.tolist()} positions to {n.tolist()}")
        self.slots = self.slots & (self.slots.long().cumsum(1) <= n[:, None])
        self._lengths = n
        self._longest = int(length) if isinstance(length, int) else None
        self._release()

    def _release(self) -> None:
        """Cut off the end the slots no row uses; gather each row's keys to the front when unused slots pile up."""
        used = self.slots.any(0).nonzero()
        keep = int(used[-1]) + 1 if used.numel() else 0
        width = self.slots.shape[1]
        if keep < width:
            self.hf_cache.crop(keep - width)  # a negative crop removes that many slots (every version)
            self.slots = self.slots[:, :keep]
        if keep - self.length >= COMPACT_AFTER:
            self._compact()

    def _compact(self) -> None:
        longest = self.length
        # each row's used slots first, in their order (a stable sort), then as many columns as the longest row
        order = torch.argsort((~self.slots).to(torch.int8), dim=1, stable=True)[:, :longest]
        layers = []
        for keys, values in _layer_tensors(self.hf_cache):
            index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            layers.append((keys.gather(2, index), values.gather(2, index)))
        self.hf_cache = _cache_from(layers)
        self.slots = torch.arange(longest, device=self.slots.device)[None] < self._lengths[:, None]

    def fork(self, index) -> "HFDecodingCache":
        """A new cache whose rows are copies of the rows `index` (ints or a LongTensor [N], repeats allowed)."""
        index = as_index(index, self._lengths.device)
        layers = [(keys[index], values[index]) for keys, values in _layer_tensors(self.hf_cache)]
        return HFDecodingCache(len(index), self._lengths.device, _cache_from(layers), self.slots[index],
                               self._lengths[index])

    def __iter__(self) -> Iterator[SlotKeysValues]:
        """Each layer's (keys, values) by slot: a row's keys are where `slots` says, not at its positions, so tree
        drafts (which move keys by position, `compact_to_path`) stop with a message to use chain drafts."""
        return iter(_layer_tensors(self.hf_cache))


class _NoTokenEmbedding(nn.Module):
    """What stands in a trunk for the model's token embedding: the trunk is fed embeddings (`inputs_embeds`), so
    it holds no parameter, only an empty-sized buffer with the width and dtype that code reading the attribute
    may ask for."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.zeros(0, width, dtype=dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a Hugging Face trunk takes embeddings, not token ids: the objective embeds the tokens")


class _HFStack(nn.Module):
    """What a trunk and its blocks share: a transformers base model (`self.body`) run on embeddings, with the
    project's masks, per-row positions, key padding and decoding cache.

    Masks: "causal", and a mask tensor where the model takes one (`supported_masks`, `tensor_mask_refusal`; the
    module docstring says how).
    """

    @property
    def supported_masks(self) -> tuple[str, ...]:
        return ("causal",) if self.tensor_mask_refusal else ("causal", "tensor")

    @property
    def tensor_mask_refusal(self) -> str | None:
        """Why this model takes no mask tensor (None: it takes one)."""
        return tensor_mask_refusal(self.body.config)

    def _attach(self, body: nn.Module, max_seq_len: int) -> None:
        self.body = body
        self.max_seq_len = max_seq_len
        self._cache_keyword = _cache_keyword(body)
        self._drop_token_embedding()

    def _drop_token_embedding(self) -> None:
        # the objective owns the embedding: a stand-in without parameters keeps the model's attribute in place
        weight = self.body.get_input_embeddings().weight
        self.body.set_input_embeddings(_NoTokenEmbedding(weight.shape[1], weight.dtype))

    def make_cache(self, batch_size: int, device=None, dtype=None) -> HFDecodingCache:
        """An empty decoding state for `batch_size` rows (its keys take the model's dtype; `dtype` is not used)."""
        return HFDecodingCache(batch_size, device or next(self.body.parameters()).device)

    def forward(self, x: torch.Tensor, *, mask="causal", cache: HFDecodingCache | None = None,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> hidden states [B, T, D] after the model's final norm.

        cache: an `HFDecodingCache` (`make_cache`): the T positions follow each row's cached ones, and the cache
            advances by each row's real tokens.
        positions: position ids [B, T] or [T]; default each row's next positions (real tokens numbered
            consecutively when padded).
        padding_mask: [B, T] bool, True = a real token: padding is never attended to; with a cache it must come
            after each row's real tokens, without one it may come before (left padding) or after.
        """
        if isinstance(mask, torch.Tensor):
            refusal = self.tensor_mask_refusal
            if refusal:
                raise ValueError(f"this Hugging Face trunk ({self.body.config.model_type}) takes no mask tensor: "
                                 f"{refusal}; use a models.Transformer trunk for mask tensors")
        elif mask != "causal":
            raise ValueError(f"the Hugging Face trunk takes no {mask!r} mask: it wraps a causal LM, whose layers "
                             f"promise only causal attention (and, for {', '.join(TENSOR_MASK_MODEL_TYPES)}, a mask "
                             f"tensor); use a models.Transformer trunk for other masks")
        B, T, _ = x.shape
        real = None if padding_mask is None else padding_mask.to(device=x.device, dtype=torch.bool)
        if real is not None:  # the project's rule: left or right padding, and right padding only with a cache
            check_padding(real, "Hugging Face trunk's decoding cache" if cache is not None else "Hugging Face trunk",
                          at_the_end=cache is not None)
        if positions is None and (cache is not None or real is not None):
            offsets = (real.long().cumsum(1) - 1).clamp(min=0) if real is not None else torch.arange(T, device=x.device)
            positions = offsets + (cache.lengths[:, None] if cache is not None else 0)
        if positions is not None:
            positions = positions.to(x.device).expand(B, T)
            if positions.numel():
                check_length(int(positions.max()) + 1, self.max_seq_len, "trunk")
        if cache is not None:
            check_length(cache.length + T, self.max_seq_len, "trunk")
        new = real if real is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        # a 2D mask whenever positions are given: without one transformers reads restarting positions as packing
        if isinstance(mask, torch.Tensor):
            attention_mask = self._slot_mask(mask, T, cache, new)
        else:
            attention_mask = torch.cat([cache.slots, new], 1) if cache is not None else (
                new if real is not None or positions is not None else None)
        inputs = {"inputs_embeds": x.to(self._dtype()), "attention_mask": attention_mask,
                  "position_ids": positions, "use_cache": cache is not None}
        if cache is not None:
            inputs[self._cache_keyword] = cache.hf_cache
            with self._no_checkpointing():  # checkpointed layers skip the cache in training
                hidden = self.body(**inputs).last_hidden_state
            cache.advance(new)
        else:
            hidden = self.body(**inputs).last_hidden_state
        return hidden.to(x.dtype)

    def _slot_mask(self, mask: torch.Tensor, T: int, cache: HFDecodingCache | None, real: torch.Tensor
                   ) -> torch.Tensor:
        """The project's mask tensor (keys by row position: [B, H, T, S], S = cached positions + T; 3D [B, T, S]
        and 2D [T, S] as the project's transformer reads them) as the model's 4D attention mask, keys by cache slot
        [B, H, T, slots + T]: a used slot takes its position's column, unused slots and padding keys (real [B, T]
        False) are never attended, a padding query attends to itself alone (its output is never used; a query
        with no key would give NaN). Boolean for sdpa, additive (0 / the dtype's minimum) for eager attention."""
        B, device = real.shape[0], real.device
        m = mask.to(device=device, dtype=torch.bool)
        m = m[None, None] if m.dim() == 2 else (m[:, None] if m.dim() == 3 else m)
        cached = cache.length if cache is not None else 0
        S = cached + T
        if m.dim() != 4 or m.shape[-2] != T or m.shape[-1] != S:
            raise ValueError(f"a mask tensor for {T} queries after {cached} cached positions is [B, H, {T}, {S}] "
                             f"(True = attend), got {tuple(mask.shape)}")
        m = m.expand(B, m.shape[1], T, S)
        step = torch.arange(T, device=device)
        if cache is not None:
            used = cache.slots
            index = torch.cat([(used.long().cumsum(1) - 1).clamp(min=0), cache.lengths[:, None] + step], 1)
            keys = torch.cat([used, real], 1)
        else:
            index, keys = step.expand(B, T), real
        width = index.shape[1]
        allowed = m.gather(3, index[:, None, None, :].expand(B, m.shape[1], T, width)) & keys[:, None, None, :]
        if not bool(real.all()):
            itself = (torch.arange(width, device=device)[None, :] == (width - T) + step[:, None])  # [T, width]
            allowed = torch.where(~real[:, None, :, None], itself, allowed)
        if getattr(self.body.config, "_attn_implementation", None) == "eager":
            dtype = self._dtype()
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    def _dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype

    @contextlib.contextmanager
    def _no_checkpointing(self):
        flagged = [m for m in self.body.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for module in flagged:
            module.gradient_checkpointing = False
        try:
            yield
        finally:
            for module in flagged:
                module.gradient_checkpointing = True


class HFTrunk(_HFStack):
    """The decoder body of a Hugging Face causal LM as a trunk (embeddings in, hidden states out).

    Args:
        pretrained: a hub id ("gpt2", "meta-llama/Llama-3.2-1B") or a folder written by `save_pretrained`.
        freeze_trunk: no gradient for any weight of the model, which also stays in eval mode (no dropout): train
            only what the objective adds (Medusa-1's heads on a frozen model).
        gradient_checkpointing: recompute each layer's activations in the backward (transformers' activation
            checkpointing), where the model offers it; cached forwards run without it.
        dtype: the weights' dtype: None float32, "bfloat16", "float16", or "auto" (the checkpoint's own).
        max_seq_len: positions the trunk accepts, cached ones included; default the config's
            max_position_embeddings. Above it, absolute-position models (GPT-2) fail and rotary ones extrapolate.

    The objective takes the model's embedding and output head when it is built (`take_pretrained_embeddings`,
    `tied_embeddings`), and at setup the file of heads export_hf.py wrote beside the model (`pretrained_heads`); the
    data's tokenizer must be the folder's `tokenizer.json` (`--data.init_args.tokenizer_path`, which the CLI sets
    itself for a local folder; `tokenizer_vocab` is what the objective checks it against). Sliding-window models
    (Mistral, Gemma-2) count their window in cache slots, which can exceed positions after ragged prefills and
    per-row crops; models whose cache is not a plain `DynamicCache` (linear-attention hybrids, encoder-decoders)
    are not supported.
    """

    def __init__(self, pretrained: str, freeze_trunk: bool = False, gradient_checkpointing: bool = False,
                 dtype: str | None = None, max_seq_len: int | None = None):
        super().__init__()
        lm = load_causal_lm(pretrained, dtype)
        config = lm.config
        self.pretrained, self.freeze_trunk = pretrained, freeze_trunk
        # kept (outside the state dict) until the objective takes them: the trunk does not own them
        embedding, head, bias = _embedding_and_head(lm)
        self.tied_embeddings = head is None
        self._handover: tuple | None = (embedding, head, bias)
        self.d_model, self.n_layers = int(config.hidden_size), int(config.num_hidden_layers)
        self._attach(lm.base_model, int(max_seq_len or config.max_position_embeddings))
        if gradient_checkpointing:
            if not getattr(self.body, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.body).__name__} offers no gradient checkpointing: set "
                                 f"model.init_args.trunk.init_args.gradient_checkpointing false")
            if hasattr(self.body, "activation_checkpointing_enable"):  # its name from transformers 5 on
                self.body.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if freeze_trunk:
            self.body.requires_grad_(False)
            self.body.eval()

    @property
    def config(self):
        return self.body.config

    def take_pretrained_embeddings(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The model's input embedding [V, D] and output head [V, D] (None where the model ties the head to the
        embedding: then `tied_embeddings` is true), handed over once, for the objective's embedding and
        unembedding: the trunk keeps no reference to them (a second call gives None)."""
        handover, self._handover = self._handover, None
        if handover is None:
            return None
        embedding, head, bias = handover
        _refuse_a_head_bias(self.pretrained, bias)
        return embedding, head

    def pretrained_heads(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The tensors export_hf.py wrote beside the model (`HEADS_FILE`: multi-token heads, DeepSeek modules,
        summary heads, under the names an objective over this trunk gives them) and the file's metadata (the
        exported objective's class_path and hyperparameters); None where the model has no such file."""
        path = model_file(self.pretrained, HEADS_FILE)
        if path is None:
            return None
        from safetensors import safe_open
        with safe_open(path, "pt") as heads:
            return {name: heads.get_tensor(name) for name in heads.keys()}, dict(heads.metadata() or {})

    def tokenizer_vocab(self) -> dict[str, int] | None:
        """token -> id of the model's `tokenizer.json` (what the data must tokenize with), or None where the model
        has none (a tokenizer in another format only)."""
        path = model_file(self.pretrained, "tokenizer.json")
        if path is None:
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)

    def __getattr__(self, name: str):
        if name == "blocks":  # what multi-token prediction's match_params cuts from a project trunk
            raise AttributeError(
                "HFTrunk gives no list of blocks to cut: multi-token prediction's match_params (heads at the "
                "parameter count of next-token prediction) removes the trunk's last layers for fresh heads, which on a "
                "pretrained model would cut layers it was trained with; set model.init_args.match_params false "
                "(the heads then add to the model's parameters, as Medusa's and Gloeckle et al.'s fine-tuned heads do)")
        return super().__getattr__(name)

    def train(self, mode: bool = True) -> "HFTrunk":
        super().train(mode)
        if self.freeze_trunk:  # a frozen model keeps its dropout off
            self.body.eval()
        return self

    def make_block(self) -> "HFBlock":
        """A fresh decoder layer of the model's class and config, initialised as the model initialises its own
        (`HFBlock`), in the model's dtype and on its device."""
        parameter = next(self.body.parameters())
        return HFBlock(type(self.body), self.config, self.max_seq_len).to(parameter.device, parameter.dtype)


class HFBlock(_HFStack):
    """One fresh decoder layer of a Hugging Face model class: `block(x, cache=...)` maps [B, T, D] to [B, T, D],
    `block.make_cache(batch_size, device, dtype)` gives its decoding state (what multi-token heads and DeepSeek's
    MTP modules need of a block).

    It is a one-layer model of the trunk's class with the trunk's config, its token embedding dropped and its final
    norm removed, so it is x + attention + MLP as the family computes them, with whatever the family does to its
    input embeddings first: GPT-2 adds a (fresh, learned) position embedding, Gemma scales by sqrt(D).
    """

    def __init__(self, body_class: type, config, max_seq_len: int):
        super().__init__()
        config = copy.deepcopy(config)
        config.num_hidden_layers = 1
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (transformers 5)
            config.layer_types = config.layer_types[:1]
        config.vocab_size = 1  # its token embedding is never used: no special token lies in a vocabulary of one
        config.pad_token_id = config.bos_token_id = config.eos_token_id = None
        body = body_class(config)
        name = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(body, n, None), nn.Module)), None)
        if name is None:
            raise NotImplementedError(
                f"make_block: {body_class.__name__} has no final norm under a known name "
                f"({', '.join(FINAL_NORM_NAMES)}), so no block can be cut from it; multi-token heads with head_type "
                f"'block' and DeepSeek's MTP modules need one: use head_type 'mlp' (Medusa's heads) on this model")
        setattr(body, name, nn.Identity())
        self.d_model, self.n_layers = int(config.hidden_size), 1
        self._attach(body, max_seq_len)
