# Modern decoder LMs (LLaMA, Mistral, Qwen, Gemma, OLMo, Granite, ...) as pipeline layers, through one family module.
"""One family module for every Hugging Face family shaped ``embed_tokens -> layers -> norm -> lm_head``.

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
layer type and ``position_ids``. Masks (``pptk.models.protocol.attention_mask_for``) and rotary tables
(``RotaryTables``) are rebuilt on every stage from the protocol's int64 tensors, once per stage and micro-batch.

What the model-level ``forward`` code does beyond that shape cannot be read from modules, so ``FAMILIES``
(pptk/models/decoder_families.py) lists it per model type (Granite's embedding multiplier and logit scaling,
Cohere's logit scale, Gemma 2's final-logit soft-capping, StarCoder2's embedding dropout). Only the families in that
table are registered, and each one is checked against Hugging Face by the parity tests (tests/unit/test_decoder.py,
tests/distributed/test_decoder_dist.py);
a test also checks that the table covers every config field the families' model-level code reads, so a
transformers upgrade that adds model-level behaviour fails loudly instead of training something different.

Mixture-of-experts families (``MOE_FAMILIES``: Mixtral, Qwen2/3-MoE, OLMoE, FlexOlmo, GraniteMoE, gpt-oss,
DeepSeek-V3) run their own layers the same way; when Hugging Face would add the router load-balancing loss, each
block also adds its routers' partial sums to the stage tensors and the LM head passes them to the loss
(pptk.models.moe; checked by tests/unit/test_moe.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pptk.models import ModelFamily, PipeLayer, register
from pptk.models.common import (
    WORD_EMBEDDINGS,
    FinalNormPipe,
    LMHeadPipe,
    TokenEmbeddingPipe,
    init_layer_like_hf,
    tied_lm_logits,
)
from pptk.models.decoder_families import FAMILIES, MOE_FAMILIES, SMALL_COMMON, Family, family_of
from pptk.models.decoder_parts import DecoderParts, check_supported, decoder_parts, layer_mask_kinds
from pptk.models.heads import ScoreHeadPipe, reward_layers
from pptk.models.moe import RouterCapture, layer_sums, router_capture, router_loss_of
from pptk.models.protocol import StageMasks, StageTensors

PREFIX = "model."  # <Family>ForCausalLM.base_model_prefix

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
        router: RouterCapture | None = None,
    ):
        super().__init__(config, layer_idx)
        self.pipe_config = config
        self.mask_kind = mask_kind
        self.masks = masks  # shared by the model's blocks: one mask per micro-batch and kind, not per layer
        self.rotary = rotary  # a plain object, not a submodule (see RotaryTables)
        self.rotary_layer_type = layer_type if rotary.per_layer_type else None
        # mixture of experts with a router loss: this block adds its routers' partial sums (pptk.models.moe)
        # (not "router": some families' layers may hold a submodule of that name)
        self.router_capture = router if router is not None and router.routers(self) else None

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        capture = self.router_capture
        if capture is None:
            return stage.with_hidden(self._layer_forward(stage)).as_tuple()
        with capture.logits(self) as router_logits:
            hidden = self._layer_forward(stage)
        sums = [layer_sums(logits, stage.attention_mask, top_k=capture.top_k) for logits in router_logits]
        block_sums = sum(sums[1:], sums[0]) if sums else None
        return stage.with_hidden(hidden).with_router(block_sums).as_tuple()

    def _layer_forward(self, stage: StageTensors) -> torch.Tensor:
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
        return hidden


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


class RouterLMHeadPipe(LMHeadPipe):
    """The untied LM head of a model with a router loss: the router sums follow the logits to the loss."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return (super().forward(inputs), *inputs[3:])


