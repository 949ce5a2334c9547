# Modern decoder LMs (LLaMA, Mistral, Qwen, Gemma, OLMo, Granite, ...) as pipeline layers, through one adapter.
"""One adapter for every Hugging Face family shaped ``embed_tokens -> layers -> norm -> lm_head``.

No module, mask or rotary code is written per family: for a config, transformers itself says what to build:

- the shape: the config class's ``base_model_pp_plan`` must be exactly ``embed_tokens, layers, norm``;
- the modules: the family's base model is built once on the meta device (one layer, no memory) and read: the
  decoder-layer class, the final norm (copied, so its constructor never has to be guessed), the rotary-embedding
  class, the embedding's padding index and Gemma-style embedding scale;
- the masks: families whose config declares ``layer_types`` get a mask per layer type ("sliding_attention" ->
  sliding window, "full_attention" -> causal); families that declare only ``sliding_window`` use a sliding-window
  mask on every layer when it is set (Mistral, Phi-3, StarCoder2); the rest are causal (LLaMA);
- rotary tables: per layer type when the family's rotary ``forward`` takes a ``layer_type`` (Gemma 3, OLMo 3).

Each pipeline block *is* the family's decoder layer (a subclass adding only the stage protocol), called with what
``<Family>Model.forward`` passes it in transformers 5.23: ``position_embeddings=(cos, sin)``, the 4-D mask of its
layer type and ``position_ids``. Masks (``pptk.protocol.attention_mask_for``) and rotary tables
(``RotaryTables``) are rebuilt on every stage from the protocol's int64 tensors, once per stage and micro-batch.

What the model-level ``forward`` code does beyond that shape cannot be read from modules, so ``FAMILIES``
(pptk/models/decoder_families.py) lists it per model type (Granite's embedding multiplier and logit scaling,
Cohere's logit scale, Gemma 2's final-logit soft-capping, StarCoder2's embedding dropout). Only the families in that
table are registered, and each one is checked against Hugging Face by the parity tests (tests/unit/test_decoder.py,
tests/distributed/test_decoder_dist.py);
a test also checks that the table covers every config field the families' model-level code reads, so a
transformers upgrade that adds model-level behaviour fails loudly instead of training something different.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from pptk.errors import PptkError
from pptk.models import Adapter, PipeLayer, register
from pptk.models.common import (
    WORD_EMBEDDINGS,
    FinalNormPipe,
    LMHeadPipe,
    TokenEmbeddingPipe,
    init_layer_like_hf,
    tied_lm_logits,
)
from pptk.models.decoder_families import FAMILIES, SMALL_COMMON
from pptk.protocol import StageMasks, StageTensors
from pptk.tasks import hf_model_class

PREFIX = "model."  # <Family>ForCausalLM.base_model_prefix
PIPELINE_SHAPE = ["embed_tokens", "layers", "norm"]  # base_model_pp_plan of the families this adapter covers

# Rotary types whose tables depend only on the config and the position ids (which travel), all checked by the tests.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
MASK_KINDS = {"full_attention": "causal", "sliding_attention": "sliding_window"}
# Config fields that mean a mixture-of-experts block: its router outputs and auxiliary loss have no pipeline form here.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# The keyword arguments <Family>Model.forward passes each layer; a layer that requires anything else is not covered.
LAYER_ARGUMENTS = {
    "hidden_states",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "use_cache",
    "position_embeddings",
    "cache_position",
}


# ---------------------------------------------------------------------------------------------------------------
# What transformers says about a family


@dataclass(frozen=True)
class DecoderParts:
    """The family's own building blocks, read from transformers for one config."""

    causal_lm_class: type[Any]
    layer_class: type[Any]
    rotary_class: type[Any]
    rotary_per_layer_type: bool  # rotary forward(x, position_ids, layer_type): one table per layer type
    norm: nn.Module  # the final norm as the family builds it, on the meta device
    padding_idx: int | None
    embed_scale: float | None  # Gemma-style scaled embedding: embeddings * scale, in the weights' dtype


