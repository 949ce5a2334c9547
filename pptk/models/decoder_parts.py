# What transformers says a decoder family is made of (read from its own classes), and what pptk refuses.
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from pptk.errors import PptkError
from pptk.models.heads import hf_model_class

PIPELINE_SHAPE = ["embed_tokens", "layers", "norm"]  # base_model_pp_plan of the families this module covers

# Rotary types whose tables depend only on the config and the position ids (which travel), all checked by the tests.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
MASK_KINDS = {"full_attention": "causal", "sliding_attention": "sliding_window"}
# Config fields that mean a mixture-of-experts block: refused unless the family's table entry declares its MoE kind.
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
    if plan and plan != PIPELINE_SHAPE:
        raise PptkError(
            f"{config.model_type}: transformers' base_model_pp_plan is {plan or 'missing'}, not "
            f"{PIPELINE_SHAPE}; the decoder family module covers only families of that shape"
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
    children = [name for name, _ in shell.named_children() if name != "rotary_emb"]
    if not plan and children != PIPELINE_SHAPE:
        # No plan declared (OLMoE, GraniteMoE): the base model's own modules must have the shape.
        raise PptkError(
            f"{config.model_type}: transformers' base_model_pp_plan is missing and {base_class.__name__} holds "
            f"{children}, not {PIPELINE_SHAPE}; the decoder family module covers only families of that shape"
        )
    if not hasattr(shell, "rotary_emb"):
        raise PptkError(
            f"{config.model_type}: {base_class.__name__} has no model-level rotary_emb; the decoder "
            "family module covers only families whose rotary tables are computed once per model"
        )
    layer_class = type(shell.layers[0])
    declared_layers = [name for name in (causal_lm._no_split_modules or []) if name.endswith("DecoderLayer")]
    if declared_layers != [layer_class.__name__]:
        raise PptkError(
            f"{config.model_type}: expected one decoder-layer class, transformers declares "
            f"{declared_layers}; per-layer block types are not covered by the decoder family module"
        )
    embed = shell.embed_tokens
    embed_scale = getattr(embed, "scalar_embed_scale", None)
    if type(embed) is not nn.Embedding and embed_scale is None:
        raise PptkError(
            f"{config.model_type}: unknown embedding module {type(embed).__name__}; the decoder family module "
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
    """The mask kind of each layer (see pptk.models.protocol.attention_mask_for), as <Family>Model.forward picks it."""
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


def check_supported(config: PretrainedConfig, parts: DecoderParts, *, moe: str | None = None) -> None:
    """Refuse, naming the setting, what the pipeline cannot reproduce exactly.

    moe: the family's mixture-of-experts kind (pptk.models.decoder_families.Family.moe); None refuses MoE fields.
    """
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
    for name in MOE_FIELDS if moe is None else ():
        if getattr(config, name, None):
            raise PptkError(
                f"{config.model_type} config sets {name}={getattr(config, name)!r}: mixture-of-experts "
                "blocks are supported only for the families pptk lists as MoE (`pptk models`)"
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
            "family module does not provide"
        )