def tied_lm_logits_and_router(embedding: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """forward_fn of a tied LM head with a router loss: (logits, *router sums)."""
    return (tied_lm_logits(embedding, inputs), *inputs[3:])  # type: ignore[arg-type]


class LogitsPipe(nn.Module):
    """What a family's ForCausalLM.forward does to the LM head's output: ("mul" | "div" | "softcap", value)s.
    A tuple (logits, *router sums) keeps its router sums."""

    def __init__(self, ops: tuple[tuple[str, float], ...]):
        super().__init__()
        self.ops = ops

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if isinstance(output, tuple):
            return (self._scale(output[0]), *output[1:])
        return self._scale(output)

    def _scale(self, logits: torch.Tensor) -> torch.Tensor:
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


def _body_layers(
    config: PretrainedConfig, parts: DecoderParts, *, router: RouterCapture | None, tied: bool
) -> tuple[list[PipeLayer], tuple, dict]:
    """Embedding, decoder layers and final norm; also the embedding's arguments, for a tied LM head.

    tied: the embedding is a TiedLayerSpec (an LM head shares its matrix), else a plain layer (a classifier)."""
    family = table_entry(config.model_type)
    check_supported(config, parts, moe=family.moe)
    mask_kinds = layer_mask_kinds(config)
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers

    embed_args = (config.vocab_size, config.hidden_size)
    embed_kwargs: dict[str, Any] = dict(
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
    embed = (
        TiedLayerSpec(WORD_EMBEDDINGS, DecoderEmbeddingPipe, *embed_args, **embed_kwargs, tied_weight_attr="weight")
        if tied
        else LayerSpec(DecoderEmbeddingPipe, *embed_args, **embed_kwargs)
    )
    layers = [PipeLayer(embed, "embed", PREFIX + "embed_tokens.")]

    rotary = RotaryTables(parts.rotary_class, config, per_layer_type=parts.rotary_per_layer_type)
    masks = StageMasks()
    block = layer_pipe_class(parts.layer_class)
    layers += [
        PipeLayer(
            LayerSpec(
                block,
                config,
                i,
                mask_kind=mask_kinds[i],
                masks=masks,
                rotary=rotary,
                layer_type=layer_types[i],
                router=router,
            ),
            "block",
            f"{PREFIX}layers.{i}.",
        )
        for i in range(config.num_hidden_layers)
    ]
    hf_class = parts.causal_lm_class
    final_norm = LayerSpec(FinalNormPipe, materialise_norm, parts.norm, config=config, hf_class=hf_class, attr="norm")
    layers.append(PipeLayer(final_norm, "head", PREFIX))
    return layers, embed_args, embed_kwargs


def causal_lm_layers(config: PretrainedConfig) -> list[PipeLayer]:
    family = table_entry(config.model_type)
    router_loss = router_loss_of(config, moe=family.moe)
    parts = decoder_parts(config)
    router = router_capture(parts.causal_lm_class, top_k=router_loss.top_k) if router_loss else None
    layers, embed_args, embed_kwargs = _body_layers(config, parts, router=router, tied=True)
    if config.tie_word_embeddings:
        head = TiedLayerSpec(
            WORD_EMBEDDINGS,
            DecoderEmbeddingPipe,
            *embed_args,
            **embed_kwargs,
            tied_weight_attr="weight",
            forward_fn=tied_lm_logits_and_router if router else tied_lm_logits,
        )
        layers.append(PipeLayer(head, "head", PREFIX + "embed_tokens."))
    else:
        head_class = RouterLMHeadPipe if router else LMHeadPipe
        layers.append(PipeLayer(LayerSpec(head_class, config.hidden_size, config.vocab_size), "head", ""))
    ops = tuple((op, float(getattr(config, name))) for op, name in family.logits if getattr(config, name) is not None)
    if ops:
        layers.append(PipeLayer(LayerSpec(LogitsPipe, ops), "head", ""))
    return layers


def sequence_classification_layers(config: PretrainedConfig) -> list[PipeLayer]:
    """``<Family>ForSequenceClassification`` (transformers' GenericForSequenceClassification): the base model, then
    ``score`` on each row's last token. No router loss (only ``*ForCausalLM`` adds it) and no logit scaling (only
    the LM head's). The head is optional: a base or causal-LM checkpoint has none, and it starts freshly."""
    layers, _, _ = _body_layers(config, decoder_parts(config), router=None, tied=False)
    score = LayerSpec(ScoreHeadPipe, config.hidden_size, config.num_labels)
    return [*layers, PipeLayer(score, "head", "score.", optional=True)]


def has_sequence_classifier(model_type: str) -> bool:
    """transformers has a ``*ForSequenceClassification`` for this family."""
    from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

    return CONFIG_MAPPING[model_type] in AutoModelForSequenceClassification._model_mapping


def table_entry(model_type: str) -> Family:
    family = family_of(model_type)
    assert family is not None, model_type  # only registered families reach here
    return family


def small_config_of(model_type: str) -> Callable[[], PretrainedConfig]:
    def small_config() -> PretrainedConfig:
        return AutoConfig.for_model(model_type, **{**SMALL_COMMON, **table_entry(model_type).small})

    return small_config


def tasks_of(model_type: str) -> dict[str, Callable[[PretrainedConfig], list[PipeLayer]]]:
    tasks: dict[str, Callable[[PretrainedConfig], list[PipeLayer]]] = {"causal-lm": causal_lm_layers}
    if has_sequence_classifier(model_type):  # a reward model is a one-output sequence classifier
        tasks["sequence-classification"] = sequence_classification_layers
        tasks["reward"] = partial(reward_layers, sequence_classification_layers)
    return tasks


for _model_type, _family in {**FAMILIES, **MOE_FAMILIES}.items():
    register(
        ModelFamily(
            model_type=_model_type,
            tasks=tasks_of(_model_type),
            small_config=small_config_of(_model_type),
            default_task="causal-lm",
            unsupported=_family.unsupported,
        )
    )
