# BERT as pipeline layers: embeddings (word tied to the MLM decoder), transformers' own BertLayer, three task heads.
"""Layer list (``hf_prefix`` in brackets, as in ``BertFor*.named_parameters()``)::

    TokenEmbeddingPipe        embed  [bert.embeddings.word_embeddings.]   tied: WORD_EMBEDDINGS
    BertEmbeddingsPipe        embed  [bert.embeddings.]                   position, token type, LayerNorm, dropout
    BertLayerPipe x N         block  [bert.encoder.layer.{i}.]
    masked-lm:
      BertMLMTransformPipe    head   [cls.predictions.transform.]         optional
      TokenEmbeddingPipe      head   tied: WORD_EMBEDDINGS, forward_fn = tied_lm_logits (the decoder weight)
      BertMLMBiasPipe         head   [cls.predictions.]                   optional
    sequence-classification:
      BertPoolerPipe          head   [bert.pooler.]                       optional
      BertClassifierPipe      head   [classifier.]                        optional
    token-classification:
      BertClassifierPipe      head   [classifier.]                        optional

The pipeline reads (input_ids, attention_mask, token_type_ids); token_type_ids are consumed by BertEmbeddingsPipe,
which is an embed layer and so always on stage 0: only the protocol's three tensors cross a stage boundary.

In transformers 5, ``cls.predictions.decoder.bias`` *is* ``cls.predictions.bias`` (``_tied_weights_keys``), so HF's
parameters are the embedding matrix once and ``cls.predictions.bias``. The bias lives in its own layer, not in the
tied module: DeepSpeed all-reduces only the tied attribute's gradients (``tied_weight_attr``) between the stages that
hold a tied copy, so any other parameter of a tied module would silently diverge between stages.

Heads are ``optional``: a base checkpoint (``BertModel``, e.g. MiniLM) has none of them, and Hugging Face then starts
them freshly initialised; so does pptk. Checkpoints without a pooler (saved from a token-classification model) too.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer, BertPooler, BertPredictionHeadTransform

from pptk.errors import PptkError
from pptk.models import ModelFamily, PipeLayer, register
from pptk.models.common import WORD_EMBEDDINGS, TokenEmbeddingPipe, tied_lm_logits
from pptk.models.protocol import StageMasks, StageTensors

PREFIX = "bert."  # BertFor*.base_model_prefix


class BertEmbeddingsPipe(nn.Module):
    """Adds position and token-type embeddings to the word embeddings, then LayerNorm and dropout (BertEmbeddings).

    Inputs: (word_embeddings, attention_mask, position_ids, token_type_ids) from TokenEmbeddingPipe on the same stage;
    outputs the stage protocol's three tensors.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        words, attention_mask, position_ids, *rest = inputs
        stage = StageTensors.from_tuple((words, attention_mask, position_ids))
        token_type_ids = rest[0] if rest else torch.zeros_like(position_ids)  # as BertEmbeddings' zero buffer
        types = self.token_type_embeddings.num_embeddings
        if token_type_ids.numel() and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= types):
            raise PptkError(
                f"token_type_ids span [{int(token_type_ids.min())}, {int(token_type_ids.max())}] but "
                f"the model has type_vocab_size {types}; use segment ids 0..{types - 1} (the model's "
                "own tokenizer produces them)"
            )
        hidden = words + self.token_type_embeddings(token_type_ids.long())
        hidden = hidden + self.position_embeddings(position_ids)
        return stage.with_hidden(self.dropout(self.LayerNorm(hidden))).as_tuple()


class BertLayerPipe(BertLayer):
    """transformers' own BertLayer, speaking the stage protocol; the bidirectional mask is rebuilt once per stage."""

    def __init__(self, config: BertConfig, layer_idx: int, masks: StageMasks):
        super().__init__(config, layer_idx=layer_idx)
        self.config = config
        self.masks = masks  # shared by the model's blocks: one mask per micro-batch, not per layer

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        mask = self.masks("bidirectional", self.config, stage)
        hidden = super().forward(stage.hidden_states, attention_mask=mask)
        return stage.with_hidden(hidden).as_tuple()