def _declared_fields(config_class: type[Any]) -> set[str]:
    names: set[str] = set()
    for klass in config_class.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def decoder_parts(config: PretrainedConfig) -> DecoderParts:
    causal_lm = hf_model_class(config, "causal-lm")
    plan = list(getattr(config, "base_model_pp_plan", None) or {})
    if plan != PIPELINE_SHAPE:
        raise PptkError(
            f"{config.model_type}: transformers' base_model_pp_plan is {plan or 'missing'}, not "
            f"{PIPELINE_SHAPE}; the decoder adapter covers only families of that shape"
        )
    try:
        base_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise PptkError(f"transformers has no base model class for {config.model_type!r}") from None
    # One layer is enough to read the classes; eager attention so that a family without SDPA support still builds
    # (whether the requested kernel is supported is checked separately, with a clearer message).
    shell_config = copy.deepcopy(config)
    shell_config.num_hidden_layers = 1
    if getattr(shell_config, "layer_types", None):
        shell_config.layer_types = list(shell_config.layer_types[:1])
    shell_config._attn_implementation = "eager"
    with torch.device("meta"):
        shell = base_class(shell_config)
    if not hasattr(shell, "rotary_emb"):
        raise PptkError(
            f"{config.model_type}: {base_class.__name__} has no model-level rotary_emb; the decoder "
            "adapter covers only families whose rotary tables are computed once per model"
        )
    layer_class = type(shell.layers[0])
    declared_layers = [name for name in (causal_lm._no_split_modules or []) if name.endswith("DecoderLayer")]
    if declared_layers != [layer_class.__name__]:
        raise PptkError(
            f"{config.model_type}: expected one decoder-layer class, transformers declares "
            f"{declared_layers}; per-layer block types are not covered by the decoder adapter"
        )
    embed = shell.embed_tokens
    embed_scale = getattr(embed, "scalar_embed_scale", None)
    if type(embed) is not nn.Embedding and embed_scale is None:
        raise PptkError(
            f"{config.model_type}: unknown embedding module {type(embed).__name__}; the decoder adapter "
            "covers nn.Embedding and the Gemma-style scaled embedding"
        )
    rotary_class = type(shell.rotary_emb)
    return DecoderParts(
        causal_lm_class=causal_lm,
        layer_class=layer_class,
        rotary_class=rotary_class,
        rotary_per_layer_type="layer_type" in inspect.signature(rotary_class.forward).parameters,
        norm=shell.norm,
        padding_idx=embed.padding_idx,
        embed_scale=embed_scale,
    )


def layer_mask_kinds(config: PretrainedConfig) -> list[str]:
    """The mask kind of each layer (see pptk.protocol.attention_mask_for), as <Family>Model.forward picks it."""
    declared = _declared_fields(type(config))
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if "layer_types" in declared:
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None or len(layer_types) != n:
            raise PptkError(
                f"{config.model_type} config: layer_types has {len(layer_types or [])} entries for "
                f"{n} layers; give one per layer (full_attention or sliding_attention)"
            )
        unknown = sorted(set(layer_types) - set(MASK_KINDS))
        if unknown:
            raise PptkError(
                f"{config.model_type} config: layer types {unknown} are not supported by the pipeline; "
                f"supported: {', '.join(MASK_KINDS)}"
            )
        if "sliding_attention" in layer_types and not window:
            raise PptkError(
                f"{config.model_type} config: layer_types has sliding_attention layers but "
                f"sliding_window={window!r} (use_sliding_window="
                f"{getattr(config, 'use_sliding_window', None)!r}); set sliding_window (and "
                "use_sliding_window=true) or make every layer full_attention"
            )
        return [MASK_KINDS[t] for t in layer_types]
    if "sliding_window" in declared and window is not None:
        return ["sliding_window"] * n
    return ["causal"] * n


def _rope_types(config: PretrainedConfig) -> set[str]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or "rope_theta" in params:
        return {params.get("rope_type", "default")}
    return {p.get("rope_type", "default") for p in params.values() if isinstance(p, dict)}  # one per layer type


def check_supported(config: PretrainedConfig, parts: DecoderParts) -> None:
    """Refuse, naming the setting, what the pipeline cannot reproduce exactly."""
    kind = config._attn_implementation
    if kind == "sdpa" and not parts.causal_lm_class._supports_sdpa:
        raise PptkError(
            f"{config.model_type} cannot run with sdpa attention in transformers "
            f"({parts.causal_lm_class.__name__}._supports_sdpa is False, e.g. attention soft-capping); "
            "use attn_implementation='eager' (pptk verify --attn eager)"
        )
    unsupported = sorted(_rope_types(config) - set(SUPPORTED_ROPE_TYPES))
    if unsupported:
        raise PptkError(
            f"{config.model_type} config: rope_type {', '.join(unsupported)} is not verified with "
            f"pptk's pipeline; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    for name in MOE_FIELDS:
        if getattr(config, name, None):
            raise PptkError(
                f"{config.model_type} config sets {name}={getattr(config, name)!r}: mixture-of-experts "
                "blocks are not supported by the decoder adapter"
            )
    required = {
        name
        for name, p in inspect.signature(parts.layer_class.forward).parameters.items()
        if name != "self"
        and p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    missing = sorted(required - LAYER_ARGUMENTS)
    if missing:
        raise PptkError(
            f"{config.model_type}: {parts.layer_class.__name__} requires {missing}, which the decoder "
            "adapter does not provide"
        )


# ---------------------------------------------------------------------------------------------------------------
# Pipeline layers


class RotaryTables:
    """Rotary cos/sin for one model, rebuilt on each stage from the position ids that travel.

    Hugging Face's own rotary class computes them, once per stage, micro-batch and layer type: every block of a
    stage shares this object, and the last tables are kept while the position-id tensor is the same object (as
    ``attention_mask_for`` does for masks). The rotary module is kept out of the layers' module tree on purpose:
    its ``inv_freq`` must stay fp32 when DeepSpeed casts the model to bf16/fp16, and it is built on whichever device
    the stage runs on.
    """

    def __init__(self, rotary_class: type[Any], config: PretrainedConfig, *, per_layer_type: bool):
        self.rotary_class = rotary_class
        self.config = config
        self.per_layer_type = per_layer_type
        self._modules: dict[torch.device, nn.Module] = {}
        self._last: dict[str | None, tuple] = {}

    def __call__(self, stage: StageTensors, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, positions = stage.hidden_states, stage.position_ids
        key = (hidden.dtype, hidden.device)
        cached = self._last.get(layer_type)
        if cached is not None and cached[0] is positions and cached[1] == key:
            return cached[2]
        rotary = self._modules.get(hidden.device)
        if rotary is None:
            with torch.device("cpu"):  # as Hugging Face computes inv_freq, then moves it
                rotary = self.rotary_class(self.config)
            rotary = self._modules[hidden.device] = rotary.to(hidden.device)
        args = (hidden, positions, layer_type) if self.per_layer_type else (hidden, positions)
        tables = rotary(*args)
        self._last[layer_type] = (positions, key, tables)
        return tables


class DecoderLayerPipe(nn.Module):
    """Placed before the family's decoder layer in a generated subclass (``LlamaDecoderLayerPipe``, ...), so the
    parameters, the initialisation and the forward are Hugging Face's; this adds only the stage protocol."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        *,
        mask_kind: str,
        masks: StageMasks,
        rotary: RotaryTables,
        layer_type: str | None,
    ):
        super().__init__(config, layer_idx)
        self.pipe_config = config
        self.mask_kind = mask_kind
        self.masks = masks  # shared by the model's blocks: one mask per micro-batch and kind, not per layer
        self.rotary = rotary  # a plain object, not a submodule (see RotaryTables)
        self.rotary_layer_type = layer_type if rotary.per_layer_type else None

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        hidden = super().forward(
            stage.hidden_states,
            attention_mask=self.masks(self.mask_kind, self.pipe_config, stage),
            position_ids=stage.position_ids,
            position_embeddings=self.rotary(stage, self.rotary_layer_type),
        )
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}: the decoder layer returned {type(hidden).__name__}, expected the "
                "hidden states tensor (transformers 5.x layers return a tensor)"
            )
        return stage.with_hidden(hidden).as_tuple()


def layer_pipe_class(layer_class: type[Any]) -> type[Any]:
    """``<Family>DecoderLayerPipe``: the family's layer speaking the stage protocol, named after it so that
    DeepSpeed's ``type:`` partitioning and activation checkpointing select blocks by name. Made per layer list (the
    blocks of one model share it); nothing is registered process-wide."""
    name = f"{layer_class.__name__}Pipe"
    return type(
        name,
        (DecoderLayerPipe, layer_class),
        {"__module__": __name__, "__qualname__": name, "__doc__": f"{layer_class.__name__} on the pipeline."},
    )


class DecoderEmbeddingPipe(TokenEmbeddingPipe):
    """The token embedding (tied to a tied LM head) with what some families do right after the lookup.

    scale: Gemma's sqrt(hidden) when ``scale_in_weight_dtype`` (its normaliser is cast to the weights' dtype first),
    Granite's embedding_multiplier otherwise (a Python float, as Hugging Face multiplies it).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        padding_idx: int | None,
        max_positions: int | None,
        positions_in_inputs: bool = False,
        scale: float | None = None,
        scale_in_weight_dtype: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(
            vocab_size,
            hidden_size,
            padding_idx=padding_idx,
            max_positions=max_positions,
            positions_in_inputs=positions_in_inputs,
        )
        self.scale = scale
        self.scale_in_weight_dtype = scale_in_weight_dtype
        self.dropout = dropout

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        hidden, *rest = super().forward(inputs)
        if self.scale is not None:
            if self.scale_in_weight_dtype:
                hidden = hidden * torch.tensor(self.scale, device=hidden.device).to(self.weight.dtype)
            else:
                hidden = hidden * self.scale
        if self.dropout:
            hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        return (hidden, *rest)


class LogitsPipe(nn.Module):
    """What a family's ForCausalLM.forward does to the LM head's output: ("mul" | "div" | "softcap", value)s."""

    def __init__(self, ops: tuple[tuple[str, float], ...]):
        super().__init__()
        self.ops = ops

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        for op, value in self.ops:
            if op == "mul":
                logits = logits * value
            elif op == "div":
                logits = logits / value
            else:  # softcap, as Gemma 2: tanh(logits / cap) * cap
                logits = torch.tanh(logits / value) * value
        return logits

    def extra_repr(self) -> str:
        return ", ".join(f"{op} {value}" for op, value in self.ops)


def materialise_norm(meta_norm: nn.Module, *, config: PretrainedConfig, hf_class: type[Any]) -> nn.Module:
    """A real copy of the family's final norm (built on the meta device), initialised as Hugging Face does."""
    norm = copy.deepcopy(meta_norm).to_empty(device=torch.empty(0).device)
    init_layer_like_hf(norm, config=config, hf_class=hf_class, seed=0)
    return norm


def causal_lm_layers(config: PretrainedConfig) -> list[PipeLayer]:
    family = FAMILIES[config.model_type]
    parts = decoder_parts(config)
    check_supported(config, parts)
    mask_kinds = layer_mask_kinds(config)
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    hf_class = parts.causal_lm_class

    embed_args = (config.vocab_size, config.hidden_size)
    embed_kwargs = dict(
        padding_idx=parts.padding_idx,
        max_positions=getattr(config, "max_position_embeddings", None),
        positions_in_inputs=True,
    )
    if parts.embed_scale is not None:
        embed_kwargs.update(scale=float(parts.embed_scale), scale_in_weight_dtype=True)
    elif family.embedding_multiplier:
        embed_kwargs.update(scale=float(getattr(config, family.embedding_multiplier)))
    if family.embedding_dropout:
        embed_kwargs.update(dropout=float(getattr(config, family.embedding_dropout) or 0.0))
    embed = TiedLayerSpec(WORD_EMBEDDINGS, DecoderEmbeddingPipe, *embed_args, **embed_kwargs, tied_weight_attr="weight")
    layers = [PipeLayer(embed, "embed", PREFIX + "embed_tokens.")]

    rotary = RotaryTables(parts.rotary_class, config, per_layer_type=parts.rotary_per_layer_type)
    masks = StageMasks()
    block = layer_pipe_class(parts.layer_class)
    layers += [
        PipeLayer(
            LayerSpec(block, config, i, mask_kind=mask_kinds[i], masks=masks, rotary=rotary, layer_type=layer_types[i]),
            "block",
            f"{PREFIX}layers.{i}.",
        )
        for i in range(config.num_hidden_layers)
    ]

    final_norm = LayerSpec(FinalNormPipe, materialise_norm, parts.norm, config=config, hf_class=hf_class, attr="norm")
    layers.append(PipeLayer(final_norm, "head", PREFIX))
    if config.tie_word_embeddings:
        head = TiedLayerSpec(
            WORD_EMBEDDINGS,
            DecoderEmbeddingPipe,
            *embed_args,
            **embed_kwargs,
            tied_weight_attr="weight",
            forward_fn=tied_lm_logits,
        )
        layers.append(PipeLayer(head, "head", PREFIX + "embed_tokens."))
    else:
        layers.append(PipeLayer(LayerSpec(LMHeadPipe, config.hidden_size, config.vocab_size), "head", ""))
    ops = tuple((op, float(getattr(config, name))) for op, name in family.logits if getattr(config, name) is not None)
    if ops:
        layers.append(PipeLayer(LayerSpec(LogitsPipe, ops), "head", ""))
    return layers


def small_config_of(model_type: str) -> Callable[[], PretrainedConfig]:
    def small_config() -> PretrainedConfig:
        return AutoConfig.for_model(model_type, **{**SMALL_COMMON, **FAMILIES[model_type].small})

    return small_config


for _model_type, _family in FAMILIES.items():
    register(
        Adapter(
            model_type=_model_type,
            tasks={"causal-lm": causal_lm_layers},
            small_config=small_config_of(_model_type),
            unsupported=_family.unsupported,
        )
    )