class BertMLMTransformPipe(BertPredictionHeadTransform):
    """cls.predictions.transform: dense, activation, LayerNorm; keeps the protocol tuple for the tied decoder."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        return stage.with_hidden(super().forward(stage.hidden_states)).as_tuple()


class BertMLMBiasPipe(nn.Module):
    """cls.predictions.bias, added to the tied decoder's logits (HF's decoder.bias is this same tensor)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # HF's _init_weights zeros it too

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


class BertPoolerPipe(BertPooler):
    """bert.pooler: dense + tanh on the [CLS] token; returns the pooled [batch, hidden] tensor."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return super().forward(StageTensors.from_tuple(inputs).hidden_states)


class BertClassifierPipe(nn.Linear):
    """dropout + ``classifier`` (a Linear, so the parameters are classifier.weight/.bias with hf_prefix "classifier.").

    Takes the pooled tensor (sequence classification) or the protocol tuple (token classification).
    """

    def __init__(self, config: BertConfig):
        super().__init__(config.hidden_size, config.num_labels)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden = StageTensors.from_tuple(inputs).hidden_states if isinstance(inputs, tuple) else inputs
        return super().forward(self.dropout(hidden))


def _word_embeddings(config: BertConfig, **kwargs) -> TiedLayerSpec:
    # Both copies are built from identical arguments; padding_idx matters: HF's lookup gives the pad row no gradient.
    return TiedLayerSpec(
        WORD_EMBEDDINGS,
        TokenEmbeddingPipe,
        config.vocab_size,
        config.hidden_size,
        padding_idx=config.pad_token_id,
        max_positions=config.max_position_embeddings,
        tied_weight_attr="weight",
        **kwargs,
    )


def encoder_layers(config: BertConfig) -> list[PipeLayer]:
    layers = [
        PipeLayer(_word_embeddings(config), "embed", PREFIX + "embeddings.word_embeddings."),
        PipeLayer(LayerSpec(BertEmbeddingsPipe, config), "embed", PREFIX + "embeddings."),
    ]
    masks = StageMasks()
    layers += [
        PipeLayer(LayerSpec(BertLayerPipe, config, i, masks), "block", f"{PREFIX}encoder.layer.{i}.")
        for i in range(config.num_hidden_layers)
    ]
    return layers


def masked_lm_layers(config: BertConfig) -> list[PipeLayer]:
    return [
        *encoder_layers(config),
        PipeLayer(LayerSpec(BertMLMTransformPipe, config), "head", "cls.predictions.transform.", optional=True),
        PipeLayer(_word_embeddings(config, forward_fn=tied_lm_logits), "head", PREFIX + "embeddings.word_embeddings."),
        PipeLayer(LayerSpec(BertMLMBiasPipe, config.vocab_size), "head", "cls.predictions.", optional=True),
    ]


def sequence_classification_layers(config: BertConfig) -> list[PipeLayer]:
    return [
        *encoder_layers(config),
        PipeLayer(LayerSpec(BertPoolerPipe, config), "head", PREFIX + "pooler.", optional=True),
        PipeLayer(LayerSpec(BertClassifierPipe, config), "head", "classifier.", optional=True),
    ]


def token_classification_layers(config: BertConfig) -> list[PipeLayer]:
    return [
        *encoder_layers(config),
        PipeLayer(LayerSpec(BertClassifierPipe, config), "head", "classifier.", optional=True),
    ]


def small_config() -> BertConfig:
    return BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=3,
    )


register(
    ModelFamily(
        model_type="bert",
        tasks={
            "masked-lm": masked_lm_layers,
            "sequence-classification": sequence_classification_layers,
            "token-classification": token_classification_layers,
        },
        small_config=small_config,
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        # BertLMHeadModel (causal BERT) and encoder-decoder use need a causal mask or cross-attention inputs
        unsupported={"is_decoder": bool, "add_cross_attention": bool},
    )
)
